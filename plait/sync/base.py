"""The sync-strategy interface, its every-step baseline, and the executor that runs a cadence.

A strategy is one method: `step(inner)`, called by `ParallelOptimizer.step()` once per optimizer
step after the gradients of this step exist, where `inner()` clips and steps the wrapped (inner)
optimizer on whatever is in `.grad`. The strategy decides when `inner()` runs, on which gradient,
and what it exchanges over the replicas before or after. The replicas are the dp ranks
(`mesh.dp`), or with parallel.replicas > 1 the replicas of the whole layout (`mesh.rep`), each of
which sums its gradients over its own dp ranks every step (the dense reducer inside the replica).
Tensor and pipeline parallelism work as usual inside each replica: a strategy sees only this
rank's parameters (its tp shard of its pp stage) and averages them with the same shard of the
other replicas.

Gradient scale: plait's training loop normalizes each micro-batch's loss by the global batch's
token count and sums gradients over dp (ParallelModel's reducer). A strategy that steps on its own
replica's gradient multiplies it by the number of replicas n first (dp, or parallel.replicas, the
strategy group's size), so that it is the mean gradient of the replica's samples: the summed
(every-step) gradient if every replica had seen the same data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from plait.mesh import Mesh
from plait.sync.cadence import Apply, InnerStep, Instr, Send
from plait.sync.transport import Background, Codec, Job, average, duplicate_group


class SyncStrategy:
    """The baseline: every step, the gradient reducer has already summed the gradients over dp
    during backward (`uses_reducer`); the strategy only steps. No communication of its own.

    `slow_factor` > 1 (debug, straggler runs) makes this rank sleep (factor − 1) × the time it
    spent between two optimizer steps, so its steps take `slow_factor` times as long.
    """

    name = "every_step"
    uses_reducer = True  # False: parallelize() builds no per-step gradient reducer

    def __init__(self, slow_factor: float = 1.0):
        self.slow_factor = slow_factor
        self._last: float | None = None
        self.wait_s = 0.0  # time the training loop blocked on this strategy's own exchanges

    def step(self, inner: Callable[[], None]) -> None:
        if self.slow_factor > 1.0 and self._last is not None:
            time.sleep((self.slow_factor - 1.0) * (time.perf_counter() - self._last))
        self._step(inner)
        self._last = time.perf_counter()

    def _step(self, inner: Callable[[], None]) -> None:
        inner()

    def reset_clock(self) -> None:
        """Call after work between steps that is not training (evaluation):
        the slow rank does not stretch it."""
        self._last = time.perf_counter() if self._last is not None else None

    def flush(self) -> None:
        """Finish every exchange in flight (a loop of unknown length calls it before evaluating)."""

    def close(self) -> None:
        """Stop the background thread, if any (after flush)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


class EveryStep(SyncStrategy):
    pass


class FlatParams:
    """This rank's parameters (or their gradients) as one flat fp32 vector of `length` elements,
    read and written by element range; elements past the parameters (padding) read as zeros."""

    def __init__(self, params: list[nn.Parameter], length: int, device: torch.device):
        self.params = params
        self.device = device
        self.spans: list[tuple[nn.Parameter, int, int]] = []
        off = 0
        for p in params:
            self.spans.append((p, off, off + p.numel()))
            off += p.numel()
        self.numel = off
        self.length = length
        assert length >= off

    def read(self, lo: int, hi: int, grads: bool = False) -> torch.Tensor:
        out = torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
        for p, a, b in self.spans:
            if b <= lo or a >= hi:
                continue
            src = p.grad if grads else p.detach()
            if src is None:
                continue
            s, e = max(a, lo), min(b, hi)
            out[s - lo: e - lo] = src.reshape(-1)[s - a: e - a]
        return out

    def write(self, lo: int, hi: int, x: torch.Tensor, grads: bool = False) -> None:
        for p, a, b in self.spans:
            if b <= lo or a >= hi:
                continue
            s, e = max(a, lo), min(b, hi)
            if grads:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dst = p.grad
            else:
                dst = p.data
            with torch.no_grad():
                dst.view(-1)[s - a: e - a] = x[s - lo: e - lo]


