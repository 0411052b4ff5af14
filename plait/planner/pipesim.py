"""Time plait's own pipeline programs: the instruction streams `plait.pipeline.schedules.build`
hands the runtime, executed with per-instruction costs instead of tensors.

Per pp rank the program is a sequence of computes (Forward / Backward / BackwardInput /
BackwardWeight of a (micro-batch, chunk)) and batches of messages. Costs: a compute of stage
s = chunk·p + rank takes `costs[kind][s]` seconds; a message arrives `p2p` seconds after its send
was posted (α + n/B on the link between the two ranks). As in the runtime, a send costs its
sender nothing (it is asynchronous); the runtime waits a batch's one handle before the first
compute that reads from it, which follows the batch directly, so here a rank waits for the
batch's receives when the batch ends. Communication inside a compute (tensor parallelism) is
part of that compute's cost.

Results: makespan, each rank's busy time and bubble, the timeline (for the Gantt chart) and the
peak of activations in flight: a (micro-batch, chunk) is in flight from its forward until its
backward completes (its W under ZB-H1), the runtime's release point.

Speed: `compiled` rebuilds build's programs as tuples (the same unit-cost timeline and message
placement as schedules.lockstep, equal op for op, tested) once per (schedule, p, m, v); timings
are cached per cost vector.
Beyond `MAX_COMPUTES` compute instructions the step is simulated at two smaller micro-batch
counts m_a > m_b of the same schedule (`points`) and extrapolated linearly in m (every schedule
here is periodic in m once the pipeline is full); tests check the extrapolation against full
simulations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from plait.pipeline.schedules import (
    COMM,
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    check,
    stage_of,
)

MAX_COMPUTES = 2_000
KIND = {Forward: 0, Backward: 1, BackwardInput: 1, BackwardWeight: 2}  # F, B (or B-input), W


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    timeline: (
        list[list[tuple[int, int, int, float, float]]] | None
    )  # per rank: (kind, mb, chunk, t0, t1)
    m: int
    extrapolated: bool = False

    @property
    def bubbles(self) -> list[float]:
        return [1.0 - b / self.makespan if self.makespan else 0.0 for b in self.busy]


def from_programs(programs: list[list]) -> tuple:
    """plait.pipeline.schedules.build's programs in the compact form `_run` executes: per rank
    (0, kind, mb, chunk) computes, (1, key) sends, (2, key) receives, (3,) where a batch of messages
    ends; key = (0 activation | 1 gradient, micro-batch, lower stage of the boundary)."""
    p = len(programs)
    out = []
    for r, prog in enumerate(programs):
        ops, in_batch = [], False
        for ins in prog:
            if isinstance(ins, OptimizerStep):
                continue
            if isinstance(ins, COMM):
                s = stage_of(r, ins.chunk, p)
                lower = s if isinstance(ins, (SendActivation, RecvGrad)) else s - 1
                kind = 0 if isinstance(ins, (SendActivation, RecvActivation)) else 1
                ops.append(
                    (1 if isinstance(ins, (SendActivation, SendGrad)) else 2, (kind, ins.mb, lower))
                )
                in_batch = True
                continue
            if in_batch:
                ops.append((3,))
                in_batch = False
            ops.append((0, KIND[type(ins)], ins.mb, ins.chunk))
        if in_batch:
            ops.append((3,))
        out.append(tuple(ops))
    return tuple(out)


@lru_cache(maxsize=256)
def compiled(schedule: str, p: int, m: int, v: int) -> tuple:
    """The compact programs of `from_programs(build(...))`, computed directly: the same unit-cost
    timeline and message placement as schedules.lockstep (tests check equality op for op), with
    tuples instead of instruction objects and a dependency-driven walk instead of rounds."""
    orders = compute_orders(schedule, p, m, v)
    unit = (1.0, 2.0, 1.0)  # schedules.UNIT_COSTS: F 1, B 2 (B-input 1), W 1
    last = p * v - 1
    seqs = []
    for r in range(p):
        seq = []
        for ins in orders[r]:
            k = KIND[type(ins)]
            seq.append((k, ins.mb, ins.chunk, 1.0 if isinstance(ins, BackwardInput) else unit[k]))
        seqs.append(seq)
    ends: dict = {}
    waiting: dict = {}
    tl: list[list] = [[] for _ in range(p)]
    pos, free = [0] * p, [0.0] * p
    ready = list(range(p - 1, -1, -1))
    while ready:
        r = ready.pop()
        seq = seqs[r]
        while pos[r] < len(seq):
            k, mb, c, cost = seq[pos[r]]
            s = c * p + r
            if k == 0:
                dep, key = ((0, mb, s - 1) if s > 0 else None), (0, mb, s)
            elif k == 2:
                dep, key = (1, mb, s), (2, mb, s)
            else:
                dep, key = ((1, mb, s + 1) if s < last else (0, mb, s)), (1, mb, s)
            if dep is not None and dep not in ends:
                waiting.setdefault(dep, []).append(r)
                break
            start = max(free[r], ends[dep] if dep is not None else 0.0)
            free[r] = ends[key] = start + cost
            tl[r].append((k, mb, c, start, free[r]))
            pos[r] += 1
            ready.extend(waiting.pop(key, ()))
    if any(pos[r] < len(seqs[r]) for r in range(p)):
        raise RuntimeError(f"{schedule}: compute orders wait on each other (p={p}, m={m}, v={v})")
    events: list[list] = [[] for _ in range(p)]
    for r in range(p):
        for k, mb, c, t0, t1 in tl[r]:
            events[r].append((t0, 1, (0, k, mb, c)))
            s = c * p + r
            if k == 0 and s < last:
                events[r].append((t1, 0, (1, (0, mb, s))))
                events[(s + 1) % p].append((t1, 0, (2, (0, mb, s))))
            elif k == 1 and s > 0:
                events[r].append((t1, 0, (1, (1, mb, s - 1))))
                events[(s - 1) % p].append((t1, 0, (2, (1, mb, s - 1))))
    out = []
    for ev in events:
        ops, in_batch = [], False
        for _, _, op in sorted(ev, key=lambda e: (e[0], e[1])):
            if op[0] == 0 and in_batch:
                ops.append((3,))
            in_batch = op[0] != 0
            ops.append(op)
        if in_batch:
            ops.append((3,))
        out.append(tuple(ops))
    return tuple(out)


def _run(progs: tuple, p: int, costs: tuple, p2p: float, record: bool) -> SimResult:
    """Execute the compiled programs; costs[kind][stage]."""
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    wait = [0.0] * p  # latest arrival among the current batch's receives
    sent: dict = {}
    tl = [[] for _ in range(p)] if record else None
    remaining = sum(len(x) for x in progs)
    while remaining:
        moved = False
        for r in range(p):
            prog, i = progs[r], pos[r]
            n = len(prog)
            while i < n:
                op = prog[i]
                tag = op[0]
                if tag == 0:
                    _, kind, mb, chunk = op
                    dt = costs[kind][chunk * p + r]
                    t0 = clock[r]
                    clock[r] = t0 + dt
                    busy[r] += dt
                    if record:
                        tl[r].append((kind, mb, chunk, t0, t0 + dt))
                elif tag == 1:
                    sent[op[1]] = clock[r] + p2p
                elif tag == 2:
                    t = sent.get(op[1])
                    if t is None:
                        break
                    if t > wait[r]:
                        wait[r] = t
                else:
                    if wait[r] > clock[r]:
                        clock[r] = wait[r]
                    wait[r] = 0.0
                i += 1
            if i != pos[r]:
                remaining -= i - pos[r]
                pos[r] = i
                moved = True
        if not moved:
            raise RuntimeError(
                "pipeline programs wait on each other (a schedule bug plait.pipeline.simulate "
                "would also report)"
            )
    return SimResult(max(clock), busy, tl, 0)


def points(schedule: str, p: int) -> tuple[int, int]:
    """The two micro-batch counts (m_a > m_b) a long step is extrapolated from: past them every
    schedule's step grows linearly in m (GPipe from m = p; 1F1B, ZB-H1's list scheduling and
    interleaved 1F1B once warm-up and unequal stages have settled, from 2p; measured errors < 0.3%
    at m = 8p, checked in tests/test_planner.py)."""
    if schedule == "gpipe":
        return p + 2, p + 1
    return 3 * p, 2 * p


@lru_cache(maxsize=4096)
def _timed(schedule: str, p: int, m: int, v: int, costs: tuple, p2p: float) -> SimResult:
    res = _run(compiled(schedule, p, m, v), p, costs, p2p, record=False)
    res.m = m
    return res


def simulate(
    schedule: str, p: int, m: int, v: int, costs: tuple, p2p: float, timeline: bool = False
) -> SimResult:
    """Time one training step's pipeline. costs = (F, B, W per stage) in seconds,
    each a tuple of p·v values (W is used by zb_h1 only; B there is the input-gradient part)."""
    if timeline:
        res = _run(compiled(schedule, p, m, v), p, costs, p2p, record=True)
        res.m = m
        return res
    ma, mb = points(schedule, p)
    if p * m * v <= MAX_COMPUTES or m <= ma:
        return _timed(schedule, p, m, v, costs, p2p)
    a, b = _timed(schedule, p, ma, v, costs, p2p), _timed(schedule, p, mb, v, costs, p2p)
    k = (m - ma) / (ma - mb)
    busy = [x + k * (x - y) for x, y in zip(a.busy, b.busy)]
    return SimResult(a.makespan + k * (a.makespan - b.makespan), busy, None, m, extrapolated=True)


def compute_orders(schedule: str, p: int, m: int, v: int) -> list[list]:
    """Each rank's compute order: the instruction stream without its messages (schedules.build
    interleaves messages into exactly these orders), from the schedule's own generators."""
    from plait.pipeline import schedules as S

    check(schedule, p, m, v)
    if schedule == "zb_h1":
        return S.zb_h1_orders(p, m)
    if schedule == "gpipe":
        return [list(S.gpipe_order(r, p, m)) for r in range(p)]
    if schedule == "1f1b":
        return [list(S.one_f_one_b_order(r, p, m)) for r in range(p)]
    return [list(S.interleaved_order(r, p, m, v)) for r in range(p)]


