"""Per-instruction costs of measured pipeline steps: the runtime's events as simulator input.

Input: one or more training steps' timelines, each per pp rank a list of rows (kind, micro-batch,
chunk, t0, t1) as `PipelineRunner.gather_timeline()` returns them (kinds, by index: F, B, W, comm,
wait, dp; under ZB-H1 B is the input-gradient part). Output (`MeasuredCosts`):
- F, B, W: per global stage s = chunk·p + rank, the median time of that compute (W is 0 when
  the schedule has no separate weight gradient);
- overhead: per rank, the time of a step that is neither compute nor waiting (posting messages,
  the executor's own Python, the tp all-gathers), divided over the rank's compute instructions:
  a rank cannot compute during it, so the simulator adds it to each compute's cost;
- p2p: the median latency of a message, measured on the receives that blocked: to the end of the
  receiver's wait from the later of two instants, the end of the sender's posting of the batch
  holding it (the first comm event at or after the producing compute's end) and the end of the
  receiver's last posting before the wait (gloo delivers no earlier than the receive is posted).
  A receive that did not block only bounds the latency from above, so it gives no sample; with
  no blocked receive at all p2p is 0.
The span of a rank's step is its first event's start to its last event's end.

`simulator_costs()` gives the (F, B, W) per-stage tuples of `plait.planner.pipesim.simulate`, with
each rank's overhead added, and `compute_per_rank()` the pure compute time of each rank's step
(m·Σ over its chunks of F + B + W): the simulated bubble is 1 − that / the simulated makespan,
the same definition as the runtime's measured bubble (1 − compute time / step time).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

F, B, W, COMM, WAIT, DP = range(6)


@dataclass
class MeasuredCosts:
    p: int
    v: int
    F: list[float]  # per global stage
    B: list[float]
    W: list[float]
    overhead: list[float]  # per rank, per compute instruction
    p2p: float
    samples: dict  # how many measurements each number rests on

    def simulator_costs(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(F, B, W) per global stage, each with its rank's overhead per instruction added."""
        oh = [self.overhead[s % self.p] for s in range(self.p * self.v)]
        return (tuple(f + o for f, o in zip(self.F, oh)),
                tuple(b + o for b, o in zip(self.B, oh)),
                tuple((w + o) if w > 0 else 0.0 for w, o in zip(self.W, oh)))

    def compute_per_rank(self, m: int) -> list[float]:
        """Pure compute time of one step on each rank: m micro-batches through each of its
        chunks."""
        return [m * sum(self.F[s] + self.B[s] + self.W[s] for s in range(r, self.p * self.v,
                                                                          self.p))
                for r in range(self.p)]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def costs_from_events(steps: list[list[list]], p: int, v: int = 1) -> MeasuredCosts:
    """MeasuredCosts of `steps` (each: per pp rank, rows (kind, mb, chunk, t0, t1))."""
    S = p * v
    times: dict[tuple[int, int], list[float]] = {}  # (kind, stage) -> durations
    overhead: list[list[float]] = [[] for _ in range(p)]
    latency: list[float] = []
    for step in steps:
        if len(step) != p:
            raise ValueError(f"a step has the timelines of {len(step)} ranks, not p = {p}")
        ends: dict[tuple[int, int, int], float] = {}  # (kind, mb, stage) -> producing compute end
        posts: list[list[tuple[float, float]]] = []
        step = [sorted((tuple(x) for x in rows), key=lambda e: e[3]) for rows in step]
        for r, rows in enumerate(step):
            posts.append(sorted((e[3], e[4]) for e in rows if int(e[0]) == COMM))
            busy = waited = 0.0
            n = 0
            for kind, mb, chunk, t0, t1 in rows:
                kind, s = int(kind), int(chunk) * p + r
                if kind in (F, B, W):
                    times.setdefault((kind, s), []).append(t1 - t0)
                    ends[(kind, int(mb), s)] = t1
                    busy += t1 - t0
                    n += 1
                elif kind == WAIT:
                    waited += t1 - t0
            if rows and n:
                span = max(e[4] for e in rows) - min(e[3] for e in rows)
                overhead[r].append(max(0.0, span - busy - waited) / n)
        for r, rows in enumerate(step):
            for i, (kind, mb, chunk, t0, t1) in enumerate(rows):
                if int(kind) != WAIT or mb < 0:
                    continue
                nxt = next((e for e in rows[i + 1:] if int(e[0]) in (F, B)), None)
                if nxt is None:
                    continue
                s = int(chunk) * p + r
                # an activation comes from stage s − 1's forward, a gradient from s + 1's backward
                src = (F, int(mb), s - 1) if int(nxt[0]) == F else (B, int(mb), s + 1)
                if src[2] < 0 or src[2] >= S or src not in ends:
                    continue
                produced = ends[src]
                post = next((b for a, b in posts[src[2] % p] if a >= produced - 1e-9), None)
                # gloo delivers no earlier than the receive is posted: from the later of the
                # send's posting and the receiver's last posting before it waited
                mine = max((b for a, b in posts[r] if b <= t0 + 1e-9), default=None)
                if post is not None and mine is not None and t1 >= max(post, mine):
                    latency.append(t1 - max(post, mine))
    med = {k: _median(x) for k, x in times.items()}
    return MeasuredCosts(
        p=p, v=v,
        F=[med.get((F, s), 0.0) for s in range(S)],
        B=[med.get((B, s), 0.0) for s in range(S)],
        W=[med.get((W, s), 0.0) for s in range(S)],
        overhead=[_median(o) for o in overhead],
        p2p=_median(latency),
        samples={"compute": sum(len(x) for x in times.values()), "p2p": len(latency),
                 "steps": len(steps)})
