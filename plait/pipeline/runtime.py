"""Runs one pp rank's schedule program: the thin executor under the schedules.

Communication contract (on `mesh.pp`, the ranks with this rank's dp and tp index, unless said):
- each batch of consecutive Send/Recv instructions is posted as one batched isend/irecv; a
  receive is waited right before the compute that reads it, sends are released once complete
  and all waited before the step ends (the program's OptimizerStep);
- the hidden state between stages is one tensor of the shape and dtype `hidden(x)` gives for
  the micro-batch's model input x (for a GPT (B, T, D)), the same on every tp rank. With tp > 1
  and no sequence parallelism (`scatter_tp`) a message carries only this tp rank's 1/tp slice of
  it (flattened, zero-padded to ⌈n/tp⌉ elements), and the receiver all-gathers the slices over
  `mesh.tp` before the compute that reads it (plait.pipeline.p2p.HiddenWire): b·s·h/tp elements
  per message instead of b·s·h. Under sequence parallelism the hidden state is already 1/tp
  (its sequence split) and goes as it is;
- at the end of a training step one all-gather of a few numbers per rank (loss, step time,
  busy time, in-flight peaks) gives every pp rank the loss, computed on the last stage only,
  and every rank's measured bubble; evaluation broadcasts (loss sum, tokens) from the last stage.
Every rank of the pp group must call `train_step` / `evaluate` with the same number and shapes
of micro-batches (every rank reads the batch; only the first stage uses the inputs' values and
only the last the targets).

Gradients accumulate in `.grad` over the step's micro-batches. With a data-parallel gradient
path (`grad_sync`: plait.data_parallel's reducer, ZeRO-1/2 reducer or ZeRO-3 engine) every
instruction runs under its `no_sync()` except, per chunk, the last one producing that chunk's
weight gradients (its last Backward, or BackwardWeight under ZB-H1), which runs inside
`grad_sync.final_backward(chunk modules)`: the chunk's dp exchange (buckets in index order, or
ZeRO-3's one reduce-scatter per unit) starts from that instruction's gradient hooks, overlapped
with the rest of the pipeline, and the optimizer step only finishes it. Each issue is a "dp"
event of the timeline. Activations of a micro-batch are released as soon as its backward (its W,
for ZB-H1) is done.
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
from plait.pipeline.p2p import HiddenWire, post_batch
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
    final_grads,
    forward_only,
)
from plait.pipeline.split_backward import backward_input, backward_weight
from plait.pipeline.step_stats import StepStats

KINDS = ("F", "B", "W", "comm", "wait", "dp")  # timeline event kinds, by index
_KIND = {Forward: 0, Backward: 1, BackwardInput: 1, BackwardWeight: 2}


@dataclass
class _Saved:
    inp: torch.Tensor
    out: torch.Tensor
    nbytes: int
    wgrad: object = None


class PipelineRunner(StepStats):
    """Executes the schedule for this rank's `PipelineStage`.

    Measured per step and rank: the time of every instruction (`events`), the idle fraction
    (1 − compute time / step time), and the peak number of activation sets alive, one per
    (micro-batch, chunk) forwarded and not yet fully backwarded (with v chunks per rank each is
    1/v of the rank's layers). `measure_memory=True` also sums the bytes autograd saves for them
    (saved-tensor hooks, parameters excluded).
    """

    def __init__(self, stage: PipelineStage, mesh: Mesh, *, schedule: str = "1f1b",
                 virtual: int = 1, loss_fn=next_token_loss, hidden=None,
                 measure_memory: bool = False, scatter_tp: bool = False):
        self.stage, self.mesh, self.schedule, self.v = stage, mesh, schedule, virtual
        self.wire = HiddenWire(mesh.comm, mesh.tp if scatter_tp and mesh.tp_size > 1 else None)
        self._grad_sync, self._final = None, {}
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

    def train_step(self, batches, divisor: float = 1.0, autocast=None, grad_sync=None,
                   step_fn=None) -> torch.Tensor:
        """Forward and backward of all micro-batches; returns Σ loss_sum(mb) / divisor as a device
        tensor on the last stage (zero on the others: only the last stage computes the loss).

        `grad_sync`: the data-parallel gradient path (`no_sync()`, `final_backward(modules,
        on_issue)`), or None; see the module docstring. `step_fn`: called at the program's
        OptimizerStep, once every gradient of this rank is final. No host synchronization and no
        collective besides the schedule's p2p, the tp all-gathers of sliced hidden states and the
        dp exchange: the measurements stay on their rank until `collect_stats()` gathers them.
        """
        batches = list(batches)
        self.check(len(batches))
        self.m = len(batches)
        program = build(self.schedule, self.rank, self.p, self.m, self.v)
        self._grad_sync, self._final = grad_sync, final_grads(program)
        try:
            loss, row = self._run(program, batches, True, divisor, autocast or nullcontext(),
                                  step_fn)
        finally:
            self._grad_sync = None
        self._rows.append(row)
        return loss

    @torch.no_grad()
    def evaluate(self, batches, autocast=None) -> torch.Tensor:
        """Forward only; returns float64 [Σ token loss, tokens] on every pp rank (any m >= 1)."""
        batches = list(batches)
        program = forward_only(self.rank, self.p, len(batches), self.v)
        acc = self._run(program, batches, False, 1.0, autocast or nullcontext(), None)
        self.mesh.comm.broadcast(acc, self.p - 1, self.mesh.pp)
        return acc

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
            with self._dp_scope(ins):
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
                buf = self.wire.buffer(shape, dtype, self.mesh.device)
                self._bufs[key] = (buf, shape)
                recvs.append((buf, ins.peer))
                keys.append(key)
            else:  # with scatter_tp, this tp rank's slice
                t = self.wire.outgoing(self._outbox.pop(key))
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
        buf, shape = self._bufs.pop(key)
        if self.wire.n == 1:
            return buf
        t0 = self._now()
        full = self.wire.incoming(buf, shape)  # the tp all-gather of the slices
        self._ev.append((3, key[1], key[2], t0, self._now()))
        return full

    def _dp_scope(self, ins):
        """The data-parallel context of one compute instruction (module docstring)."""
        gs = self._grad_sync
        if gs is None:
            return nullcontext()
        if self._final.get(ins.chunk) != ins:
            return gs.no_sync()
        modules = [self.stage.get_submodule(n) for n in self.stage.layer_names(ins.chunk)]
        return gs.final_backward(modules, on_issue=lambda i, c=ins.chunk: self._dp_issued(i, c))

    def _dp_issued(self, index: int, chunk: int) -> None:
        now = self._now()
        self._ev.append((5, index, chunk, now, now))

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
        x, y, *extras = self._batches[mb]  # (x, y, *extras): model(x, *extras), every stage
        dev = self.mesh.device
        extras = tuple(e.to(dev, non_blocking=True) for e in extras)
        if s == 0:
            inp = x.to(dev, non_blocking=True)
        else:
            inp = received
            if self._train:
                inp.requires_grad_(True)
        hooks, counter = self._saved_bytes_hooks()
        with hooks, self._autocast:
            out = self.stage(inp, chunk, x.shape[1] if x.dim() > 1 else None, extras)
        if s == self.last_stage:
            y = y.to(dev, non_blocking=True)
            loss = self.loss_fn(out, y, reduction="sum")
            if not self._train:  # targets of -100 (a loss mask) are no tokens of the mean
                tokens = (y != -100).sum().to(torch.float64)
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

