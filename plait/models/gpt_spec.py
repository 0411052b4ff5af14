"""How plait's parallel transforms split the reference GPT (plait.models.gpt): its ParallelSpec.

Registered for the GPT class on import (plait.models imports this module), so gpt.py itself
needs no plait import. See plait.parallel_spec for what each field means to the transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.errors import ConfigError
from plait.models.gpt import GPT, Attention, Block, document_mask, lm_loss, rope_at
from plait.parallel_spec import Layer, ParallelSpec, PipelineSpec, Plan, register_spec

# Megatron's layout: q/k/v and gate/up split by output (heads, hidden units), o/down by input;
# each attention / MLP enters the tp region once (`region`), so its column layers share one
# backward all-reduce. This table splits k/v by plain columns: for tp dividing model.n_kv_heads;
# the spec's plan (`gpt_plan`) keeps whole kv heads for any tp.
GPT_PLAN: Plan = (
    ("tok_emb", "vocab"),
    ("blocks.*.attn_norm", "replicate"),
    ("blocks.*.attn", "region"),
    ("blocks.*.attn.q_proj", "column"),
    ("blocks.*.attn.k_proj", "column"),
    ("blocks.*.attn.v_proj", "column"),
    ("blocks.*.attn.o_proj", "row"),
    ("blocks.*.mlp_norm", "replicate"),
    ("blocks.*.mlp", "region"),
    ("blocks.*.mlp.gate_proj", "column"),
    ("blocks.*.mlp.up_proj", "column"),
    ("blocks.*.mlp.down_proj", "row"),
    ("norm", "replicate"),
    ("lm_head", "vocab"),
)


def gpt_plan(model: GPT) -> Plan:
    """GPT_PLAN with k/v as `column@K`: whole key/value heads, replicated over tp / K ranks each
    when tp > K (each rank holds the kv head its query heads read)."""
    kv = f"column@{model.cfg.kv_heads}"
    return tuple((p, kv if p.endswith((".k_proj", ".v_proj")) else s) for p, s in GPT_PLAN)


def check_kv_heads(kv: int, kv_field: str, tp: int) -> None:
    """ConfigError unless tp divides the key/value heads, or is a multiple of them (then each kv
    head is replicated over tp / kv ranks, plait.tensor_parallel.layers)."""
    if tp > kv and tp % kv:
        raise ConfigError(f"{kv_field} = {kv} with parallel.tp = {tp}: tp above the key/value head "
                          f"count must be a multiple of it (each kv head is then held by tp / {kv} "
                          f"ranks); choose a parallel.tp that divides {kv} or is a multiple of it")
    if tp <= kv and kv % tp:
        raise ConfigError(f"{kv_field} = {kv} is not divisible by parallel.tp = {tp} (each tp "
                          f"rank holds whole key/value heads): choose a parallel.tp that divides "
                          f"{kv} or is a multiple of it")


def check_tp(model: GPT, tp: int) -> None:
    """ConfigError naming the model field when the GPT cannot be split evenly over tp."""
    c = model.cfg
    for field, v in (("model.n_heads", c.n_heads), ("model.ffn_hidden", c.ffn)):
        if v % tp:
            raise ConfigError(f"{field} = {v} is not divisible by parallel.tp = {tp} (each tp rank "
                              f"holds 1/{tp} of them): set {field} to a multiple of {tp}, or a "
                              f"parallel.tp that divides {v}")
    check_kv_heads(c.kv_heads, "model.n_kv_heads", tp)


# -- the pipeline cut: embedding | each block | final norm + head ----------------------------------
def _rope_block(mods, x, shared):
    if "_rope" not in shared:  # once per stage call: the chunk's blocks share tables and mask
        # the model input's length: under sequence parallelism x holds 1/tp of it
        T = shared["seq_len"]
        positions = shared["extras"][0] if shared.get("extras") else None  # GPT.forward's
        cos, sin = rope_at(shared["rope_cos"], shared["rope_sin"], T, positions)
        shared["_rope"] = (cos, sin, None if positions is None else document_mask(positions))
    return mods[0](x, *shared["_rope"])


def _norm_head(mods, x, shared):
    return mods[1](mods[0](x))


@dataclass(frozen=True)
class _Hidden:
    d_model: int
    dtype: torch.dtype

    def __call__(self, idx: torch.Tensor):
        return (*idx.shape, self.d_model), self.dtype  # (B, T) token ids -> (B, T, D)


def pipeline_cut(model: GPT) -> PipelineSpec:
    """Token embedding, each block (with the RoPE tables every stage keeps), final norm + head.

    A micro-batch's extra input (`positions`, GPT.forward's second argument) reaches each block
    as `shared["extras"][0]`: RoPE at those positions and the document mask. With
    model.tie_embeddings the embedding and the head layer hold the same weight: the last stage
    keeps a copy (plait.pipeline.tied)."""
    layers = [Layer(("tok_emb",), (model.tok_emb,), block=False)]
    layers += [Layer((f"blocks.{i}",), (b,), _rope_block) for i, b in enumerate(model.blocks)]
    layers.append(Layer(("norm", "lm_head"), (model.norm, model.lm_head), _norm_head, block=False))
    return PipelineSpec(layers, {"rope_cos": model.rope_cos, "rope_sin": model.rope_sin},
                        _Hidden(model.cfg.d_model, model.tok_emb.weight.dtype),
                        list(model.state_dict().keys()))


GPT_SPEC = ParallelSpec(
    tp_plan=gpt_plan,
    check_tp=check_tp,
    pipeline_cut=pipeline_cut,
    block_types=(Block,),
    attention_core=(Attention, "core"),  # grouped-query head expansion and softmax(QKᵀ/√E)V
    loss=lm_loss,
)

register_spec(GPT, GPT_SPEC)
