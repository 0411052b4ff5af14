"""Byte and time accounting for every collective plait issues.

Bytes are what one rank puts on the wire under the algorithm the formula names (ring all-reduce,
ring all-gather / reduce-scatter, direct p2p), not what a particular backend happens to do:
gloo emulates reduce-scatter with all-reduce, yet the logical cost is the ring's.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass


def wire_bytes(op: str, nbytes: int, n: int) -> float:
    """Bytes sent per rank by `op` on an n-member group.

    nbytes is the size of the whole array: the reduced tensor for all_reduce, the gathered output
    for all_gather, the unscattered input for reduce_scatter, the message for send.
    """
    if n <= 1 and op not in ("send",):
        return 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n * nbytes
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * nbytes
    if op in ("send", "broadcast"):
        return float(nbytes)
    if op in ("recv", "barrier"):
        return 0.0
    raise ValueError(f"no byte formula for collective {op!r}")


@dataclass
class Record:
    op: str
    group: str
    nbytes: int  # logical array size
    wire: float  # bytes this rank sent by the formula
    seconds: float  # time spent issuing plus time spent waiting
    step: int


class CommStats:
    """Per-rank log of collectives: totals since the last `reset_step()` and a short history.

    The history (last `history` records) is what a timeout dumps to say where each rank was.
    """

    def __init__(self, history: int = 32):
        self.step = 0
        self.step_bytes = 0.0
        self.step_seconds = 0.0
        self.step_by_key: dict[tuple[str, str], float] = defaultdict(float)
        self.total_bytes = 0.0
        self.total_seconds = 0.0
        self.recent: deque[Record] = deque(maxlen=history)
        self.enabled = True

    def record(self, op: str, group: str, nbytes: int, wire: float, seconds: float) -> Record:
        rec = Record(op, group, nbytes, wire, seconds, self.step)
        if self.enabled:
            self.step_bytes += wire
            self.step_seconds += seconds
            self.step_by_key[(op, group)] += wire
            self.total_bytes += wire
            self.total_seconds += seconds
        self.recent.append(rec)
        return rec

    def add_wait(self, rec: Record, seconds: float) -> None:
        rec.seconds += seconds
        if self.enabled:
            self.step_seconds += seconds
            self.total_seconds += seconds

    def reset_step(self, step: int | None = None) -> dict:
        """Return this step's totals and start counting the next step."""
        out = {
            "comm_bytes": self.step_bytes,
            "comm_s": self.step_seconds,
            "by_op": {f"{op}/{g}": b for (op, g), b in self.step_by_key.items()},
        }
        self.step_bytes = 0.0
        self.step_seconds = 0.0
        self.step_by_key = defaultdict(float)
        self.step = self.step + 1 if step is None else step
        return out

    def describe_recent(self) -> str:
        lines = [
            f"  step {r.step}: {r.op} on {r.group} ({r.nbytes} B, {r.seconds * 1e3:.1f} ms)"
            for r in self.recent
        ]
        return "\n".join(lines) if lines else "  (none)"


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
