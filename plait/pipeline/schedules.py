"""Pipeline schedules as data: pure generators of small instruction objects, one program per rank.

Stages. p ranks each hold v model chunks; chunk c of rank r is global stage s = c·p + r (the
interleaved layout: rank 0 holds stages 0, p, 2p, ...). There are S = p·v stages; stage 0 reads
the model input, stage S−1 computes the loss. Micro-batches are numbered 0..m−1.

Instructions. Compute: `Forward(mb, chunk)`, `Backward(mb, chunk)` (input and weight gradients
together), or, for the zero-bubble schedule, `BackwardInput` (B: gradient of the stage input
only, on the critical path) then `BackwardWeight` (W: the weight gradients, deferrable).
Communication, with `peer` a rank of the pp group: `SendActivation` / `RecvActivation` carry a
forward's output to the next stage, `SendGrad` / `RecvGrad` a backward's input gradient to the
previous one. A run of consecutive communication instructions is one batch: the runtime posts it
with a single batched isend/irecv. A training program ends with `OptimizerStep()`.

Placement. A schedule is first a compute order per rank. `lockstep` places the messages: on
the unit-cost timeline of those orders each result is sent when its compute ends, and sender and
receiver both put the message in their batch of that instant. Every batch therefore waits only
for batches of the same instant, which makes the programs deadlock-free even when a batch
blocks until all its messages are matched (rendezvous, as NCCL's grouped p2p behaves); the
pairing of a forward's send with the next backward's receive (Megatron's
send_forward_recv_backward) falls out of it. Messages between two ranks are matched in order per
direction; `plait.pipeline.simulate` checks all of this over all ranks at once.

Schedules: GPipe (all forwards, then all backwards; m micro-batches in flight), 1F1B
(Narayanan et al. 2021; at most p in flight), interleaved 1F1B (Megatron's virtual stages;
needs m divisible by p), ZB-H1 (Qi et al. 2023: B/W split, W deferred into the bubbles, the
same in-flight bound as 1F1B).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")


class ScheduleError(RuntimeError):
    pass


# -- instructions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    mb: int
    chunk: int = 0


@dataclass(frozen=True)
class Backward:
    mb: int
    chunk: int = 0


@dataclass(frozen=True)
class BackwardInput:
    mb: int
    chunk: int = 0


@dataclass(frozen=True)
class BackwardWeight:
    mb: int
    chunk: int = 0


@dataclass(frozen=True)
class SendActivation:
    mb: int
    chunk: int  # the producing chunk of this rank
    peer: int


@dataclass(frozen=True)
class RecvActivation:
    mb: int
    chunk: int  # the consuming chunk of this rank
    peer: int


@dataclass(frozen=True)
class SendGrad:
    mb: int
    chunk: int  # the chunk whose input gradient is sent
    peer: int


@dataclass(frozen=True)
class RecvGrad:
    mb: int
    chunk: int  # the chunk whose output gradient is received
    peer: int


@dataclass(frozen=True)
class OptimizerStep:
    pass


Instr = (Forward | Backward | BackwardInput | BackwardWeight | SendActivation | RecvActivation
         | SendGrad | RecvGrad | OptimizerStep)
COMPUTE = (Forward, Backward, BackwardInput, BackwardWeight)
COMM = (SendActivation, RecvActivation, SendGrad, RecvGrad)
SENDS = (SendActivation, SendGrad)


def stage_of(rank: int, chunk: int, p: int) -> int:
    return chunk * p + rank


def place(stage: int, p: int) -> tuple[int, int]:
    """Global stage -> (rank, chunk)."""
    return stage % p, stage // p


# -- compute orders (one rank) ---------------------------------------------------------------
def gpipe_order(rank: int, p: int, m: int) -> Iterator[Instr]:
    yield from (Forward(i) for i in range(m))
    yield from (Backward(i) for i in range(m))


def one_f_one_b_order(rank: int, p: int, m: int) -> Iterator[Instr]:
    """Warm up with p−rank−1 forwards, then alternate one forward and one backward, then drain."""
    warmup = min(p - rank - 1, m)
    yield from (Forward(i) for i in range(warmup))
    for i in range(m - warmup):
        yield Forward(warmup + i)
        yield Backward(i)
    yield from (Backward(i) for i in range(m - warmup, m))


def interleaved_order(rank: int, p: int, m: int, v: int) -> Iterator[Instr]:
    """Megatron's interleaved 1F1B: forwards walk the chunks in groups of p micro-batches.

    The k-th forward of a rank is micro-batch (k div pv)·p + k mod p of chunk (k div p) mod v;
    backwards walk the chunks in reverse. Warm-up: 2(p−rank−1) + (v−1)p forwards.
    """
    if m % p:
        raise ScheduleError(f"interleaved 1F1B needs the micro-batch count m = {m} to be a "
                            f"multiple of p = {p}")
    total = m * v

    def mb_chunk(k: int, forward: bool) -> tuple[int, int]:
        c = (k // p) % v
        return (k // (p * v)) * p + k % p, (c if forward else v - 1 - c)

    warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
    for k in range(warmup):
        yield Forward(*mb_chunk(k, True))
    for i in range(total - warmup):
        yield Forward(*mb_chunk(warmup + i, True))
        yield Backward(*mb_chunk(i, False))
    for k in range(total - warmup, total):
        yield Backward(*mb_chunk(k, False))


def zb_h1_orders(p: int, m: int) -> list[list[Instr]]:
    """ZB-H1 for every rank, built by list scheduling with unit costs F = B = W = 1.

    Each time a rank is free it runs, in order of preference: the input-backward B of the oldest
    micro-batch whose gradient has arrived (it unblocks the previous stage), the next forward if
    its input has arrived and fewer than p micro-batches are in flight on the rank (forward done,
    weight gradient not yet: 1F1B's peak, that of its first stage), else a deferred W. W thus
    fills what would be bubbles, and the gradient chain between stages costs B instead of B + W.
    With unit costs a step takes at most 3m + p + 1 (ZB-H1's ideal: 3m + p − 1; 1F1B: 3(m + p − 1)).
    """
    nf = [0] * p  # next forward per rank
    nb = [0] * p  # next input-backward per rank (in micro-batch order)
    pending_w: list[list[int]] = [[] for _ in range(p)]
    done_w = [0] * p
    act_at = [[0 if r == 0 else None for _ in range(m)] for r in range(p)]  # input ready times
    # output-gradient ready times (last rank: its own forward)
    grad_at = [[None] * m for _ in range(p)]
    orders: list[list[Instr]] = [[] for _ in range(p)]
    t = 0
    while any(done_w[r] < m for r in range(p)):
        produced = []
        for r in range(p):
            b, f = nb[r], nf[r]
            if b < f and grad_at[r][b] is not None and grad_at[r][b] <= t:
                orders[r].append(BackwardInput(b))
                nb[r] += 1
                pending_w[r].append(b)
                if r > 0:
                    produced.append(("grad", r - 1, b))
            elif f < m and act_at[r][f] is not None and act_at[r][f] <= t and f - done_w[r] < p:
                orders[r].append(Forward(f))
                nf[r] += 1
                produced.append(("act", r + 1, f) if r < p - 1 else ("grad", r, f))
            elif pending_w[r]:
                orders[r].append(BackwardWeight(pending_w[r].pop(0)))
                done_w[r] += 1
        for kind, r, mb in produced:  # results of step t are usable from t + 1
            (act_at if kind == "act" else grad_at)[r][mb] = t + 1
        t += 1
        if t > 10 * (m + p) * 3:
            raise ScheduleError(f"ZB-H1 list scheduling did not finish for p={p}, m={m}")
    return orders


# -- communication -----------------------------------------------------------------------------
UNIT_COSTS = {Forward: 1, Backward: 2, BackwardInput: 1, BackwardWeight: 1}


def timeline(orders: list[list[Instr]], p: int, v: int = 1, costs: dict | None = None
             ) -> list[list[tuple[Instr, float, float]]]:
    """Start and end of every compute when each rank runs its order as early as its inputs allow.

    A forward needs the previous stage's forward of the same micro-batch to have ended, a
    backward the next stage's (input-)backward; communication takes no time. Raises
    ScheduleError when the orders wait on each other in a cycle.
    """
    costs = {**UNIT_COSTS, **(costs or {})}
    last = p * v - 1
    ends: dict[tuple, float] = {}  # ("F" | "B" | "W", mb, stage) -> end time
    out: list[list] = [[] for _ in range(p)]
    pos, free = [0] * p, [0.0] * p
    while any(pos[r] < len(orders[r]) for r in range(p)):
        moved = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                ins = orders[r][pos[r]]
                s = stage_of(r, ins.chunk, p)
                if isinstance(ins, Forward):
                    dep = ("F", ins.mb, s - 1) if s > 0 else None
                    key = ("F", ins.mb, s)
                elif isinstance(ins, BackwardWeight):
                    dep, key = ("B", ins.mb, s), ("W", ins.mb, s)
                else:
                    dep = ("B", ins.mb, s + 1) if s < last else ("F", ins.mb, s)
                    key = ("B", ins.mb, s)
                if dep is not None and dep not in ends:
                    break
                start = max(free[r], ends[dep] if dep is not None else 0.0)
                free[r] = ends[key] = start + costs[type(ins)]
                out[r].append((ins, start, free[r]))
                pos[r] += 1
                moved = True
        if not moved:
            stuck = {r: orders[r][pos[r]] for r in range(p) if pos[r] < len(orders[r])}
            raise ScheduleError(f"compute orders wait on each other: {stuck}")
    return out


def lockstep(orders: list[list[Instr]], p: int, v: int = 1) -> list[list[Instr]]:
    """Every rank's program: its computes, with each message in a batch stamped by the time it is
    sent.

    On the unit-cost timeline each result is sent when its compute ends, and the receiver posts
    the receive in its batch of that same instant, so every batch only waits for batches of the
    same instant on its peers: by induction over time no rank can wait forever, even under
    rendezvous semantics. Per direction at most one message leaves a rank per instant, so the
    order of messages is the same on both sides.
    """
    tl = timeline(orders, p, v)
    last = p * v - 1
    # (time, 0 comm | 1 compute, ins)
    events: list[list[tuple[float, int, Instr]]] = [[] for _ in range(p)]
    for r in range(p):
        for ins, start, end in tl[r]:
            events[r].append((start, 1, ins))
            s = stage_of(r, ins.chunk, p)
            if isinstance(ins, Forward) and s < last:
                q, c = place(s + 1, p)
                events[r].append((end, 0, SendActivation(ins.mb, ins.chunk, q)))
                events[q].append((end, 0, RecvActivation(ins.mb, c, r)))
            elif isinstance(ins, (Backward, BackwardInput)) and s > 0:
                q, c = place(s - 1, p)
                events[r].append((end, 0, SendGrad(ins.mb, ins.chunk, q)))
                events[q].append((end, 0, RecvGrad(ins.mb, c, r)))
    # at equal times communication goes first: a compute starting at t may need what arrives at t
    return [[ins for _, _, ins in sorted(ev, key=lambda e: (e[0], e[1]))] for ev in events]


def _orders(name: str, p: int, m: int, v: int) -> list[list[Instr]]:
    if name == "gpipe":
        return [list(gpipe_order(r, p, m)) for r in range(p)]
    if name == "1f1b":
        return [list(one_f_one_b_order(r, p, m)) for r in range(p)]
    if name == "interleaved_1f1b":
        return [list(interleaved_order(r, p, m, v)) for r in range(p)]
    return zb_h1_orders(p, m)


@lru_cache(maxsize=64)
def _programs(name: str, p: int, m: int, v: int) -> tuple[tuple[Instr, ...], ...]:
    return tuple(tuple(prog) for prog in lockstep(_orders(name, p, m, v), p, v))


def build(name: str, rank: int, p: int, m: int, v: int = 1) -> list[Instr]:
    """The full program (compute + communication + optimizer step) of pp rank `rank`."""
    check(name, p, m, v)
    return [*_programs(name, p, m, v)[rank], OptimizerStep()]


def final_grads(program: list[Instr]) -> dict[int, Instr]:
    """Per chunk, the program's last instruction that produces weight gradients for it (a
    Backward, or under ZB-H1 a BackwardWeight): after it the chunk's gradients of the step are
    final, and the data-parallel exchange of them can start."""
    return {ins.chunk: ins for ins in program if isinstance(ins, (Backward, BackwardWeight))}


def forward_only(rank: int, p: int, m: int, v: int = 1) -> list[Instr]:
    """Evaluation: forwards only, in groups of p micro-batches per chunk; any m >= 1."""
    order = [Forward(mb, c) for g in range(0, m, p) for c in range(v)
             for mb in range(g, min(g + p, m))]
    return lockstep([order] * p, p, v)[rank]


def theoretical_bubble(name: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a step with equal stages and free communication
    (T_F = T_W = T_B/2 for ZB-H1's B+W).

    GPipe, 1F1B: (p−1)/(m+p−1). Interleaved: the ramp shrinks v-fold, (p−1)/(vm+p−1). ZB-H1 (Qi et
    al.): a bubble of (p−1)(T_F + T_B − T_W) = (p−1)·T_F against 3m·T_F of work, (p−1)/(3m+p−1).
    """
    if name == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    if name == "zb_h1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


def check(name: str, p: int, m: int, v: int) -> None:
    """Raise ScheduleError for a combination the schedule cannot run."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}: choose one of "
                            f"{', '.join(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise ScheduleError(f"p = {p}, m = {m}, v = {v}: all must be positive")
    if m < p:
        raise ScheduleError(f"{m} micro-batches for {p} pipeline stages: a pipeline step needs "
                            "m >= p")
    if v > 1 and p == 1:
        raise ScheduleError("virtual stages need at least two pipeline ranks")
    if v > 1 and name != "interleaved_1f1b":
        raise ScheduleError(f"{v} virtual stages per rank need the interleaved_1f1b schedule, not "
                            f"{name}")
    if name == "interleaved_1f1b" and m % p:
        raise ScheduleError(f"interleaved 1F1B needs the micro-batch count m = {m} to be a "
                            f"multiple of p = {p}")
