"""Memory per rank, by formula: model state (exact), activations, in-flight micro-batches, buffers.

Model state (what the run summary's `memory` reports, and equal to it to the byte): plait keeps
parameters, gradients and Adam moments in fp32 whatever train.dtype is (autocast computes in 16
bits, the master weights stay fp32), so e = 4, K = 8 in `zero_formula` (plait.data_parallel.
zero_memory): plain 16Ψ, ZeRO-1 8Ψ + 8Ψ/Nd, ZeRO-2 4Ψ + 12Ψ/Nd, ZeRO-3 16Ψ/Nd, with the padding P
and this rank's owned elements Ψ_r computed from the layout the engine builds: gradient buckets in
reverse parameter order, the first ≤ 1 MiB then `parallel.bucket_mb`, each padded to a multiple
of Nd (ZeRO-1/2); every parameter's dim 0 padded to a multiple of Nd (ZeRO-3, FSDP2). Optimizer
`step` scalars: 4 bytes per stepped tensor (pieces under ZeRO).

Activations per transformer block and micro-batch (Korthikanti et al. 2022's method, redone for
plait's block: RMSNorm, rotary, SwiGLU, GQA; counted from the tensors autograd saves, checked in
tests/test_planner.py against plait.activation_checkpointing.count_saved_bytes). b micro-batch,
s sequence, h width, F ffn, H heads, K kv heads, E head dim, t tp, e = 2 (bf16/fp16 autocast) or 4:

    norms (fp32 residual stream: x, x·rsqrt, twice; rsqrt)   (16bsh + 8bs) / t_sp
    region inputs (the gathered norm outputs q/k/v and gate/up read)   e·bsh·c, c = 2, or 5 under
        autocast (each column layer casts the fp32 norm output to 16 bits itself)
    attention, none: q, k, v (GQA-expanded), output, reshaped output 5e·bsh/t + lse 4bHs/t
    attention, selective: q, k, v (unexpanded), reshaped output  e(2bsh + 2bsKE)/t (t > K: KE/t
        is the one replicated kv head's E)
    SwiGLU: gate, silu(gate), up, product   4e·bsF/t
    autocast's 16-bit weight copies   2·W_block/t (16-bit only)
    full recomputation: the block input only, 4bsh/t_sp

(t_sp = t with sequence parallelism, else 1.) Per stage: the embedding's token ids (8bs), and on
the last stage the final norm (8bsh + 4bs)/t_sp, the head's input e·bsh, its 16-bit weight copy,
and the cross-entropy's fp32 log-probabilities 4bsV/t.

In flight: a stage holds these per (micro-batch, chunk) from its forward until its backward (its
W under ZB-H1) completes; the peak comes from the schedule's own instruction stream
(plait.planner.pipesim.peak_in_flight). Without a pipeline micro-batches run one at a time.

Transients at the peak: the recomputed block under full checkpointing (one block's activations);
the logits and their gradient on the head's stage (2 · 4bsV/t); ZeRO-2's full gradient buckets,
which exist from a step's first backward to its optimizer step (4(Ψ+P) − 4(Ψ+P)/Nd); ZeRO-3's
gathered parameters of the largest unit, twice (FSDP2 prefetches the next); one fp32 temporary per
owned element in the optimizer step (foreach AdamW's denominators).
"""

from __future__ import annotations

import math
from functools import lru_cache

from plait.planner.shape import ModelShape, StagePart, parts_param_shapes, stage_parts


def act_bytes(dtype: str) -> int:
    return 2 if dtype in ("bf16", "fp16") else 4


# -- model state ---------------------------------------------------------------------------------
def buckets(
    shapes: list[tuple[int, ...]], bucket_bytes: int, first_bytes: int = 2**20
) -> list[list[int]]:
    """plait.data_parallel.GradReducer's buckets over fp32 parameters of `shapes`: per bucket, the
    element counts of its parameters in buffer order (reverse registration order)."""
    out: list[list[int]] = []
    cur: list[int] = []
    cap = min(first_bytes, bucket_bytes)
    for s in reversed(shapes):
        n = math.prod(s)
        if cur and (sum(cur) + n) * 4 > cap:
            out.append(cur)
            cur, cap = [], bucket_bytes
        cur.append(n)
    if cur:
        out.append(cur)
    return out


