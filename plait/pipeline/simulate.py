"""Run every rank's pipeline program together, in one process, with no tensors.

`simulate(programs, p, v)` is the proof that a schedule is well formed:
- each rank's program is valid on its own: every (micro-batch, chunk) is forwarded once and
  backwarded once (or B then W once each), a forward comes after the receive of its input and
  before its backward, a backward comes after the receive of its output gradient, sends follow
  the compute that produced them, and the program ends with one `OptimizerStep`;
- the ranks fit together: per direction between two ranks, the k-th send and the k-th receive
  name the same micro-batch and the same stage boundary;
- it cannot deadlock: a batch of communication (consecutive send/receive instructions) blocks
  its rank until every one of its messages has been posted by the peer (rendezvous, the
  strictest model; NCCL's grouped p2p behaves so). If no rank can move, the error says where
  every rank stands.

It also yields the timing of the program under given compute costs (communication free): the
makespan, each rank's idle (bubble) fraction and its peak number of micro-batches in flight
(forward done, backward not yet complete).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from plait.pipeline.schedules import (
    COMM,
    SENDS,
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    ScheduleError,
    SendActivation,
    SendGrad,
    place,
    stage_of,
)

DEFAULT_COSTS = {Forward: 1.0, Backward: 2.0, BackwardInput: 1.0, BackwardWeight: 1.0}


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    peak_in_flight: list[int]
    counts: list[Counter]
    timeline: list[list[tuple[object, float, float]]] = field(repr=False)

    @property
    def bubble(self) -> list[float]:
        return [1.0 - b / self.makespan for b in self.busy]


class _Rank:
    def __init__(self, rank: int, p: int, v: int):
        self.rank, self.p, self.v, self.last = rank, p, v, p * v - 1
        self.fwd: set = set()
        self.bwd_in: set = set()  # input gradient computed (Backward or BackwardInput)
        self.done: set = set()  # backward complete (Backward, or BackwardWeight)
        self.split: set = set()
        self.got_act: set = set()
        self.got_grad: set = set()
        self.in_flight = 0
        self.peak = 0
        self.stepped = False

    def fail(self, ins, why: str):
        raise ScheduleError(f"pp rank {self.rank}: {ins}: {why}")

    def compute(self, ins) -> None:
        key = (ins.mb, ins.chunk)
        s = stage_of(self.rank, ins.chunk, self.p)
        if not 0 <= ins.chunk < self.v:
            self.fail(ins, f"chunk outside 0..{self.v - 1}")
        if self.stepped:
            self.fail(ins, "after OptimizerStep")
        if isinstance(ins, Forward):
            if key in self.fwd:
                self.fail(ins, "forwarded twice")
            if s > 0 and key not in self.got_act:
                self.fail(ins, "forward before its input activation was received")
            self.fwd.add(key)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        elif isinstance(ins, (Backward, BackwardInput)):
            if key not in self.fwd:
                self.fail(ins, "backward before its forward")
            if key in self.bwd_in:
                self.fail(ins, "backward twice")
            if s < self.last and key not in self.got_grad:
                self.fail(ins, "backward before its output gradient was received")
            self.bwd_in.add(key)
            if isinstance(ins, Backward):
                self.done.add(key)
                self.in_flight -= 1
            else:
                self.split.add(key)
        elif isinstance(ins, BackwardWeight):
            if key not in self.split or key in self.done:
                self.fail(ins, "weight gradient without a preceding BackwardInput, or twice")
            self.done.add(key)
            self.in_flight -= 1

    def check_comm(self, ins) -> None:
        s = stage_of(self.rank, ins.chunk, self.p)
        key = (ins.mb, ins.chunk)
        if isinstance(ins, SendActivation):
            ok = key in self.fwd and s < self.last and ins.peer == place(s + 1, self.p)[0]
        elif isinstance(ins, SendGrad):
            ok = key in self.bwd_in and s > 0 and ins.peer == place(s - 1, self.p)[0]
        elif isinstance(ins, RecvActivation):
            ok = s > 0 and ins.peer == place(s - 1, self.p)[0]
        else:
            ok = s < self.last and ins.peer == place(s + 1, self.p)[0]
        if not ok:
            self.fail(ins,
                      "send before its compute, wrong peer, or a message at the pipeline's end")

    def finish(self, m: int) -> None:
        want = {(mb, c) for mb in range(m) for c in range(self.v)}
        if self.fwd != want or self.done != want:
            raise ScheduleError(f"pp rank {self.rank}: forwarded {len(self.fwd)}, finished the "
                                f"backward of {len(self.done)} of the {len(want)} "
                                "(micro-batch, chunk) pairs")
        if not self.stepped:
            raise ScheduleError(f"pp rank {self.rank}: program does not end with OptimizerStep")


def _boundary(ins, rank: int, p: int) -> tuple[str, int, int]:
    """(kind, micro-batch, lower stage of the boundary) a message crosses."""
    s = stage_of(rank, ins.chunk, p)
    if isinstance(ins, SendActivation):
        return "act", ins.mb, s
    if isinstance(ins, RecvActivation):
        return "act", ins.mb, s - 1
    if isinstance(ins, SendGrad):
        return "grad", ins.mb, s - 1
    return "grad", ins.mb, s


def simulate(programs: list[list], p: int, v: int = 1, m: int | None = None,
             costs: dict | None = None, train: bool = True, rendezvous: bool = True) -> SimResult:
    """Run all p programs together; raise ScheduleError on any inconsistency or deadlock.

    `rendezvous=True`: a batch waits until the peers have posted all its messages (the deadlock
    proof). `rendezvous=False`: sends complete at once and only receives wait, as the runtime
    behaves; use it for timing. `train=False` checks a forward-only program.
    """
    if len(programs) != p:
        raise ScheduleError(f"{len(programs)} programs for {p} ranks")
    costs = {**DEFAULT_COSTS, **(costs or {})}
    ranks = [_Rank(r, p, v) for r in range(p)]
    if m is None:
        m = len({i.mb for prog in programs for i in prog if isinstance(i, Forward)})
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    counts = [Counter(type(i).__name__ for i in prog) for prog in programs]
    timeline: list[list] = [[] for _ in range(p)]
    # (src, dst, "send"|"recv") -> [(ins, t)]
    posted: dict[tuple[int, int, str], list] = defaultdict(list)
    blocked: list[list | None] = [None] * p  # this rank's posted batch: [(channel key, index, ins)]

    def post_batch(r: int) -> None:
        batch = []
        prog = programs[r]
        while pos[r] < len(prog) and isinstance(prog[pos[r]], COMM):
            ins = prog[pos[r]]
            ranks[r].check_comm(ins)
            if not 0 <= ins.peer < p or ins.peer == r:
                ranks[r].fail(ins, "peer is not another pp rank")
            key = (r, ins.peer, "send") if isinstance(ins, SENDS) else (ins.peer, r, "recv")
            posted[key].append((ins, clock[r]))
            batch.append((key, len(posted[key]) - 1, ins))
            pos[r] += 1
        blocked[r] = batch

    def try_complete(r: int) -> bool:
        t_done = clock[r]
        for (src, dst, side), k, _ in blocked[r]:
            if side == "send" and not rendezvous:
                continue
            other = posted[(src, dst, "recv" if side == "send" else "send")]
            if len(other) <= k:
                return False
            t_done = max(t_done, other[k][1])
        for _, _, ins in blocked[r]:
            if isinstance(ins, RecvActivation):
                ranks[r].got_act.add((ins.mb, ins.chunk))
            elif isinstance(ins, RecvGrad):
                ranks[r].got_grad.add((ins.mb, ins.chunk))
        clock[r] = t_done
        blocked[r] = None
        return True

    while True:
        moved = False
        for r in range(p):
            if blocked[r] is not None:
                if not try_complete(r):
                    continue
                moved = True
            prog = programs[r]
            while pos[r] < len(prog) and not isinstance(prog[pos[r]], COMM):
                ins = prog[pos[r]]
                if isinstance(ins, OptimizerStep):
                    if not train or ranks[r].stepped:
                        ranks[r].fail(ins, "unexpected optimizer step")
                    ranks[r].stepped = True
                else:
                    ranks[r].compute(ins)
                    dt = costs[type(ins)]
                    timeline[r].append((ins, clock[r], clock[r] + dt))
                    clock[r] += dt
                    busy[r] += dt
                pos[r] += 1
                moved = True
            if pos[r] < len(prog):
                post_batch(r)
                moved = True
        if all(pos[r] == len(programs[r]) and blocked[r] is None for r in range(p)):
            break
        if not moved:
            where = "; ".join(f"rank {r} at {pos[r]}/{len(programs[r])} waiting on "
                              f"{[str(i) for _, _, i in blocked[r] or []]}" for r in range(p))
            raise ScheduleError(f"deadlock: {where}")
    for r in range(p):
        if train:
            ranks[r].finish(m)
        elif len(ranks[r].fwd) != m * v:
            raise ScheduleError(f"pp rank {r}: forwarded {len(ranks[r].fwd)} of {m * v} "
                                "(micro-batch, chunk) pairs")
    for src, dst in {(a, b) for a, b, _ in posted}:
        sends, recvs = posted.get((src, dst, "send"), []), posted.get((src, dst, "recv"), [])
        if len(sends) != len(recvs):
            raise ScheduleError(f"pp rank {src} sends {len(sends)} messages to rank {dst}, which "
                                f"receives {len(recvs)}")
        for k, ((a, _), (b, _)) in enumerate(zip(sends, recvs)):
            if _boundary(a, src, p) != _boundary(b, dst, p):
                raise ScheduleError(f"message {k} from pp rank {src} to {dst} does not match: "
                                    f"rank {src} sends {a}, rank {dst} receives {b}")
    return SimResult(max(clock), busy, [rk.peak for rk in ranks], counts, timeline)
