"""Byte and time accounting for every collective plait issues.

Two numbers per collective, per rank:

- `wire`: what the backend really puts on the wire (TCP payload: TCP/IP headers not included).
  For gloo this was measured with loopback counters in a private namespace (scripts/wire_bytes.py,
  docs/benchmarks.md "Bytes on the wire") and differs from the formulas in two ways:
  1. `reduce_scatter_tensor`: ProcessGroupGloo clones the input, all-reduces it whole and keeps
     its own chunk, so a reduce-scatter costs a whole all-reduce, 2(n−1)/n · size;
  2. framing: every message gloo's TCP transport moves (an unbound-buffer send) costs 144 B of
     control traffic, three 48-B preambles (the data's own, the sender's "send ready" and the
     receiver's "receive ready"). Its ring all-reduce cuts the array into 2n segments and sends
     2(n−1)/n of the non-empty ones per rank (4(n−1) messages for arrays of 2n elements or
     more), all-gather 2(n−1) messages per rank, all-to-all n−1, broadcast n−1 in all, barrier
     ⌈log2 n⌉. Negligible for gradients (576 B per all-reduce at n = 2), it dominates the tiny
     collectives: an 8-byte loss all-reduce puts 296 B on the wire.
  Everything else (ring all-reduce, all-gather, all-to-all, broadcast, send payloads) matches
  the formulas within 0.5 % for arrays from 4 B to 4 MiB at n = 2 and 4.
- `formula`: the algorithm's cost (ring all-reduce 2(n−1)/n · size, ring all-gather and
  reduce-scatter (n−1)/n · size, all-to-all (n−1)/n · size, p2p size, broadcast (n−1) · size),
  the same for every backend: what a ring sends at best, and what NCCL is counted at (its
  protocol overheads are not measured here).

Both are per-rank averages over the group for the symmetric collectives (the group's total is
n times it); a broadcast is recorded on its source, with the whole group's total.

Intra- and inter-node bytes: the replica group of a hierarchical layout (`rep`, and a sync
strategy's background duplicate `rep_bg`; parallel.replicas > 1) is the traffic that crosses
nodes ("inter"); every other group's is "intra". With parallel.replicas = 1 everything counts as
intra, also in a run that spans nodes: which groups cross a node boundary is then not declared.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

GLOO_MESSAGE_BYTES = 144  # control bytes per message of gloo's TCP transport (3 preambles of 48 B)
INTER_GROUPS = ("rep", "rep_bg")  # the groups whose traffic crosses nodes (module docstring)


def gloo_messages(op: str, n: int, count: int | None = None) -> float:
    """Messages gloo sends per rank (broadcast and send: in all) for `op` on n members.

    count: the array's elements for all_reduce / reduce_scatter (its ring skips empty segments),
    the number of messages for send; None: large arrays, one message.
    """
    if op in ("all_reduce", "reduce_scatter"):  # reduce_scatter runs as an all-reduce
        segments = 2 * n if count is None else min(2 * n, count)
        return 2 * (n - 1) / n * segments
    if op == "all_gather":
        return 2.0 * (n - 1)
    if op in ("all_to_all", "broadcast"):  # broadcast: count 0 on the members that only receive
        return float(n - 1 if count is None else count)
    if op == "barrier":
        return float(math.ceil(math.log2(n)))
    if op == "send":
        return float(1 if count is None else count)
    return 0.0


def formula_bytes(op: str, nbytes: int, n: int) -> float:
    """Bytes one rank sends for `op` on an n-member group, by the algorithm's formula.

    nbytes is the size of the whole array: the reduced tensor for all_reduce, the gathered output
    for all_gather, the unscattered input for reduce_scatter and all_to_all, the message for
    send, the broadcast tensor on its source (0 on the other members).
    """
    if n <= 1 and op != "send":
        return 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n * nbytes
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * nbytes
    if op == "broadcast":  # every other member receives one copy; the source records the total
        return float((n - 1) * nbytes)
    if op == "send":
        return float(nbytes)
    if op in ("recv", "barrier"):
        return 0.0
    raise ValueError(f"no byte formula for collective {op!r}")


def default_backend() -> str | None:
    """The default process group's backend in this process, or None when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return None


class WireBytes(float):
    """Bytes on the wire (a float) that carry the same collective's formula bytes as `.formula`.

    Code that records a collective issued outside plait.comm passes `wire_bytes(...)` to
    `CommStats.record` (FSDP2's hooks), and the sync transport re-records a background thread's
    `Record.wire`: both keep the formula this way without knowing it exists.
    """

    __slots__ = ("formula",)

    def __new__(cls, wire: float, formula: float):
        obj = super().__new__(cls, wire)
        obj.formula = float(formula)
        return obj

    def __reduce__(self):
        return (WireBytes, (float(self), self.formula))


