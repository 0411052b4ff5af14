"""Sync cadences as data: pure generators of small instruction objects,
one tuple per optimizer step.

A strategy's executor (plait.sync.strategies) pulls one tuple per `optimizer.step()` and runs its
instructions in order. Nothing here touches a tensor or a process group, so every cadence is
tested without processes (tests/test_sync_schedules.py).

Instructions
- `InnerStep(t)`: the inner optimizer steps on this replica's own gradient.
- `Send(t, fragment)`: start averaging the fragment's payload over the replicas (dp); with a
  delay the exchange runs in the background while later steps compute.
- `Apply(t, fragment, sent)`: wait for the exchange started at step `sent` and use its result.
  `final` marks the last step of a run of known length: local values are replaced by the global
  ones (no mixing), so every replica ends with the same parameters.

Steps are numbered from 1 (the first call of `optimizer.step()`); `steps` is the run's length when
known (None: an endless cadence, drained by the strategy's `flush()`), `start` the first step to
generate (a resumed run starts after its checkpoint's step).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count


@dataclass(frozen=True)
class InnerStep:
    step: int


@dataclass(frozen=True)
class Send:
    step: int
    fragment: int


@dataclass(frozen=True)
class Apply:
    step: int
    fragment: int
    sent: int
    final: bool = False


Instr = InnerStep | Send | Apply


def _steps(start: int, steps: int | None) -> Iterator[int]:
    return count(start) if steps is None else iter(range(start, steps + 1))


def every_step_schedule(steps: int | None = None, start: int = 1) -> Iterator[tuple[Instr, ...]]:
    """Plain data parallelism: the gradient reducer averages during backward;
    the cadence only steps."""
    for t in _steps(start, steps):
        yield (InnerStep(t),)


def send_offset(fragment: int, every: int, fragments: int) -> int:
    """Fragment p sends at the steps t ≡ offset (mod every):
    staggered evenly, the last at multiples of H.

    (p + 1)·H // P mod H: with P = 1 the one fragment sends at H, 2H, ... (DiLoCo's outer steps).
    """
    return (fragment + 1) * every // fragments % every


def streaming_schedule(every: int, fragments: int = 1, delay: int = 0, steps: int | None = None,
                       start: int = 1) -> Iterator[tuple[Instr, ...]]:
    """Streaming DiLoCo's cadence (fragments = 1, delay = 0: DiLoCo's and local SGD's).

    Each step: `InnerStep`, then a `Send` for every fragment whose offset comes up, then an `Apply`
    for every fragment sent `delay` steps ago. Needs every ≥ fragments (at most one fragment sends
    per step, so the peak is one fragment) and delay < every (a fragment is applied before it is
    sent again).

    The last step of a run of known length brings every fragment to consensus: fragments in flight
    are applied there (early), fragments neither in flight nor due get one more blocking
    `Send` + `Apply`, all with `final=True`.
    """
    if fragments < 1 or every < fragments:
        raise ValueError(f"needs 1 <= fragments <= every, got fragments={fragments}, every={every}")
    if not 0 <= delay < every:
        raise ValueError(f"needs 0 <= delay < every, got delay={delay}, every={every}")
    offsets = [send_offset(p, every, fragments) for p in range(fragments)]

    def last_send(p: int, t: int) -> int:
        """The latest step s <= t at which fragment p sends (0 when none yet)."""
        s = t - (t - offsets[p]) % every
        return s if s >= 1 else 0

    for t in _steps(start, steps):
        final = steps is not None and t == steps
        out: list[Instr] = [InnerStep(t)]
        sends, applies = [], []
        for p in range(fragments):
            s = last_send(p, t)
            due = s == t
            in_flight = s >= 1 and t - delay < s < t  # sent earlier, applied later than t
            if final:
                if due or not in_flight and not (s >= 1 and s == t - delay):
                    sends.append(Send(t, p))
                    applies.append(Apply(t, p, t, final=True))
                else:
                    applies.append(Apply(t, p, s, final=True))
                continue
            if due:
                sends.append(Send(t, p))
            if s >= 1 and s == t - delay:
                applies.append(Apply(t, p, s))
        yield tuple(out + sends + applies)


def delayed_schedule(delay: int = 1, steps: int | None = None,
                     start: int = 1) -> Iterator[tuple[Instr, ...]]:
    """Delayed data parallelism: step t sends its gradient and applies the one sent at t − delay.

    One fragment (the whole gradient). Its `Apply` is the optimizer step with the averaged
    gradient, so the first `delay` steps do not update; the last step of a run of known length
    applies every gradient still in flight, in order, so the run makes exactly `steps` updates.
    """
    if delay < 1:
        raise ValueError(f"needs delay >= 1, got {delay}")
    for t in _steps(start, steps):
        out: list[Instr] = [Send(t, 0)]
        if steps is not None and t == steps:
            out += [Apply(t, 0, s, final=True) for s in range(max(1, t - delay), t + 1)]
        elif t - delay >= 1:
            out.append(Apply(t, 0, t - delay))
        yield tuple(out)


def sends_per_step(schedule: Iterator[tuple[Instr, ...]], n: int) -> list[int]:
    """How many `Send`s each of the next n steps makes (for byte formulas)."""
    return [sum(isinstance(i, Send) for i in step) for _, step in zip(range(n), schedule)]