class ScheduledSync(SyncStrategy):
    """Runs a cadence from plait.sync.cadence: `InnerStep`, `Send`, `Apply`, one tuple per step.

    Subclasses say what a fragment's payload is (`payload`) and how the averaged payload is used
    (`use`). Fragment p is the element range [p·F, (p+1)·F) of the flat parameter vector.

    With `background` the exchanges run on the strategy's background thread and a duplicate of the
    replicas' group (created here, collectively, in the same order on every rank; the Mesh is
    immutable, so the extra group lives in this object). Without it, `Send` averages inline on
    `self.group` (mesh.dp, or mesh.rep when parallel.replicas > 1) through `mesh.comm`, blocking.
    """

    uses_reducer = False

    def __init__(self, params: list[nn.Parameter], mesh: Mesh,
                 schedule: Callable[[int], Iterator[tuple[Instr, ...]]],
                 fragments: int = 1, codec: Codec | None = None, background: bool = False,
                 total_steps: int | None = None, slow_factor: float = 1.0):
        super().__init__(slow_factor)
        self.total_steps = total_steps
        self.mesh = mesh
        self.params = [p for p in params if p.requires_grad]
        self.codec = codec
        # the replicas: the dp ranks, or the replicas of the layout (dense dp inside each)
        self.group = mesh.rep if mesh.replicas > 1 else mesh.dp
        n = self.group.size
        numel = sum(p.numel() for p in self.params)
        unit = fragments * (n * codec.block if codec is not None and n > 1 else 1)
        # F: equal fragments, codec-aligned
        self.fragment_numel = -(-numel // unit) * unit // fragments
        self.fragments = fragments
        self.flat = FlatParams(self.params, fragments * self.fragment_numel, mesh.device)
        self._schedule_fn = schedule
        self._schedule = schedule(1)
        self.t = 0  # optimizer steps taken
        self._inner: Callable[[], None] = lambda: None  # the last step's inner step (for flush)
        # (fragment, sent step) -> exchange
        self.pending: dict[tuple[int, int], Job | torch.Tensor] = {}
        self.flushed: set[tuple[int, int]] = set()  # applied early by flush(): their Apply is done
        self.bg = (Background(duplicate_group(mesh, over=self.group.name), mesh.rank, mesh.device)
                   if background else None)

    def span(self, fragment: int) -> tuple[int, int]:
        return fragment * self.fragment_numel, (fragment + 1) * self.fragment_numel

    # -- what subclasses define --------------------------------------------------------------
    def payload(self, fragment: int) -> torch.Tensor:
        """A fresh (F,) fp32 tensor to average over the replicas (the exchange may own it)."""
        raise NotImplementedError

    def use(self, ins: Apply, avg: torch.Tensor, inner: Callable[[], None]) -> None:
        """Use the replicas' average of the payload sent at `ins.sent`."""
        raise NotImplementedError

    # -- the executor ------------------------------------------------------------------------
    def _step(self, inner: Callable[[], None]) -> None:
        self.t += 1
        self._inner = inner
        try:
            instrs = next(self._schedule)
        except StopIteration:
            raise RuntimeError(f"sync.strategy = {self.name}: optimizer.step() called {self.t} "
                               f"times, more than the run's {self.t - 1} steps given to "
                               "parallelize(total_steps=...)") from None
        for ins in instrs:
            assert ins.step == self.t, (ins, self.t)
            if isinstance(ins, InnerStep):
                self._scale_local_grads()
                inner()
            elif isinstance(ins, Send):
                self._send(ins)
            elif (ins.fragment, ins.sent) in self.flushed:
                self.flushed.discard((ins.fragment, ins.sent))
            else:
                self.use(ins, self._collect(ins.fragment, ins.sent), inner)
        if self.t == self.total_steps:  # nothing is in flight after a run's last step
            self.close()

    def _scale_local_grads(self) -> None:
        n = self.group.size  # the replica's gradient is 1/n of its samples' mean (module docstring)
        if n > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(n)

    def _send(self, ins: Send) -> None:
        x = self.payload(ins.fragment)
        if self.bg is not None:
            bg, codec = self.bg, self.codec
            self.pending[(ins.fragment, ins.step)] = bg.submit(
                lambda: average(x, bg.group, bg.comm, codec))
        else:
            t0 = time.perf_counter()
            self.pending[(ins.fragment, ins.step)] = average(x, self.group, self.mesh.comm,
                                                             self.codec)
            self.wait_s += time.perf_counter() - t0

    def _collect(self, fragment: int, sent: int) -> torch.Tensor:
        got = self.pending.pop((fragment, sent))
        if isinstance(got, Job):
            got, blocked = got.wait(self.mesh.comm)
            self.wait_s += blocked
        return got

    def _complete_pending(self) -> None:
        """Wait for every background exchange, keeping its result for its Apply
        (no state changes)."""
        for key in sorted(self.pending, key=lambda k: k[1]):
            if isinstance(self.pending[key], Job):
                self.pending[key] = self._collect(*key)

    def flush(self) -> None:
        """Apply every exchange in flight now, in the order sent (a run of unknown length ends with
        it; training may go on: the cadence skips the Applies done here)."""
        for fragment, sent in sorted(self.pending, key=lambda k: (k[1], k[0])):
            self.use(Apply(self.t, fragment, sent), self._collect(fragment, sent), self._inner)
            self.flushed.add((fragment, sent))

    def close(self) -> None:
        if self.bg is not None:
            self.bg.close()

    def state_dict(self) -> dict:
        """Step count and finished-but-unapplied exchanges (in-flight ones are waited for first)."""
        self._complete_pending()
        return {"step": self.t,
                "pending": {f"{f}@{s}": v.clone() for (f, s), v in self.pending.items()},
                "flushed": sorted(self.flushed)}

    def load_state_dict(self, sd: dict) -> None:
        self._complete_pending()
        self.t = int(sd["step"])
        self._schedule = self._schedule_fn(self.t + 1)
        self.pending = {}
        self.flushed = {(int(f), int(s)) for f, s in sd.get("flushed", [])}
        for key, v in sd.get("pending", {}).items():
            f, s = (int(x) for x in key.split("@"))
            self.pending[(f, s)] = v.to(self.mesh.device)
