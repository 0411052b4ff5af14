"""Seconds per instruction: compute from FLOPs and bytes, communication from plait's byte formulas.

Compute of one block for one micro-batch of n = b·s tokens (t tp size, e activation bytes):
- matrix multiplies: q, k, v, o, gate, up, down, each 2·n·in·out/t FLOPs forward and twice that
  backward (input gradient, then weight gradient: ZB-H1's B and W), at the rate of a GEMM of that
  shape: on GPUs peak × matmul_efficiency (one calibration per GPU type), on CPUs the rate
  `plait plan --calibrate` measured for the nearest shapes (log-space interpolation);
- the attention core: 4·b·s²·h/t FLOPs forward, 8·b·s²·h/t backward; on GPUs half of them are
  skipped under the causal mask (flash kernels) at peak × attention_efficiency (default: the
  matmul efficiency), on CPUs at the measured rate of causal SDPA for the nearest (s, E);
- element-wise passes (norms, rotary, casts, residual adds, SwiGLU gate, GQA expansion), bytes
  counted from plait's eager block (see `elementwise_bytes`), at the device's memory bandwidth;
  backward twice the forward's;
- framework time per block (CPU: measured per forward + backward; GPUs: hidden by asynchronous
  launches, 0).
Checkpointing adds a forward of each block (full) or of the attention core (selective) to the
backward. The last stage adds the head GEMM and the cross-entropy passes; the first the embedding.

Tensor-parallel collectives are not overlapped and are part of the compute they sit in (plait's
region layout): per block forward 2 all-reduces of the row outputs (e·bsh bytes), backward 2 of the
region inputs' gradients (fp32, 4·bsh); sequence parallelism: all-gather + reduce-scatter instead
(same bytes); full recomputation repeats 1 all-reduce (3 collectives under SP). Ring times:
all-reduce 2(t−1)(α + n/(tB)), all-gather / reduce-scatter (t−1)(α + n/(tB)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.planner.cluster import Cluster
from plait.planner.memory import act_bytes
from plait.planner.shape import ModelShape, StagePart


def allreduce_s(nbytes: float, n: int, link: tuple[float, float]) -> float:
    bw, lat = link
    return 0.0 if n <= 1 else 2 * (n - 1) * (lat + nbytes / (n * bw))


def gather_s(nbytes: float, n: int, link: tuple[float, float]) -> float:
    """All-gather or reduce-scatter of an n-way array of `nbytes` in total."""
    bw, lat = link
    return 0.0 if n <= 1 else (n - 1) * (lat + nbytes / (n * bw))


def reduce_scatter_s(nbytes: float, n: int, link: tuple[float, float], cluster: Cluster
                     ) -> float:
    """A reduce-scatter: the ring's time, or an all-reduce's where the backend emulates it so."""
    if cluster.reduce_scatter_as_allreduce:
        return allreduce_s(nbytes, n, link)
    return gather_s(nbytes, n, link)


def scalar_allreduce_s(n: int, link: tuple[float, float]) -> float:
    """A few bytes: latency-bound, a tree of depth log2 n each way (NCCL and gloo alike)."""
    return 0.0 if n <= 1 else 2 * math.ceil(math.log2(n)) * link[1]


class Rates:
    """FLOP/s of GEMM shapes and bytes/s of element-wise passes for one rank of a job."""

    def __init__(self, cluster: Cluster, world: int, threads: int = 0):
        self.c = cluster
        if cluster.is_cpu:
            cores = max(1, cluster.cores)
            on_node = min(world, cluster.gpus_per_node)
            # train.threads, else what plait's trainer picks: the cores split over the node's ranks
            self.threads = threads or max(1, cores // on_node)
            # ranks beyond the cores time-share them: each runs at cores / (ranks · threads) speed
            self.share = min(1.0, cores / (on_node * self.threads))
            rows = [r for r in cluster.matmul_table if r[0] == self.threads] or [
                r for r in cluster.matmul_table if r[0] == min(x[0] for x in cluster.matmul_table)
            ]
            self.grid = {(m, n, k): rate for _, m, n, k, rate in rows}
            self.axes = [sorted({key[i] for key in self.grid}) for i in range(3)]
            attn = [r for r in cluster.attention_table if r[0] == self.threads] or [
                r
                for r in cluster.attention_table
                if r[0] == min(x[0] for x in cluster.attention_table)
            ]
            self.attn = {(s, e): rate for _, s, e, rate in attn}
            self.mem_bw = cluster.elementwise_gbs * 1e9 * self.threads * self.share
            self.overhead = cluster.block_overhead_s / self.share
        else:
            self.threads, self.share, self.grid, self.attn = 1, 1.0, {}, {}
            self.mem_bw = cluster.memory_bandwidth_gbs * 1e9
            self.overhead = 0.0
        self._cache: dict = {}

    def gemm(self, m: float, n: float, k: float) -> float:
        """Seconds of an (m × k) · (k × n) product."""
        flops = 2.0 * m * n * k
        if not self.grid:
            return flops / (self.c.peak_flops * self.c.matmul_efficiency)
        key = (m, n, k)
        rate = self._cache.get(key)
        if rate is None:
            rate = self._cache[key] = self._interp(m, n, k) * self.share
        return flops / rate

    def _interp(self, m, n, k) -> float:
        # trilinear interpolation of log(rate) on the log2 grid, clamped to its edges
        idx = []
        for v, axis in zip((m, n, k), self.axes):
            x = min(max(math.log2(max(v, 1)), math.log2(axis[0])), math.log2(axis[-1]))
            j = max(0, min(len(axis) - 2, sum(1 for a in axis if math.log2(a) <= x) - 1))
            lo, hi = math.log2(axis[j]), math.log2(axis[j + 1])
            idx.append((axis[j], axis[j + 1], 0.0 if hi == lo else (x - lo) / (hi - lo)))
        total = 0.0
        for bits in range(8):
            w, key = 1.0, []
            for d in range(3):
                a, b, f = idx[d]
                pick = (bits >> d) & 1
                w *= f if pick else 1 - f
                key.append(b if pick else a)
            total += w * math.log(self.grid[tuple(key)])
        return math.exp(total)

    def attention(self, heads: float, s: int, e: int) -> tuple[float, float]:
        """(forward, backward) seconds of causal attention over `heads` heads of s × e."""
        counted = 4.0 * heads * s * s * e  # forward; backward twice that
        if self.attn:
            rate = self._attn_rate(s, e) * self.share
            return counted / rate, 2 * counted / rate
        eff = self.c.attention_efficiency or self.c.matmul_efficiency
        t = 0.5 * counted / (self.c.peak_flops * eff)  # flash kernels skip the masked half
        return t, 2 * t

    def _attn_rate(self, s: int, e: int) -> float:
        # the measured head dim nearest to e; log-rate linear in log s between measured lengths
        ee = min({k[1] for k in self.attn}, key=lambda x: abs(math.log2(x / e)))
        pts = sorted((k[0], r) for k, r in self.attn.items() if k[1] == ee)
        x = min(max(math.log2(s), math.log2(pts[0][0])), math.log2(pts[-1][0]))
        for (s0, r0), (s1, r1) in zip(pts, pts[1:]):
            if x <= math.log2(s1):
                f = (x - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
                return math.exp((1 - f) * math.log(r0) + f * math.log(r1))
        return pts[-1][1]

    def bytes_s(self, nbytes: float) -> float:
        return nbytes / self.mem_bw


@dataclass(frozen=True)
class BlockTimes:
    f: float  # forward
    bi: float  # input-gradient backward (+ recomputation)
    w: float  # weight-gradient backward
    tp_f: float  # of which tensor-parallel communication in f
    tp_b: float  # ... in bi


def elementwise_bytes(shape: ModelShape, b: int, s: int, tp: int, sp: bool, dtype: str) -> float:
    """Bytes read + written by one block's element-wise forward in plait's eager GPT.

    Per element of: the residual stream (per RMSNorm: pow, mean, two multiplies on fp32, 28 B;
    per residual add 8 + e B), q and k (rotary on fp32 halves, 36 B, plus 12 B of casts under
    autocast), the attention output (reshape copy, 2e), the expanded k and v under GQA (2e each),
    the ffn activations (silu and product, 5e); under autocast the casts of region inputs (6 B per
    element, one per column layer) and of the block's weights (6 B per element).
    """
    e = act_bytes(dtype)
    half = e == 2
    tsp = tp if (sp and tp > 1) else 1
    bsh, bs = b * s * shape.d_model, b * s
    ke = shape.kv_local(tp) * shape.head_dim  # this rank's k (a replicated head when tp > K)
    out = 2 * 28 * bsh / tsp + 2 * (8 + e) * bsh / tsp
    out += (48 if half else 36) * (bsh / tp + bs * ke)
    out += 2 * e * bsh / tp
    if shape.kv_local(tp) < shape.n_heads // tp:
        out += 2 * 2 * e * bsh / tp
    out += 5 * e * bs * shape.ffn / tp
    if half:
        out += 6 * bsh * 5 + 6 * shape.block_matmul_params(tp)
    return out


def block_times(
    shape: ModelShape,
    rates: Rates,
    cluster: Cluster,
    b: int,
    s: int,
    tp: int,
    sp: bool,
    ac: str,
    dtype: str,
) -> BlockTimes:
    n = b * s
    D, E = shape.d_model, shape.head_dim
    q, kv, f = shape.n_heads * E // tp, shape.kv_local(tp) * E, shape.ffn // tp
    linears = [(D, q), (D, kv), (D, kv), (q, D), (D, f), (D, f), (f, D)]  # (in, out) per rank
    g = rates.gemm
    fwd = sum(g(n, o, i) for i, o in linears)
    dx = sum(g(n, i, o) for i, o in linears)
    dw = sum(g(o, i, n) for i, o in linears)
    core_f, core_b = rates.attention(b * shape.n_heads / tp, s, E)
    ew = rates.bytes_s(elementwise_bytes(shape, b, s, tp, sp, dtype))
    over = rates.overhead
    link = cluster.link(False)
    e = act_bytes(dtype)
    bsh = n * D
    if sp and tp > 1:
        # forward: gather the fp32 region inputs, reduce-scatter row outputs; backward the mirror
        rs_e = reduce_scatter_s(e * bsh, tp, link, cluster)
        rs_4 = reduce_scatter_s(4 * bsh, tp, link, cluster)
        tp_f = 2 * gather_s(4 * bsh, tp, link) + 2 * rs_e
        tp_b = 2 * rs_4 + 2 * gather_s(e * bsh, tp, link) + 2 * scalar_allreduce_s(tp, link)
        redo = 2 * gather_s(4 * bsh, tp, link) + rs_e
    else:
        tp_f = 2 * allreduce_s(e * bsh, tp, link)
        tp_b = 2 * allreduce_s(4 * bsh, tp, link)
        redo = allreduce_s(e * bsh, tp, link)
    f_time = fwd + core_f + ew + over / 3 + tp_f
    bi = dx + core_b + 2 * ew + over * 2 / 3 + tp_b
    if ac == "full":
        bi += fwd + core_f + ew + over / 3 + redo
    elif ac == "selective":
        bi += core_f
    return BlockTimes(f_time, bi, dw, tp_f, tp_b + (redo if ac == "full" else 0.0))


def stage_times(
    shape: ModelShape,
    rates: Rates,
    cluster: Cluster,
    part: StagePart,
    blk: BlockTimes,
    b: int,
    s: int,
    tp: int,
    sp: bool,
    dtype: str,
    zb_full_ac: bool,
) -> tuple[float, float, float]:
    """(F, B-input, W) seconds of one chunk for one micro-batch."""
    f, bi, w = part.blocks * blk.f, part.blocks * blk.bi, part.blocks * blk.w
    if zb_full_ac:  # ZB-H1's W is a backward of its own and recomputes the block once more
        w += part.blocks * (blk.f - blk.tp_f)
    n, D = b * s, shape.d_model
    vp = shape.padded_vocab(tp) // tp
    link = cluster.link(False)
    e = act_bytes(dtype)
    if part.embedding:
        f += rates.bytes_s(4 * n * D) + allreduce_s(4 * n * D, tp, link)
        w += rates.bytes_s(12 * vp * D + 8 * n * D)  # dense embedding gradient, accumulated
    if part.head:
        f += (
            rates.gemm(n, vp, D)
            + rates.bytes_s(28 * n * D + 20 * n * vp)
            + 3 * scalar_allreduce_s(tp, link)
        )
        f += gather_s(4 * n * D, tp, link) if (sp and tp > 1) else 0.0
        bi += (
            rates.gemm(n, D, vp)
            + rates.bytes_s(2 * 28 * n * D + 20 * n * vp)
            + allreduce_s(4 * n * D, tp, link)
        )
        w += rates.gemm(vp, D, n)
        if e == 2:
            f += rates.bytes_s(6 * vp * D)
    return f, bi, w