def _overlaps(members: list[int], lo: int, hi: int) -> int:
    """How many parameters of a bucket intersect [lo, hi): the pieces a ZeRO rank steps."""
    count, off = 0, 0
    for n in members:
        count += off < hi and off + n > lo
        off += n
    return count


@lru_cache(maxsize=8192)
def parts_model_state(
    shape: ModelShape, tp: int, parts: tuple, pipelined: bool, zero: int, dp: int, bucket_mb: float
) -> dict:
    shapes = parts_param_shapes(shape, tp, parts, pipelined)
    return model_state(list(shapes), zero, dp, bucket_mb, members=_members(shapes, bucket_mb))


@lru_cache(maxsize=1024)
def _members(shapes: tuple, bucket_mb: float) -> tuple:
    return tuple(tuple(b) for b in buckets(list(shapes), int(bucket_mb * 2**20)))


def model_state(
    shapes: list[tuple[int, ...]],
    zero: int,
    dp: int,
    bucket_mb: float = 25.0,
    dp_rank: int = 0,
    members=None,
) -> dict:
    """Bytes of parameters, gradients, optimizer state (Adam, fp32) on dp rank `dp_rank`."""
    from plait.data_parallel.zero_memory import zero_formula

    psi = sum(math.prod(s) for s in shapes)
    padding, owned, tensors = 0, 0, 0
    if zero == 0 or dp == 1:
        zero, owned, tensors = 0, psi, len(shapes)
    elif zero == 3:
        for s in shapes:
            d0, rest = s[0], math.prod(s[1:])
            c = math.ceil(d0 / dp)
            padding += (c * dp - d0) * rest
            rows = max(0, min(c, d0 - dp_rank * c))
            owned += rows * rest
            tensors += rows > 0
    else:
        for bucket in members or buckets(shapes, int(bucket_mb * 2**20)):
            n = sum(bucket)
            c = math.ceil(n / dp)
            padding += c * dp - n
            lo, hi = dp_rank * c, min(n, (dp_rank + 1) * c)
            owned += max(0, hi - lo)
            tensors += _overlaps(bucket, lo, hi) if hi > lo else 0
    f = zero_formula(zero, psi, dp, padding, owned)
    return {"psi": psi, "padding": padding, "owned": owned, **f, "optimizer_scalars": 4 * tensors}


# -- activations ---------------------------------------------------------------------------------
def block_activation_bytes(
    shape: ModelShape, b: int, s: int, tp: int, sp: bool, ac: str, dtype: str
) -> int:
    """Saved bytes of one block for one micro-batch (the table in the module docstring)."""
    e = act_bytes(dtype)
    h, F, H = shape.d_model, shape.ffn, shape.n_heads
    KE = shape.kv_local(tp) * shape.head_dim * tp  # tp > K: each rank's replicated head
    tsp = tp if (sp and tp > 1) else 1
    bsh, bs = b * s * h, b * s
    if ac == "full":
        return 4 * bsh // tsp
    norms = (16 * bsh + 8 * bs) // tsp
    copies = 5 if e == 2 else 2
    region = e * bsh * copies
    if ac == "selective":
        attn = e * (2 * bsh + 2 * bs * KE) // tp
    else:
        attn = (5 * e * bsh + 4 * b * H * s) // tp
    mlp = 4 * e * bs * F // tp
    weights = 2 * shape.block_matmul_params(tp) if e == 2 else 0
    return norms + region + attn + mlp + weights


def stage_extra_bytes(
    shape: ModelShape, part: StagePart, b: int, s: int, tp: int, sp: bool, dtype: str
) -> int:
    """Saved bytes per micro-batch outside the blocks: token ids; final norm, head input and
    its 16-bit copy, the loss."""
    e = act_bytes(dtype)
    tsp = tp if (sp and tp > 1) else 1
    out = 8 * b * s if part.embedding else 0
    if part.head:
        vp = shape.padded_vocab(tp) // tp
        out += (8 * b * s * shape.d_model + 4 * b * s) // tsp + e * b * s * shape.d_model
        out += 4 * b * s * vp + (2 * vp * shape.d_model if e == 2 else 0)
    return out


