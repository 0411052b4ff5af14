"""The model the planner reasons about: its shape, its parameters per rank, its FLOPs.

The shape is plait's reference GPT (plait.models.gpt: RMSNorm, rotary, SwiGLU, grouped-query
attention, untied or tied head), taken from a config (`model.preset` plus the explicit
`model.n_layers / d_model / n_heads / n_kv_heads / ffn_hidden / vocab_size` keys, as the trainer
resolves them) or from a Hugging Face `config.json` (`shape_from_hf_config`: the Llama-style keys).

Symbols: L layers, D width, H query heads, K key/value heads, E = D/H head dim, F ffn width,
V vocabulary (Vp: padded to a multiple of tp, as plait.tensor_parallel pads it), t tp size.

Tensor-parallel shards (Megatron's layout, plait.models.gpt_spec.gpt_plan): q_proj H·E/t × D,
k_proj / v_proj K·E/t × D (t > K: one whole kv head, E × D, replicated over t/K ranks), o_proj
D × H·E/t, gate / up F/t × D, down D × F/t, the two RMSNorm weights D each (replicated); embedding
and head Vp/t × D; final norm D. A head tied to the embedding is one matrix without a pipeline,
and a copy on the last stage with one (plait.pipeline.tied).

Pipeline split (plait.pipeline.partition): layers = [embedding, block 0 .. block L−1, norm + head],
each costing its parameter count in matrix-multiplying layers (the embedding costs 0), cut into
p·v contiguous stages by `balanced_split`; stage s runs on pp rank s mod p as chunk s div p.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from plait.errors import ConfigError

BYTE_VOCAB = 256  # plait.data's ByteTokenizer: the vocabulary of every text corpus


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tie_embeddings: bool = False
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def block_shapes(self, tp: int = 1) -> list[tuple[int, ...]]:
        """This tp rank's block parameters in registration order: attn_norm, q, k, v, o,
        mlp_norm, gate, up, down."""
        D, E = self.d_model, self.head_dim
        q, kv, f = self.n_heads * E // tp, self.kv_local(tp) * E, self.ffn // tp
        return [(D,), (q, D), (kv, D), (kv, D), (D, q), (D,), (f, D), (f, D), (D, f)]

    def kv_local(self, tp: int = 1) -> int:
        """Key/value heads per tp rank: K/t, or one (replicated over t/K ranks) when t > K."""
        return max(1, self.kv_heads // tp)

    def block_params(self, tp: int = 1) -> int:
        return sum(math.prod(s) for s in self.block_shapes(tp))

    def block_matmul_params(self, tp: int = 1) -> int:
        """Weights of the block's matrix multiplies (not the norms): what autocast copies."""
        return sum(math.prod(s) for s in self.block_shapes(tp) if len(s) == 2)

    def padded_vocab(self, tp: int) -> int:
        return math.ceil(self.vocab / tp) * tp

    def emb_shape(self, tp: int = 1) -> tuple[int, int]:
        return (self.padded_vocab(tp) // tp, self.d_model)

    def n_params(self) -> int:
        """Total parameters of the unsplit model (the tied matrix once)."""
        emb = self.vocab * self.d_model
        return (
            self.n_layers * self.block_params()
            + self.d_model
            + emb * (1 if self.tie_embeddings else 2)
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12·L·D·T (PaLM appendix B), N the matmul weights: as
        plait.models.gpt.flops_per_token, which the trainer's MFU uses."""
        n = self.n_layers * self.block_matmul_params() + self.d_model * self.vocab
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * seq_len

    def check(self) -> None:
        """The model-side rules the trainer enforces (plait.train's model_config)."""
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model = {self.d_model} is not divisible by model.n_heads = {self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads = {self.n_heads} is not divisible by model.n_kv_heads = "
                f"{self.kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head dimension d_model/n_heads = {self.head_dim} must be even (rotary embeddings)"
            )

    def tp_ok(self, tp: int) -> bool:
        """plait.models.gpt_spec.check_tp: heads and ffn width divisible by tp, and tp a divisor
        or a multiple of the kv heads."""
        K = self.kv_heads
        return (all(v % tp == 0 for v in (self.n_heads, self.ffn))
                and (K % tp == 0 if tp <= K else tp % K == 0))


def shape_from_config(cfg) -> ModelShape:
    """The GPT `plait train` would build from this config (a plait.config.Config)."""
    from plait.models.gpt import PRESETS, GPTConfig

    m = cfg.model
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset = {m.preset!r}: choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[m.preset])
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden"):
        if getattr(m, key):
            fields[key] = getattr(m, key)
    vocab = m.vocab_size
    if not vocab:
        if cfg.data.path.endswith(".bin"):
            raise ConfigError(
                "data.path is a .bin of token ids: set model.vocab_size so the planner knows the "
                "vocabulary (the trainer reads it from the data)"
            )
        vocab = BYTE_VOCAB
    g = GPTConfig(**{**fields, "vocab_size": vocab, "tie_embeddings": m.tie_embeddings})
    shape = ModelShape(
        g.n_layers,
        g.d_model,
        g.n_heads,
        g.kv_heads,
        g.ffn,
        g.vocab_size,
        g.tie_embeddings,
        name=m.preset,
    )
    shape.check()
    return shape


def shape_from_hf_config(path: str | Path) -> ModelShape:
    """A Llama-style Hugging Face `config.json` (num_hidden_layers, hidden_size,
    num_attention_heads,
    num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--hf-config {str(path)!r}: cannot read a JSON config ({e})") from e
    try:
        shape = ModelShape(
            d["num_hidden_layers"],
            d["hidden_size"],
            d["num_attention_heads"],
            d.get("num_key_value_heads") or d["num_attention_heads"],
            d["intermediate_size"],
            d["vocab_size"],
            bool(d.get("tie_word_embeddings", False)),
            name=p.parent.name,
        )
    except KeyError as e:
        raise ConfigError(
            f"--hf-config {str(path)!r}: key {e} missing (a Llama-style config is expected)"
        ) from e
    shape.check()
    return shape


# -- the pipeline split ------------------------------------------------------------------------
@lru_cache(maxsize=256)
def stage_layers(shape: ModelShape, tp: int, stages: int) -> tuple[tuple[int, int], ...]:
    """(first, end) layer indices of each of the `stages` global stages; layer 0 is the embedding,
    1..L the blocks, L+1 the final norm and head."""
    costs = [0.0] + [float(shape.block_params(tp))] * shape.n_layers
    costs.append(float(shape.d_model + math.prod(shape.emb_shape(tp))))
    b = balanced_split(costs, stages) if stages > 1 else [0, len(costs)]
    return tuple((b[s], b[s + 1]) for s in range(stages))


def balanced_split(costs: list[float], k: int) -> list[int]:
    """plait.pipeline.partition.balanced_split, vectorized: the same dynamic programme (minimize the
    largest part; among equal choices the first cut point), the same boundaries (tests compare)."""
    import numpy as np

    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} layers into {k} non-empty parts")
    pre = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cuts = np.zeros((k + 1, n + 1), dtype=np.int64)
    for j in range(1, k + 1):
        new = np.full(n + 1, np.inf)
        for i in range(j, n - (k - j) + 1):
            cand = np.maximum(best[j - 1 : i], pre[i] - pre[j - 1 : i])
            s = int(np.argmin(cand))
            new[i], cuts[j, i] = cand[s], s + j - 1
        best = new
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(int(cuts[j, bounds[-1]]))
    return bounds[::-1]


@dataclass(frozen=True)
class StagePart:
    """What one global stage holds: its blocks, and whether it has the embedding / the head."""

    blocks: int
    embedding: bool
    head: bool


@lru_cache(maxsize=4096)
def stage_parts(shape: ModelShape, tp: int, p: int, v: int) -> tuple[StagePart, ...]:
    out = []
    last = shape.n_layers + 1
    for a, b in stage_layers(shape, tp, p * v):
        blocks = sum(1 for i in range(a, b) if 1 <= i <= shape.n_layers)
        out.append(StagePart(blocks, a == 0, b == last + 1))
    return tuple(out)


def rank_param_shapes(
    shape: ModelShape, tp: int, p: int, v: int, rank: int
) -> list[tuple[int, ...]]:
    """This pp rank's parameter shapes (tp rank 0), in the order its module registers them:
    embedding, blocks in ascending order, final norm, head (plait.pipeline's PipelineStage)."""
    parts = (
        tuple(stage_parts(shape, tp, p, v)[c * p + rank] for c in range(v))
        if p > 1
        else (StagePart(shape.n_layers, True, True),)
    )
    return list(parts_param_shapes(shape, tp, parts, p > 1))


@lru_cache(maxsize=4096)
def parts_param_shapes(
    shape: ModelShape, tp: int, parts: tuple[StagePart, ...], pipelined: bool
) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    if any(s.embedding for s in parts):
        out.append(shape.emb_shape(tp))
    for s in parts:
        for _ in range(s.blocks):
            out += shape.block_shapes(tp)
    if any(s.head for s in parts):
        out.append((shape.d_model,))
        if not (
            shape.tie_embeddings and not pipelined
        ):  # a tied head shares the embedding's Parameter
            out.append(shape.emb_shape(tp))
    return tuple(out)
