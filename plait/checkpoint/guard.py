"""`StepGuard`: every step, all ranks agree whether to apply it, save or stop; and the debug faults.

The agreement is one all-reduce (SUM) over mesh.world of world_size + 2 floats, issued inside the
optimizer step, after the gradients are reduced (and clipped) and before the parameters change:
slot r = 1 when rank r saw a non-finite loss or gradient norm; the last two slots carry rank 0's
clock ("save now": checkpoint.every_minutes; "stop now": train.exit_after_minutes), so time-based
decisions are the same on every rank. A non-finite value anywhere skips the update everywhere
(the data and the learning-rate schedule still advance); `train.max_bad_steps` skips in a row stop
the run with NonFiniteError.

The guard sits between the trainer and its optimizer without changing either: it wraps the
trainer's `forward_backward` (to see the step's loss) and the wrapped torch optimizer's `step`
(ParallelOptimizer calls it after clipping; a ZeRO wrapper steps its shards there), per instance.
"""

from __future__ import annotations

import os
import signal

import torch

from plait.errors import NonFiniteError  # raised here; plait.checkpoint re-exports it


class StepGuard:
    def __init__(self, trainer, checkpointer):
        self.tr = trainer
        self.ckpt = checkpointer
        self.mesh = trainer.mesh
        t = trainer.cfg.train
        self.max_bad = t.max_bad_steps
        self.fault = t.fault if t.fault_rank == self.mesh.rank else "none"
        self.fault_step, self.fault_steps = t.fault_step, t.fault_steps
        self.skipped = 0  # this session's skipped steps
        self.in_a_row = 0
        self.first_bad = 0
        self.last_skipped = False
        self.save_due = self.stop_due = False
        self._loss: torch.Tensor | None = None
        self._forward_backward = trainer.forward_backward
        self._opt = trainer.optimizer.optimizer
        self._step = self._opt.step
        trainer.forward_backward = self.forward_backward
        self._opt.step = self.step

    @property
    def skipped_total(self) -> int:
        return self.ckpt.skipped + self.skipped

    def remove(self) -> None:
        """Give the trainer and optimizer their own methods back."""
        for obj, name in ((self.tr, "forward_backward"), (self._opt, "step")):
            if name in vars(obj):
                delattr(obj, name)

    def _hits(self, kind: str, step: int) -> bool:
        if self.fault != kind:
            return False
        return self.fault_step <= step < self.fault_step + (self.fault_steps if kind == "nan" else 1)

    def forward_backward(self, batches, global_tokens: int) -> torch.Tensor:
        self.last_skipped = self.save_due = self.stop_due = False
        self.tr.optimizer.last_grad_norm = None  # set again by this step's clipping, if any
        loss = self._forward_backward(batches, global_tokens)
        if self._hits("nan", self.tr.step + 1):
            loss = loss * float("nan")
        self._loss = loss
        return loss

    def _local_bad(self) -> torch.Tensor:
        """1.0 when this rank's loss or gradient norm is not finite (a tensor: no host sync here)."""
        popt = self.tr.optimizer
        vals = [] if self._loss is None else [self._loss.detach().float().reshape(-1)]
        norm = popt.last_grad_norm
        if norm is None:  # no clipping: this rank's gradients' own norm
            grads = [p.grad.detach() for p in popt.params if p.grad is not None]
            if grads:
                norm = torch.stack([n.float() for n in torch._foreach_norm(grads)]).norm()
        if norm is not None:
            vals.append(norm.detach().float().reshape(-1).to(self.mesh.device))
        if not vals:
            return torch.zeros((), device=self.mesh.device)
        return (~torch.isfinite(torch.cat([v.to(self.mesh.device) for v in vals]))).any().float()

    def step(self, *args, **kwargs):
        mesh = self.mesh
        step = self.tr.step + 1
        if self._hits("kill", step):
            from plait.checkpoint.manager import fault_once

            if fault_once(self.ckpt.root, "kill"):
                os.kill(os.getpid(), signal.SIGKILL)
        n = mesh.world_size
        v = torch.zeros(n + 2, device=mesh.device)
        v[mesh.rank] = self._local_bad()
        if mesh.rank == 0:
            save, stop = self.ckpt.clock()
            v[n], v[n + 1] = float(save), float(stop)
        if not self._hits("skip_collective", step):
            mesh.comm.all_reduce(v, mesh.world)
        vals = v.tolist()
        self.save_due, self.stop_due = bool(vals[n]), bool(vals[n + 1])
        bad = [r for r in range(n) if vals[r]]
        if not bad:
            self.in_a_row = 0
            return self._step(*args, **kwargs)
        self.skipped += 1
        self.in_a_row += 1
        self.last_skipped = True
        self.first_bad = self.first_bad if self.in_a_row > 1 else step
        if self.in_a_row >= self.max_bad:
            last = self.ckpt.last_path
            raise NonFiniteError(
                f"train.max_bad_steps = {self.max_bad}: steps {self.first_bad} to {step} all had a non-finite loss or "
                f"gradient norm (last on rank(s) {bad}), so the run stops. "
                + (f"The last good checkpoint is {last} (nothing was saved after it); resume from it with a lower "
                   f"optim.lr or a stricter optim.grad_clip." if last is not None else
                   "No checkpoint was saved (set checkpoint.every to keep one)."))
        if mesh.rank == 0:
            print(f"plait: step {step} skipped on every rank: non-finite loss or gradient norm on rank(s) {bad} "
                  f"({self.in_a_row} in a row, train.max_bad_steps = {self.max_bad})", flush=True)
        return None