def chunk_activation_bytes(
    shape: ModelShape, part: StagePart, b: int, s: int, tp: int, sp: bool, ac: str, dtype: str
) -> int:
    return part.blocks * block_activation_bytes(shape, b, s, tp, sp, ac, dtype) + stage_extra_bytes(
        shape, part, b, s, tp, sp, dtype
    )


def rank_parts(shape: ModelShape, tp: int, p: int, v: int, rank: int) -> list[StagePart]:
    if p == 1:
        return [StagePart(shape.n_layers, True, True)]
    parts = stage_parts(shape, tp, p, v)
    return [parts[c * p + rank] for c in range(v)]


def rank_activations(
    shape: ModelShape, layout, seq_len: int, dtype: str, rank: int, peak_in_flight
) -> tuple[int, int]:
    """(activations held at the peak, activation transients) on pp rank `rank`.

    `peak_in_flight(rank, per_chunk_bytes)` -> peak saved bytes on that rank under the schedule.
    """
    L = layout
    parts = rank_parts(shape, L.tp, L.pp, L.virtual_stages, rank)
    b, s = L.micro_batch, seq_len
    per_chunk = [
        chunk_activation_bytes(
            shape, pt, b, s, L.tp, L.sequence_parallel, L.activation_checkpointing, dtype
        )
        for pt in parts
    ]
    acts = peak_in_flight(rank, per_chunk) if L.pp > 1 else max(per_chunk)
    transient = 0
    if L.activation_checkpointing == "full" and any(pt.blocks for pt in parts):
        transient += block_activation_bytes(shape, b, s, L.tp, L.sequence_parallel, "none", dtype)
    if any(pt.head for pt in parts):
        transient += 2 * 4 * b * s * shape.padded_vocab(L.tp) // L.tp
    return int(acts), transient


def rank_state(shape: ModelShape, layout, bucket_mb: float, rank: int) -> dict:
    """Model state of pp rank `rank` (dp rank 0, which owns the most) and its state transients."""
    L = layout
    parts = rank_parts(shape, L.tp, L.pp, L.virtual_stages, rank)
    ms = dict(parts_model_state(shape, L.tp, tuple(parts), L.pp > 1, L.zero, L.dp, bucket_mb))
    transient = 4 * ms["owned"]
    full = 4 * (ms["psi"] + ms["padding"])
    if L.zero == 2 and L.dp > 1:
        transient += full - full // L.dp
    if L.zero == 3 and L.dp > 1:
        unit = max(
            [shape.block_params(L.tp)]
            + [math.prod(shape.emb_shape(L.tp))] * any(pt.embedding or pt.head for pt in parts)
        )
        transient += 2 * 4 * unit
    ms["model_state"] = (
        ms["parameters"] + ms["gradients"] + ms["optimizer_state"] + ms["optimizer_scalars"]
    )
    ms["state_transient"] = transient
    return ms


def combine(state: dict, acts: tuple[int, int]) -> dict:
    keys = (
        "parameters",
        "gradients",
        "optimizer_state",
        "optimizer_scalars",
        "model_state",
        "psi",
        "padding",
        "owned",
    )
    out = {k: state[k] for k in keys}
    out["activations"], out["transient"] = acts[0], acts[1] + state["state_transient"]
    out["total"] = out["model_state"] + out["activations"] + out["transient"]
    return out


def rank_memory(
    shape: ModelShape, layout, seq_len: int, dtype: str, bucket_mb: float, rank: int, peak_in_flight
) -> dict:
    """Breakdown (bytes) for pp rank `rank` (tp rank 0, dp rank 0: the one owning the most)."""
    return combine(
        rank_state(shape, layout, bucket_mb, rank),
        rank_activations(shape, layout, seq_len, dtype, rank, peak_in_flight),
    )
