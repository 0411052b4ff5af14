"""Compressors and sync strategies in the planner: the dp exchange's time when it changes.

Searched only with `plait plan --low-comm` and only where the dp group crosses nodes (the slow
link is what they are for), with ZeRO 0 (plait refuses sync strategies with ZeRO, and the planner
keeps compression to the plain reducer's buckets). They change the optimization, not only the
time: tokens/s says nothing of the steps a run needs to reach a loss (docs/benchmarks.md has the
measured steps-to-loss), so every such layout is flagged `changes_optimization` and
`plait train parallel.auto=true` never picks one.

Bytes per rank of one bucket of d elements over n ranks (the formulas of docs/compression.md;
`phases` is checked against plait's own counters in tests/test_planner_lowcomm.py):
- fp16 / bf16: an all-reduce of 2d bytes;
- int8: all-to-all then all-gather of d' + 4d'/512 bytes (the ring all-reduce's factor), d' = d
  padded to a multiple of 512·n;
- sign: the same two phases on d'/8 + 4d'/sign_chunk bytes (4n with sign_chunk = 0);
- topk: an all-gather of 8K bytes from each rank, K = Σ ceil(fraction · numel) over the tensors;
- powersgd rank r: two all-reduces, of P (Σ r·m) with the uncompressed tensors, then of Q
  (Σ r·c), 4 bytes per element; a matrix with r(m + c) ≥ mc travels uncompressed.
Time per collective: bytes / bandwidth + latency × its ring steps.
The first phase goes out from the backward hooks like the dense all-reduce (overlapped the same
way); the second runs at the optimizer step, exposed. Encoding reads and writes the gradient and
its residual: 16 bytes per element at memory bandwidth.

Sync strategies, per step (H = sync.every): local_sgd averages the parameters every H steps (an
fp32 all-reduce / H, exposed); diloco all-reduces the outer gradient every H steps (fp32 or
sync.quantize) plus the outer step (40 bytes per element) / H; streaming_diloco sends one
fragment at a time in the background: only what exceeds the step's compute is exposed; delayed
overlaps the whole dense exchange with the next step's compute: only the excess is exposed.
Memory (per element of the rank's parameters, not checked against measurement): error feedback +4
bytes (int8 and sign +4/n more for the server residual), diloco and streaming_diloco +8 (outer
parameters and momentum), delayed +4 (the gradient in flight), local_sgd none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.planner.compute import allreduce_s

COMPRESSORS = ("fp16", "bf16", "int8", "topk", "sign", "powersgd")
STRATEGIES = ("local_sgd", "diloco", "streaming_diloco", "delayed")
QUANT_BYTES = {"none": 4.0, "fp16": 2.0, "int8": 1.0 + 4 / 512, "fp4": 0.5 + 4 / 32}


@dataclass(frozen=True)
class Settings:
    """The [compression] and [sync] values the formulas need (from the config)."""

    rank: int = 4
    topk_fraction: float = 0.01
    sign_chunk: int = 256
    every: int = 50
    quantize: str = "none"

    @staticmethod
    def from_config(cfg) -> Settings:
        c, s = cfg.compression, cfg.sync
        return Settings(c.rank, c.topk_fraction, c.sign_chunk, s.every, s.quantize)


def variants() -> list[tuple[str, str]]:
    """(compression, sync) pairs tried beside the dense every-step exchange."""
    return [(c, "every_step") for c in COMPRESSORS] + [("none", s) for s in STRATEGIES]


def shape_buckets(shapes, members) -> list[list[tuple]]:
    """The parameter shapes of each bucket (plait.planner.memory.buckets: reverse order)."""
    it = iter(reversed(list(shapes)))
    return [[next(it) for _ in b] for b in members]


def phases(name: str, bucket: list[tuple], n: int, st: Settings) -> list[tuple[int, float, int]]:
    """One bucket's exchange: (phase 1 or 2, bytes this rank sends, latency steps) per collective.

    Phase 1 is issued from the backward hooks, phase 2 at the optimizer step. The bytes are the
    formulas tests/test_compression.py checks against plait's counters (and
    tests/test_planner_lowcomm.py checks these against the same counters)."""
    numels = [math.prod(sh) for sh in bucket]
    d, ring, hops = sum(numels), 2 * (n - 1) / n, n - 1
    if name in ("fp16", "bf16"):
        return [(1, ring * 2 * d, 2 * hops)]
    if name in ("int8", "sign"):
        chunk = 512 if name == "int8" else st.sign_chunk
        unit = n * (chunk or 8)
        dp = -(-d // unit) * unit
        payload = dp + 4 * dp / chunk if name == "int8" else (
            dp / 8 + (4 * dp / chunk if chunk else 4 * n))
        return [(1, ring / 2 * payload, hops), (2, ring / 2 * payload, hops)]  # all-to-all, gather
    if name == "topk":
        k = sum(max(1, math.ceil(st.topk_fraction * x)) for x in numels)
        return [(1, (n - 1) * 8 * k, hops)]
    if name == "powersgd":
        p = q = 0
        for sh, x in zip(bucket, numels):
            m, c = (sh[0], x // sh[0]) if len(sh) >= 2 else (x, 1)
            r = min(st.rank, m, c)
            if len(sh) >= 2 and r * (m + c) < m * c:
                p, q = p + r * m, q + r * c
            else:
                p += x
        return [(1, ring * 4 * p, 2 * hops), (2, ring * 4 * q, 2 * hops)]
    raise ValueError(f"no exchange formula for compression {name!r}")


def exchange_s(compression: str, shapes, members, n: int, link, st: Settings,
               backward_s: float, overlap: bool, bytes_s) -> float:
    """Exposed seconds of a compressed dp exchange (see the module docstring)."""
    bw, lat = link
    if n <= 1:
        return 0.0
    phase1, phase2 = [], 0.0
    for bucket in shape_buckets(shapes, members):
        per = phases(compression, bucket, n, st)
        phase1.append(sum(b / bw + h * lat for ph, b, h in per if ph == 1))
        phase2 += sum(b / bw + h * lat for ph, b, h in per if ph == 2)
    first = max(phase1[-1], sum(phase1) - backward_s) if overlap else sum(phase1)
    return first + phase2 + bytes_s(16 * sum(math.prod(sh) for sh in shapes))


def strategy_s(strategy: str, psi: int, n: int, link, st: Settings, compute_s: float,
               dense_s: float, bytes_s) -> float:
    """Exposed seconds per step of a sync strategy's exchange (see the module docstring)."""
    h = max(1, st.every)
    if strategy == "local_sgd":
        return allreduce_s(4 * psi, n, link) / h
    if strategy == "diloco":
        return (allreduce_s(QUANT_BYTES[st.quantize] * psi, n, link) + bytes_s(40 * psi)) / h
    if strategy == "streaming_diloco":
        send = (allreduce_s(QUANT_BYTES[st.quantize] * psi, n, link) + bytes_s(40 * psi)) / h
        return max(0.0, send - compute_s)
    return max(0.0, dense_s - compute_s)  # delayed


def extra_state_bytes(compression: str, sync: str, psi: int, n: int) -> int:
    """Bytes a compressor's residuals or a strategy's copies add to a rank's model state."""
    if compression in ("int8", "sign"):
        return 4 * psi + -(-4 * psi // n)
    if compression in ("topk", "powersgd"):
        return 4 * psi
    return {"diloco": 8, "streaming_diloco": 8, "delayed": 4}.get(sync, 0) * psi
