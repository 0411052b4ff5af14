"""Hugging Face transformers causal LMs in plait: built from a local directory, called by their own
forward, split by the spec their metadata gives (plait.models.hf_spec).

    model = load_causal_lm("path/to/dir", seed=0)     # config.json (+ model.safetensors)
    model(input_ids)                                  # (B, T) -> logits (B, T, V)

For training, `build_for_training` gives the model on the meta device when the directory has
weights, with the loader parallelize() runs once the model is split: each rank reads only its
slices (plait.models.hf_weights).

`CausalLM` only adapts the call: input_ids -> the model's own
`forward(input_ids=..., position_ids=..., use_cache=False).logits`; the transformers modules are
the ones that run, plait swaps layers inside them (tensor parallelism) or calls them stage by
stage (pipeline). Position ids are passed explicitly: under sequence parallelism the model
would otherwise read the sequence length from the 1/tp it holds. The loss is plait's (token sum
over pre-shifted targets, -100 ignored), not transformers' per-call mean.

transformers is imported only when a model is built here; plait.models imports this module
without it, and `spec_of` finds a transformers model's spec through the finder registered below.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from plait.errors import ConfigError
from plait.materialize import materialize
from plait.mesh import Mesh
from plait.models.gpt import GPTConfig, document_mask
from plait.models.hf_spec import hf_spec
from plait.models.hf_weights import check_weights, weight_files, weights_loader
from plait.parallel_spec import ParallelSpec, register_finder


class CausalLM(nn.Module):
    """A transformers causal LM as plait calls a model: `(input_ids[, positions]) -> logits`.

    `positions` (B, T): each token's position in its document (data.document_masking). They go
    to the model as `position_ids` (RoPE, learned positions restart per document) with the
    block-diagonal causal mask of the documents as a 4-D boolean `attention_mask` (True: attend),
    which transformers hands to SDPA as given. Built here over the whole sequence, so it also
    holds under sequence parallelism, where the model's own mask builder would see 1/tp of it."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None
                ) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            return self.lm(input_ids=input_ids, position_ids=positions, use_cache=False).logits
        impl = getattr(self.lm.config, "_attn_implementation", None)
        if impl != "sdpa":
            raise ConfigError(f"data.document_masking with a transformers model using attention "
                              f"{impl!r}: the document mask is an SDPA boolean mask; build the "
                              "model with attn_implementation='sdpa'")
        return self.lm(input_ids=input_ids, position_ids=positions,
                       attention_mask=document_mask(positions), use_cache=False).logits

    def parallel_spec(self) -> ParallelSpec:
        return hf_spec(self.lm, "lm.", self)


def _is_transformers_model(model: nn.Module) -> bool:
    return (any(c.__module__.startswith("transformers.") for c in type(model).__mro__)
            and hasattr(model, "config") and hasattr(model, "base_model_prefix"))


def _find(model: nn.Module) -> ParallelSpec | None:
    return hf_spec(model) if _is_transformers_model(model) else None


register_finder(_find)


def read_config(path: str | Path):
    """The transformers config of local directory `path` (its config.json); nothing downloaded."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ConfigError(f"model.hf = {str(path)!r}: no config.json there; give a local directory "
                          "holding a transformers config.json (scripts/make_tiny_hf.py writes one)")
    from transformers import AutoConfig  # heavy optional package: only when an HF model is used

    return AutoConfig.from_pretrained(str(d), local_files_only=True)


def build_causal_lm(config) -> nn.Module:
    """A randomly initialized fp32 model of `config` (seed the RNG first), with SDPA attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                            dtype=torch.float32)


def build_for_training(path: str | Path, seed: int
                       ) -> tuple[CausalLM, Callable[[nn.Module, Mesh], None] | None]:
    """(model, init_weights) for plait.parallelize: with weights in `path`, the model on the meta
    device (checked against the files' headers) and the loader that fills this rank's part after
    the split (plait.models.hf_weights); without, a random initialization from `seed` on the CPU,
    the same on every rank, and None."""
    config = read_config(path)
    files = weight_files(path)
    if not files:
        torch.manual_seed(seed)
        return CausalLM(build_causal_lm(config)), None
    with torch.device("meta"):
        lm = build_causal_lm(config)
    check_weights(lm, path, files)
    return CausalLM(lm), weights_loader(lm, path, files)


def load_causal_lm(path: str | Path, seed: int) -> CausalLM:
    """The model of local directory `path`, whole, on the CPU: its weights if it has
    model.safetensors (or an index of shards), else a random initialization from `seed` (the same
    on every rank)."""
    model, init_weights = build_for_training(path, seed)
    if init_weights is not None:
        materialize(model, "cpu")
        init_weights(model, Mesh.single())
    return model


def shape_of(config) -> GPTConfig:
    """The model's shape in plait's terms (FLOPs per token, the run's summary, checkpoints)."""
    g = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = g.hidden_size
    heads = g.num_attention_heads
    ffn = getattr(g, "intermediate_size", None) or getattr(g, "n_inner", None) or 4 * d
    return GPTConfig(vocab_size=g.vocab_size, n_layers=g.num_hidden_layers, n_heads=heads,
                     n_kv_heads=getattr(g, "num_key_value_heads", None) or heads, d_model=d,
                     ffn_hidden=ffn, max_seq_len=g.max_position_embeddings,
                     tie_embeddings=bool(getattr(g, "tie_word_embeddings", False)))


def check_data(config, path: str, vocab_size: int, seq_len: int) -> None:
    """ConfigError when the data's vocabulary or the sequence length exceeds the model's."""
    shape = shape_of(config)
    if vocab_size > shape.vocab_size:
        raise ConfigError(f"model.hf = {path!r}: config.json's vocab_size = {shape.vocab_size} is "
                          f"smaller than the data's vocabulary ({vocab_size} ids): use data "
                          "tokenized for this model, or a config with a larger vocab_size")
    if seq_len > shape.max_seq_len:
        raise ConfigError(f"model.hf = {path!r}: train.seq_len = {seq_len} exceeds config.json's "
                          f"max_position_embeddings = {shape.max_seq_len}: lower train.seq_len")


# -- tiny configurations (scripts/make_tiny_hf.py, tests) ----------------------------------------
def tiny_config(family: str, vocab_size: int = 256, **over):
    """A small random-init config of `family` (llama | gpt2 | gemma | phi3): hidden 64, 2 layers,
    4 heads (2 key/value heads but GPT-2's), no dropout."""
    from transformers import GPT2Config, LlamaConfig

    if family == "llama":
        kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False)
        return LlamaConfig(**{**kw, **over})
    if family == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
        return GPT2Config(**{**kw, **over})
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma":  # head_dim explicit, as Gemma's configs give it; tied head
        from transformers import GemmaConfig

        return GemmaConfig(**{**common, "head_dim": 16, **over})
    if family == "phi3":  # packed qkv_proj (grouped-query: q | k | v unequal) and gate_up_proj
        from transformers import Phi3Config

        return Phi3Config(**{**common, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                             "attention_dropout": 0.0, "tie_word_embeddings": False, **over})
    raise ValueError(f"family {family!r}: choose llama, gpt2, gemma or phi3")