@lru_cache(maxsize=64)
def _zb_orders(p: int, m: int) -> tuple:
    return tuple(tuple(o) for o in compute_orders("zb_h1", p, m, 1))


@lru_cache(maxsize=4096)
def _in_flight_events(schedule: str, p: int, m: int, v: int, rank: int) -> tuple:
    """The +chunk / −(chunk+1) events of activations held on `rank`, in program order: held from a
    Forward until its Backward (its BackwardWeight under ZB-H1, the runtime's release point)."""
    from plait.pipeline import schedules as S

    check(schedule, p, m, v)
    if schedule == "zb_h1":
        order = _zb_orders(p, m)[rank]
    elif schedule == "gpipe":
        order = S.gpipe_order(rank, p, m)
    elif schedule == "1f1b":
        order = S.one_f_one_b_order(rank, p, m)
    else:
        order = S.interleaved_order(rank, p, m, v)
    ev = []
    for ins in order:
        if isinstance(ins, Forward):
            ev.append(ins.chunk)
        elif isinstance(ins, (Backward, BackwardWeight)):
            ev.append(-ins.chunk - 1)
    return tuple(ev)


@lru_cache(maxsize=65536)
def peak_in_flight(schedule: str, p: int, m: int, v: int, rank: int, per_chunk: tuple) -> float:
    """Peak of Σ per_chunk[c] over the (micro-batch, chunk) pairs in flight on `rank`.

    Beyond two small micro-batch counts the count is extrapolated linearly in m (for GPipe it is
    m·chunk bytes, for the 1F1B family and ZB-H1 it stops growing)."""
    # counts stop changing (GPipe: grow by one per micro-batch) once m reaches p, or once the
    # interleaved warm-up of 2(p−r−1) + (v−1)p forwards fits (m ≥ 2p); tests check full counts
    ma, mb = (3 * p, 2 * p) if schedule == "interleaved_1f1b" else (p + 1, p)
    if m <= ma:
        return _peak(_in_flight_events(schedule, p, m, v, rank), per_chunk)
    a = _peak(_in_flight_events(schedule, p, ma, v, rank), per_chunk)
    b = _peak(_in_flight_events(schedule, p, mb, v, rank), per_chunk)
    return a + (m - ma) * (a - b) / (ma - mb)


def _peak(events: tuple, per_chunk: tuple) -> float:
    cur = best = 0.0
    for e in events:
        cur += per_chunk[e] if e >= 0 else -per_chunk[-e - 1]
        best = max(best, cur)
    return best


def gantt(schedule: str, p: int, m: int, v: int, costs: tuple, p2p: float, path) -> str:
    """Draw the simulated step with plait.pipeline.timeline (the chart the runtime draws)."""
    from plait.pipeline.timeline import Timeline

    res = simulate(schedule, p, m, v, costs, p2p, timeline=True)
    ranks = [
        [[float(k), float(mb), float(c), t0, t1] for k, mb, c, t0, t1 in rows]
        for rows in res.timeline
    ]
    Timeline(ranks, schedule, p, m, v, res.bubbles).plot(path)
    return str(path)