def wire_bytes(op: str, nbytes: int, n: int, backend: str | None = "default",
               count: int | None = None) -> WireBytes:
    """Bytes one rank puts on the wire for `op` on an n-member group of `backend`.

    backend: "gloo", "nccl", ...; "default": this process's default group's (the formula when
    there is no process group); None or "formula": the algorithm's formula. gloo differs as the
    module docstring says; `count` as for `gloo_messages`.
    """
    if backend == "default":
        backend = default_backend()
    formula = formula_bytes(op, nbytes, n)
    if backend != "gloo" or (n <= 1 and op != "send"):
        return WireBytes(formula, formula)
    payload = formula_bytes("all_reduce" if op == "reduce_scatter" else op, nbytes, n)
    return WireBytes(payload + GLOO_MESSAGE_BYTES * gloo_messages(op, n, count), formula)


@dataclass
class Record:
    op: str
    group: str
    nbytes: int  # logical array size
    wire: float  # bytes this rank sent, as the backend sends them
    seconds: float  # time spent issuing plus time spent waiting
    step: int
    formula: float = 0.0  # bytes this rank sent by the algorithm's formula


class CommStats:
    """Per-rank log of collectives: totals since the last `reset_step()` and a short history.

    The history (last `history` records) is what a timeout dumps to say where each rank was.
    """

    def __init__(self, history: int = 32):
        self.step = 0
        self.step_bytes = 0.0
        self.step_formula_bytes = 0.0
        self.step_seconds = 0.0
        self.step_by_key: dict[tuple[str, str], float] = defaultdict(float)
        self.step_formula_by_key: dict[tuple[str, str], float] = defaultdict(float)
        self.total_bytes = 0.0
        self.total_formula_bytes = 0.0
        self.total_seconds = 0.0
        self.recent: deque[Record] = deque(maxlen=history)
        self.enabled = True

    def record(self, op: str, group: str, nbytes: int, wire: float, seconds: float,
               formula: float | None = None) -> Record:
        """Count one collective; `formula` defaults to the one `wire` carries (a WireBytes), else
        to `wire` itself."""
        formula = getattr(wire, "formula", wire) if formula is None else formula
        rec = Record(op, group, nbytes, wire, seconds, self.step, formula)
        if self.enabled:
            self.step_bytes += wire
            self.step_formula_bytes += formula
            self.step_seconds += seconds
            self.step_by_key[(op, group)] += wire
            self.step_formula_by_key[(op, group)] += formula
            self.total_bytes += wire
            self.total_formula_bytes += formula
            self.total_seconds += seconds
        self.recent.append(rec)
        return rec

    def add_wait(self, rec: Record, seconds: float) -> None:
        rec.seconds += seconds
        if self.enabled:
            self.step_seconds += seconds
            self.total_seconds += seconds

    def reset_step(self, step: int | None = None) -> dict:
        """Return this step's totals and start counting the next step.

        comm_bytes / by_op: what went on the wire; formula_bytes / formula_by_op: the same
        collectives by the algorithms' formulas; inter_bytes / inter_formula_bytes: their part on
        the groups that cross nodes (INTER_GROUPS), the rest is intra-node.
        """
        inter = [k for k in self.step_by_key if k[1] in INTER_GROUPS]
        out = {
            "inter_bytes": sum(self.step_by_key[k] for k in inter),
            "inter_formula_bytes": sum(self.step_formula_by_key[k] for k in inter),
            "comm_bytes": self.step_bytes,
            "formula_bytes": self.step_formula_bytes,
            "comm_s": self.step_seconds,
            "by_op": {f"{op}/{g}": b for (op, g), b in self.step_by_key.items()},
            "formula_by_op": {f"{op}/{g}": b for (op, g), b in self.step_formula_by_key.items()},
        }
        self.step_bytes = 0.0
        self.step_formula_bytes = 0.0
        self.step_seconds = 0.0
        self.step_by_key = defaultdict(float)
        self.step_formula_by_key = defaultdict(float)
        self.step = self.step + 1 if step is None else step
        return out

    def describe_recent(self) -> str:
        lines = [
            f"  step {r.step}: {r.op} on {r.group} ({r.nbytes} B, {r.seconds * 1e3:.1f} ms)"
            for r in self.recent
        ]
        return "\n".join(lines) if lines else "  (none)"
