"""Runs one pp rank's schedule program: the thin executor under the schedules.

Communication contract (all on `mesh.pp`, the ranks with this rank's dp and tp index):
- each batch of consecutive Send/Recv instructions is posted as one batched isend/irecv; a
  receive is waited right before the compute that reads it, sends are released once complete
  and all waited before the step ends (the program's OptimizerStep);
- the hidden state between stages is one tensor of the shape and dtype `hidden(x)` gives for
  the micro-batch's model input x (for a GPT (B, T, D)), the same on every tp rank;
- at the end of a training step one all-gather of a few numbers per rank (loss, step time,
  busy time, in-flight peaks) gives every pp rank the loss, computed on the last stage only,
  and every rank's measured bubble; evaluation broadcasts (loss sum, tokens) from the last stage.
Every rank of the pp group must call `train_step` / `evaluate` with the same number and shapes
of micro-batches (every rank reads the batch; only the first stage uses the inputs' values and
only the last the targets).

Gradients accumulate in `.grad` over the step's micro-batches; reducing them over dp is the
caller's (run the step inside the reducer's `no_sync()` and let the optimizer step reduce once).
Activations of a micro-batch are released as soon as its backward (its W, for ZB-H1) is done.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from plait.errors import ConfigError
from plait.mesh import Mesh
from plait.parallel_spec import next_token_loss
from plait.pipeline.p2p import gather_rows, post_batch
from plait.pipeline.partition import PipelineStage
from plait.pipeline.schedules import (
    COMM,
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    ScheduleError,
    SendActivation,
    build,
    check,
    forward_only,
    theoretical_bubble,
)
from plait.pipeline.split_backward import backward_input, backward_weight

KINDS = ("F", "B", "W", "comm", "wait")  # timeline event kinds, by index
_KIND = {Forward: 0, Backward: 1, BackwardInput: 1, BackwardWeight: 2}
STAT_FIELDS = ("loss", "wall_s", "busy_s", "peak_in_flight", "peak_saved_bytes")


@dataclass
class _Saved:
    inp: torch.Tensor
    out: torch.Tensor
    nbytes: int
    wgrad: object = None


class PipelineRunner:
    """Executes the schedule for this rank's `PipelineStage`.

    Measured per step and rank: the time of every instruction (`events`), the idle fraction
    (1 − compute time / step time), and the peak number of activation sets alive, one per
    (micro-batch, chunk) forwarded and not yet fully backwarded (with v chunks per rank each is
    1/v of the rank's layers). `measure_memory=True` also sums the bytes autograd saves for them
    (saved-tensor hooks, parameters excluded).
    """

    def __init__(self, stage: PipelineStage, mesh: Mesh, *, schedule: str = "1f1b",
                 virtual: int = 1, loss_fn=next_token_loss, hidden=None,
                 measure_memory: bool = False):
        self.stage, self.mesh, self.schedule, self.v = stage, mesh, schedule, virtual
        self.loss_fn, self.hidden = loss_fn, hidden
        self.measure_memory = measure_memory
        self.p, self.rank = mesh.pp_size, mesh.pp_index
        self.last_stage = self.p * self.v - 1
        self.params = [stage.chunk_parameters(c) for c in range(self.v)]
        # one clock for timelines across ranks
        self.wall0, self.perf0 = time.time(), time.perf_counter()
        self.events: list[tuple] = []
        self._rows: list[list[float]] = []  # this rank's measurements of steps not yet gathered
        # per step: every pp rank's measurements
        self._history: deque[list[dict]] = deque(maxlen=10_000)
        self.m = 0  # micro-batches of the last training step
        self._sync = ((lambda: torch.cuda.synchronize(mesh.device)) if mesh.device.type == "cuda"
                      else (lambda: None))

    # -- public ------------------------------------------------------------------------------
    def check(self, m: int) -> None:
        """The schedule's own rule (plait.pipeline.schedules.check),
        as a ConfigError naming the keys."""
        try:
            check(self.schedule, self.p, m, self.v)
        except ScheduleError as e:
            raise ConfigError(f"parallel.schedule = {self.schedule!r} with parallel.pp = {self.p}, "
                              f"parallel.virtual_stages = {self.v}: {e}; change "
                              f"train.global_batch / train.micro_batch (micro-batches per "
                              f"pipeline) or the schedule") from e

    def train_step(self, batches, divisor: float = 1.0, autocast=None, no_sync=None,
                   step_fn=None) -> torch.Tensor:
        """Forward and backward of all micro-batches; returns Σ loss_sum(mb) / divisor as a device
        tensor on the last stage (zero on the others: only the last stage computes the loss).

        `no_sync`: a context factory (the data-parallel reducer's) held around the whole step.
        `step_fn`: called at the program's OptimizerStep, once every gradient of this rank is final.
        No host synchronization and no collective besides the schedule's p2p: the measurements
        stay on their rank until `collect_stats()` gathers them.
        """
        batches = list(batches)
        self.check(len(batches))
        self.m = len(batches)
        program = build(self.schedule, self.rank, self.p, self.m, self.v)
        with (no_sync() if no_sync is not None else nullcontext()):
            loss, row = self._run(program, batches, True, divisor, autocast or nullcontext(),
                                  step_fn)
        self._rows.append(row)
        return loss

    def collect_stats(self) -> list[dict]:
        """Gather every pp rank's measurements of the steps since the last call (collective over pp,
        one all-gather); returns the last step's, per pp rank."""
        if self._rows:
            k, n = len(self._rows), len(STAT_FIELDS)
            local = torch.tensor(self._rows, dtype=torch.float64,
                                 device=self.mesh.device).reshape(-1)
            out = torch.empty(self.p * k * n, dtype=torch.float64, device=self.mesh.device)
            self.mesh.comm.all_gather(out, local, self.mesh.pp)
            table = out.view(self.p, k, n).tolist()
            self._rows = []
            for j in range(k):
                stats = [dict(zip(STAT_FIELDS, table[r][j])) for r in range(self.p)]
                for st in stats:
                    st["bubble"] = 1.0 - st["busy_s"] / st["wall_s"] if st["wall_s"] > 0 else 0.0
                self._history.append(stats)
        return self._history[-1] if self._history else []

    @property
    def stats(self) -> list[dict]:
        """The last training step's measurements, per pp rank (collective: see collect_stats)."""
        return self.collect_stats()

    @property
    def history(self) -> deque:
        """Per training step: `stats` (collective: see collect_stats)."""
        self.collect_stats()
        return self._history

    @torch.no_grad()
    def evaluate(self, batches, autocast=None) -> torch.Tensor:
        """Forward only; returns float64 [Σ token loss, tokens] on every pp rank (any m >= 1)."""
        batches = list(batches)
        program = forward_only(self.rank, self.p, len(batches), self.v)
        acc = self._run(program, batches, False, 1.0, autocast or nullcontext(), None)
        self.mesh.comm.broadcast(acc, self.p - 1, self.mesh.pp)
        return acc

    def bubbles(self) -> list[float]:
        """Measured idle fraction of each pp rank in the last training step (collective over pp)."""
        return [s["bubble"] for s in self.stats]

    def summary(self) -> dict:
        """Medians over the training steps (the first excluded when there are more) of the
        measurements."""
        history = self.history
        steps = list(history)[1:] or list(history)
        if not steps:
            return {}
        per_rank = [sorted(step[r]["bubble"] for step in steps) for r in range(self.p)]
        bubble = [v[len(v) // 2] for v in per_rank]
        return {"schedule": self.schedule, "pp": self.p, "virtual_stages": self.v,
                "micro_batches": self.m, "bubble_per_rank": bubble,
                "bubble_mean": sum(bubble) / self.p,
                "bubble_theory": theoretical_bubble(self.schedule, self.p, self.m, self.v),
                "peak_in_flight_per_rank": [max(int(step[r]["peak_in_flight"]) for step in steps)
                                            for r in range(self.p)],
                "peak_saved_bytes_per_rank": [
                    max(int(step[r]["peak_saved_bytes"]) for step in steps) for r in range(self.p)]}

    def gather_timeline(self):
        """Every pp rank's events of the last training step (collective over pp)."""
        from plait.pipeline.timeline import Timeline

        rows = torch.tensor(self.events, dtype=torch.float64).reshape(-1, 5).to(self.mesh.device)
        per_rank = [t.cpu().tolist() for t in gather_rows(self.mesh.comm, self.mesh.pp, rows)]
        return Timeline(per_rank, self.schedule, self.p, self.m, self.v, self.bubbles())

    # -- execution ---------------------------------------------------------------------------
    def _now(self) -> float:
        return self.wall0 + (time.perf_counter() - self.perf0)

    def _run(self, program, batches, train: bool, divisor: float, autocast, step_fn):
        dev = self.mesh.device
        self._batches, self._train, self._divisor, self._autocast = \
            batches, train, divisor, autocast
        self._bufs, self._waits, self._outbox, self._saved = {}, {}, {}, {}
        self._sending: list = []
        self._loss = torch.zeros((), device=dev)
        self._eval = torch.zeros(2, dtype=torch.float64, device=dev)
        self._busy, self._live, self._peak, self._bytes, self._peak_bytes = 0.0, 0, 0, 0, 0
        events = []
        self._ev = events
        t_start = self._now()
        pending: list = []
        stepped = False
        for ins in program:
            if isinstance(ins, COMM):
                pending.append(ins)
                continue
            if pending:
                self._post(pending)
                pending = []
            if isinstance(ins, OptimizerStep):  # every gradient of this rank is final from here
                stepped = True
                continue
            self._compute(ins)
        if pending:
            self._post(pending)
        self._drain()
        t_end = self._now()
        # a schedule that passed simulate() cannot leave any
        if self._saved or self._bufs or self._outbox:
            raise RuntimeError(f"pp rank {self.rank}: the program left activations "
                               f"{list(self._saved)}, receives {list(self._bufs)} or sends "
                               f"{list(self._outbox)} behind")
        self._batches = None
        # outside the step's clock: the optimizer is not pipeline time
        if stepped and step_fn is not None:
            step_fn()
        if not train:
            return self._eval
        self.events = events
        # the loss stays on the device; the row's loss slot is unused (kept for the stats layout)
        return self._loss, [0.0, t_end - t_start, self._busy, float(self._peak),
                            float(self._peak_bytes)]

    def _post(self, batch) -> None:
        t0 = self._now()
        sends, recvs, keys, keep = [], [], [], []
        for ins in batch:
            kind = "act" if isinstance(ins, (SendActivation, RecvActivation)) else "grad"
            key = (kind, ins.mb, ins.chunk)
            if isinstance(ins, (RecvActivation, RecvGrad)):
                shape, dtype = self.hidden(self._batches[ins.mb][0])
                buf = torch.empty(shape, dtype=dtype, device=self.mesh.device)
                self._bufs[key] = buf
                recvs.append((buf, ins.peer))
                keys.append(key)
            else:
                t = self._outbox.pop(key)
                sends.append((t, ins.peer))
                keep.append(t)
        h = post_batch(self.mesh.comm, self.mesh.pp, sends, recvs)
        for key in keys:
            self._waits[key] = h
        if sends:
            self._sending.append((h, keep))
        still = []
        for hh, k in self._sending:  # release what the peers already took, without blocking
            if hh.is_completed():
                hh.wait()
            else:
                still.append((hh, k))
        self._sending = still
        self._ev.append((3, batch[0].mb, batch[0].chunk, t0, self._now()))

    def _take(self, key) -> torch.Tensor:
        h = self._waits.pop(key)
        if not h.done:
            t0 = self._now()
            h.wait()
            self._ev.append((4, key[1], key[2], t0, self._now()))
        return self._bufs.pop(key)

    def _drain(self) -> None:
        t0 = self._now()
        for h, _ in self._sending:
            h.wait()
        self._sending = []
        if t0 < self._now() - 1e-5:
            self._ev.append((4, -1, -1, t0, self._now()))

    def _compute(self, ins) -> None:
        s = self.stage.stage_index(ins.chunk)
        key = (ins.mb, ins.chunk)
        # a receive is waited for before the clock starts: waiting is idle time, not compute
        got = None
        if isinstance(ins, Forward) and s > 0:
            got = self._take(("act", *key))
        elif isinstance(ins, (Backward, BackwardInput)) and s < self.last_stage:
            got = self._take(("grad", *key))
        self._sync()
        t0 = self._now()
        if isinstance(ins, Forward):
            self._forward(ins.mb, ins.chunk, s, got)
        elif isinstance(ins, Backward):
            sv = self._saved.pop(key)
            torch.autograd.backward(sv.out, None if got is None else got.to(sv.out.dtype))
            self._release(sv)
            if s > 0:
                self._outbox[("grad", *key)] = sv.inp.grad.contiguous()
        elif isinstance(ins, BackwardInput):
            sv = self._saved[key]
            sv.wgrad = backward_input(sv.out, None if got is None else got.to(sv.out.dtype), sv.inp)
            if s > 0:
                self._outbox[("grad", *key)] = sv.inp.grad.contiguous()
        else:
            sv = self._saved.pop(key)
            backward_weight(sv.wgrad, self.params[ins.chunk])
            self._release(sv)
        self._sync()
        t1 = self._now()
        self._busy += t1 - t0
        self._ev.append((_KIND[type(ins)], ins.mb, ins.chunk, t0, t1))

    def _forward(self, mb: int, chunk: int, s: int, received: torch.Tensor | None) -> None:
        x, y = self._batches[mb]
        dev = self.mesh.device
        if s == 0:
            inp = x.to(dev, non_blocking=True)
        else:
            inp = received
            if self._train:
                inp.requires_grad_(True)
        hooks, counter = self._saved_bytes_hooks()
        with hooks, self._autocast:
            out = self.stage(inp, chunk, x.shape[1] if x.dim() > 1 else None)
        if s == self.last_stage:
            loss = self.loss_fn(out, y.to(dev, non_blocking=True), reduction="sum")
            if not self._train:
                tokens = torch.tensor(float(y.numel()), dtype=torch.float64, device=dev)
                self._eval += torch.stack([loss.detach().double(), tokens])
                return
            out = loss / self._divisor
            self._loss += out.detach()
        else:
            shape, dtype = self.hidden(x)
            if tuple(out.shape) != tuple(shape):
                raise ConfigError(f"pipeline stage {s} returned a hidden state of shape "
                                  f"{tuple(out.shape)}, but the stages exchange {tuple(shape)}: "
                                  "every layer must keep the hidden state's shape (or the model "
                                  "must define pipeline_hidden(x))")
            self._outbox[("act", mb, chunk)] = out.detach().to(dtype).contiguous()
        if self._train:
            self._saved[(mb, chunk)] = _Saved(inp, out, counter[0])
            self._live += 1
            self._bytes += counter[0]
            self._peak = max(self._peak, self._live)
            self._peak_bytes = max(self._peak_bytes, self._bytes)

    def _release(self, sv: _Saved) -> None:
        self._live -= 1
        self._bytes -= sv.nbytes

    def _saved_bytes_hooks(self):
        counter = [0]
        if not (self.measure_memory and self._train):
            return nullcontext(), counter
        params = {p.data_ptr() for ps in self.params for p in ps}
        seen: set[int] = set()

        def pack(t):
            ptr = t.data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                counter[0] += t.numel() * t.element_size()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter

