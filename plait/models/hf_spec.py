"""How plait's parallel transforms split a transformers causal LM: its ParallelSpec, built from
the model's own metadata.

The tensor-parallel plan is the model's `config.base_model_tp_plan` (prefixed with its
`base_model_prefix`), its styles mapped onto plait's: colwise -> column, rowwise -> row,
embedding_rowwise -> vocab; the input embedding and the output head are vocab-parallel (the head
feeds plait's vocab-parallel cross-entropy; logits are never gathered), and each module holding
column layers is a `region` (one entry collective for q/k/v, one for gate/up). Where the metadata
is missing the family adds its own (`_FAMILIES`): GPT-2 has no plan, and its `Conv1D` layers keep
transposed (in, out) weights, its `c_attn` packs q | k | v (split per block, `column/3`).

The pipeline cut: the embeddings (GPT-2: plus the learned positions `wpe`) | each decoder layer |
final norm + head. What the model computes once at model level each stage computes for its own
micro-batch: rotary cos / sin by the model's own `rotary_emb` module (kept beside each decoder
layer, it has no persistent state), and the causal mask, which under SDPA without padding is
None (SDPA's is_causal), or under data.document_masking the block-diagonal mask of the
micro-batch's documents (their positions, the batch's extra input). Nothing here imports
transformers: the model is read through its attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from plait.errors import ConfigError
from plait.models.gpt import document_mask
from plait.models.gpt_spec import check_kv_heads
from plait.parallel_spec import Layer, ParallelSpec, PipelineSpec, Plan

# transformers' tp styles -> plait's; any other style is refused before the model changes
STYLE_MAP = {"colwise": "column", "rowwise": "row", "embedding_rowwise": "vocab"}


@dataclass(frozen=True)
class Family:
    """What one model family needs beyond its metadata."""

    tp_fields: tuple[tuple[str, str], ...]  # (config field, what it counts) tp must divide
    extra_plan: tuple[tuple[str, str], ...] = ()  # (pattern under the base model, style)
    layers: str = "layers"  # the decoder layers' ModuleList, under the base model
    norm: str = "norm"
    embeddings: tuple[str, ...] = ("embed_tokens",)
    positions: str | None = None  # learned position embeddings, added to the token embeddings
    embed_dropout: str | None = None  # applied to the embeddings' sum
    rotary: str | None = "rotary_emb"
    sequence_parallel: str | None = None  # why not, or None
    # the plan from the config instead of base_model_tp_plan (whose styles plait cannot map)
    own_plan: Callable[[object], tuple[tuple[str, str], ...]] | None = None
    # column layers of whole key/value heads (under the decoder layers): `column@K`, replicated
    # over tp / K ranks each when tp > K (plait.tensor_parallel.layers)
    kv_projections: tuple[str, ...] = ()


def _phi3_plan(c) -> tuple[tuple[str, str], ...]:
    """Phi-3 packs q | k | v (with grouped-query attention k and v are smaller: K whole heads
    each) and gate | up."""
    e = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    k = c.num_key_value_heads
    q, kv = c.num_attention_heads * e, k * e
    return (("layers.*.self_attn.qkv_proj", f"column/{q}+{kv}@{k}+{kv}@{k}"),
            ("layers.*.self_attn.o_proj", "row"),
            ("layers.*.mlp.gate_up_proj", "column/2"), ("layers.*.mlp.down_proj", "row"))


# num_key_value_heads: tp divides it or is a multiple of it (check_kv_heads)
_LLAMA_FIELDS = (("num_attention_heads", "attention heads"),
                 ("intermediate_size", "MLP hidden units"))
_LLAMA_KV = ("self_attn.k_proj", "self_attn.v_proj")


_FAMILIES: dict[str, Family] = {
    "llama": Family(tp_fields=_LLAMA_FIELDS, kv_projections=_LLAMA_KV),
    # Gemma: Llama's layout, an embedding scaled by √hidden (kept under tp: after_tp), tied head
    "gemma": Family(tp_fields=_LLAMA_FIELDS, kv_projections=_LLAMA_KV),
    "phi3": Family(tp_fields=_LLAMA_FIELDS, own_plan=_phi3_plan),
    "gpt2": Family(
        tp_fields=(("n_head", "attention heads"), ("n_inner", "MLP hidden units")),
        extra_plan=(("h.*.attn.c_attn", "column/3"), ("h.*.attn.c_proj", "row"),
                    ("h.*.mlp.c_fc", "column"), ("h.*.mlp.c_proj", "row")),
        layers="h", norm="ln_f", embeddings=("wte",), positions="wpe", embed_dropout="drop",
        rotary=None,
        sequence_parallel=("GPT-2's forward adds position embeddings of the whole sequence to the "
                           "token embeddings and reshapes its output to the input's length, so it "
                           "cannot run on 1/tp of the sequence")),
}


def family_of(lm: nn.Module) -> tuple[str, Family]:
    kind = getattr(lm.config, "model_type", "?")
    if kind not in _FAMILIES:
        raise ConfigError(f"transformers model_type {kind!r} ({type(lm).__name__}) is not "
                          f"supported by plait's parallel transforms yet; supported: "
                          f"{sorted(_FAMILIES)} (docs/hf.md)")
    return kind, _FAMILIES[kind]


def _name_of(root: nn.Module, target: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is target:
            return name
    raise ConfigError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def tp_plan(lm: nn.Module, root: str = "") -> Plan:
    """The plan table of `lm` with every pattern under `root` (the model's name in the module
    parallelize() gets: "" for the model itself, "lm." inside plait.models.hf.CausalLM)."""
    kind, fam = family_of(lm)
    base = f"{root}{lm.base_model_prefix}."
    entries: dict[str, str] = {}
    meta = {} if fam.own_plan else (getattr(lm.config, "base_model_tp_plan", None) or {})
    for pattern, style in meta.items():
        if style not in STYLE_MAP:
            raise ConfigError(f"{kind}: config.base_model_tp_plan gives {pattern!r} the style "
                              f"{style!r}, which plait does not map yet (it maps "
                              f"{sorted(STYLE_MAP)})")
        entries[base + pattern] = STYLE_MAP[style]
    for pattern, style in (*fam.extra_plan, *(fam.own_plan(lm.config) if fam.own_plan else ())):
        entries[base + pattern] = style
    kv = getattr(lm.config, "num_key_value_heads", None)
    for proj in fam.kv_projections:
        pattern = f"{base}{fam.layers}.*.{proj}"
        if kv and entries.get(pattern) == "column":
            entries[pattern] = f"column@{kv}"
    # a module holding column layers enters the tp region once for all of them
    for pattern, style in list(entries.items()):
        parent = pattern.rpartition(".")[0]
        if style.startswith("column") and parent and parent + "." != base:
            entries.setdefault(parent, "region")
    entries[root + _name_of(lm, lm.get_input_embeddings())] = "vocab"
    head = lm.get_output_embeddings()
    if head is not None:
        entries[root + _name_of(lm, head)] = "vocab"
    return tuple(entries.items())


def check_tp(lm: nn.Module, tp: int) -> None:
    """ConfigError naming the config field when the model cannot be split evenly over tp."""
    kind, fam = family_of(lm)
    c = lm.config
    for field, what in fam.tp_fields:
        v = getattr(c, field, None)
        if field == "n_inner" and v is None:  # GPT-2: None means 4 · n_embd
            v = 4 * c.n_embd
        if v is not None and v % tp:
            raise ConfigError(f"{kind} config.json: {field} = {v} ({what}) is not divisible by "
                              f"parallel.tp = {tp} (each tp rank holds 1/{tp} of them): choose a "
                              f"parallel.tp that divides {v}")
    kv = getattr(c, "num_key_value_heads", None)
    if kv is not None and kind != "gpt2":
        check_kv_heads(kv, f"{kind} config.json: num_key_value_heads", tp)
    if kind == "gpt2" and tp > 1:
        for field in ("embd_pdrop", "resid_pdrop"):
            if getattr(c, field, 0.0):
                raise ConfigError(f"gpt2 config.json: {field} = {getattr(c, field)} with "
                                  f"parallel.tp = {tp}: each tp rank would drop other elements of "
                                  f"the activations they all hold; set {field} to 0")


def after_tp(lm: nn.Module, tp: int, embed_scale: float | None = None) -> None:
    """What a family reads from stored sizes, set to this rank's once the layers are split.

    GPT-2 splits c_attn's output at a stored width: this rank's third of it. Phi-3 slices its
    packed q | k | v at the config's head counts: each attention gets its own copy of the config
    with this rank's counts (the model's config is left as it was). Attention repeats each kv
    head for `num_key_value_groups` query heads: this rank's H/tp query heads over its kv heads
    (K/tp, or one replicated head when tp > K). Gemma's embedding multiplies its output by
    √hidden (`embed_scale`): the vocab-parallel embedding that replaced it does too.
    """
    import copy

    kind, fam = family_of(lm)
    base = lm.get_submodule(lm.base_model_prefix)
    if kind == "gpt2":
        for block in base.get_submodule("h"):
            block.attn.split_size = block.attn.c_attn.weight.shape[1] // 3
    elif tp > 1:
        c = lm.config
        heads, kv = c.num_attention_heads // tp, max(1, c.num_key_value_heads // tp)
        for layer in base.get_submodule(fam.layers):
            attn = layer.self_attn
            attn.num_key_value_groups = heads // kv
            if kind == "phi3":
                attn_cfg = copy.copy(attn.config)
                attn_cfg.num_attention_heads, attn_cfg.num_key_value_heads = heads, kv
                attn.config, attn.num_key_value_heads = attn_cfg, kv
    emb = lm.get_input_embeddings()
    if embed_scale is not None and hasattr(emb, "output_scale"):  # replaced by the tp embedding
        emb.output_scale = embed_scale


# -- the pipeline cut ---------------------------------------------------------------------------
def _positions(shared, device) -> torch.Tensor:
    """The micro-batch's positions: in their documents under data.document_masking (its extra
    input, (B, T)), else 0 … T − 1 (1, T)."""
    if shared.get("extras"):
        return shared["extras"][0]
    return torch.arange(shared["seq_len"], device=device).unsqueeze(0)


def _embed(mods, x, shared):
    h = mods[0](x)
    if len(mods) > 1:  # learned positions (GPT-2): the whole sequence, as the model's forward
        h = h + mods[1](_positions(shared, x.device))
    return mods[2](h) if len(mods) > 2 else h


def _decoder_layer(mods, x, shared):
    layer, rotary = mods[0], (mods[1] if len(mods) > 1 else None)
    if "_hf_pos" not in shared:  # once per stage call: the chunk's layers share them
        pos = _positions(shared, x.device)
        shared["_hf_pos"] = pos
        shared["_hf_rope"] = rotary(x, pos) if rotary is not None else None
        # documents of a packed sequence: SDPA with the block-diagonal causal mask (True:
        # attend) the whole model's forward builds from such positions; else SDPA's is_causal
        shared["_hf_mask"] = document_mask(pos) if shared.get("extras") else None
    kw = {"position_ids": shared["_hf_pos"]}
    if shared["_hf_rope"] is not None:
        kw["position_embeddings"] = shared["_hf_rope"]
    return layer(x, attention_mask=shared["_hf_mask"], **kw)


def _norm_head(mods, x, shared):
    return mods[1](mods[0](x))


@dataclass(frozen=True)
class _Hidden:
    d_model: int
    dtype: torch.dtype

    def __call__(self, idx: torch.Tensor):
        return (*idx.shape, self.d_model), self.dtype  # (B, T) token ids -> (B, T, D)


def pipeline_cut(lm: nn.Module, root: str = "", model: nn.Module | None = None) -> PipelineSpec:
    """Embeddings | each decoder layer (beside the rotary module) | final norm + head; `model`:
    the module parallelize() gets (holding `lm` under `root`), whose state-dict keys are listed.
    A head tied to the embedding (tie_word_embeddings) is one weight in both layers: the last
    stage keeps a copy (plait.pipeline.tied)."""
    kind, fam = family_of(lm)
    c = lm.config
    impl = getattr(c, "_attn_implementation", None)
    if impl != "sdpa":
        raise ConfigError(f"{kind}: attention implementation {impl!r} with parallel.pp > 1: the "
                          "pipeline stages rely on SDPA's causal mask; build the model with "
                          "attn_implementation='sdpa'")
    base_name = lm.base_model_prefix
    base = lm.get_submodule(base_name)
    pre = f"{root}{base_name}."
    names = (*fam.embeddings, *((fam.positions, fam.embed_dropout) if fam.positions else ()))
    layers = [Layer(tuple(pre + n for n in names), tuple(base.get_submodule(n) for n in names),
                    _embed, block=False)]
    rotary = base.get_submodule(fam.rotary) if fam.rotary else None
    for i, layer in enumerate(base.get_submodule(fam.layers)):
        if rotary is None:
            layers.append(Layer((f"{pre}{fam.layers}.{i}",), (layer,), _decoder_layer))
        else:
            layers.append(Layer((f"{pre}{fam.layers}.{i}", pre + fam.rotary), (layer, rotary),
                                _decoder_layer))
    head = lm.get_output_embeddings()
    layers.append(Layer((pre + fam.norm, root + _name_of(lm, head)),
                        (base.get_submodule(fam.norm), head), _norm_head, block=False))
    emb = lm.get_input_embeddings()
    keys = list((model if model is not None else lm).state_dict().keys())
    return PipelineSpec(layers, {}, _Hidden(emb.embedding_dim, emb.weight.dtype), keys)


def hf_spec(lm: nn.Module, root: str = "", model: nn.Module | None = None) -> ParallelSpec:
    """The ParallelSpec of transformers causal LM `lm`, its module names under `root` in `model`
    (the module parallelize() gets; `lm` itself when root is "").

    A family plait does not support yet gets no tensor-parallel plan and a pipeline cut and tp
    check that raise the ConfigError naming its model_type; data parallelism still works."""
    try:
        _, fam = family_of(lm)
    except ConfigError as e:
        def refuse(*_args, _e=e):
            raise _e

        return ParallelSpec(check_tp=refuse, pipeline_cut=refuse)
    layer_type = type(lm.get_submodule(f"{lm.base_model_prefix}.{fam.layers}")[0])
    # read now: after tp the embedding is plait's, which keeps only the factor
    scale = getattr(lm.get_input_embeddings(), "scalar_embed_scale", None)
    return ParallelSpec(
        tp_plan=tp_plan(lm, root),
        check_tp=lambda _model, tp: check_tp(lm, tp),
        pipeline_cut=lambda _model: pipeline_cut(lm, root, model),
        block_types=(layer_type,),
        after_tp=lambda _model, tp: after_tp(lm, tp, scale),
        no_sequence_parallel=fam.sequence_parallel,
    )
