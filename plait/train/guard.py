"""`StepGuard`: the one per-step agreement of every rank: apply the step, save, stop; debug faults.

The training loop calls it explicitly: `observe(loss)` after forward and backward, `decide()` as
the parallel optimizer's `before_update` hook (after the gradients are reduced and clipped, before
the parameters change), `finish_step()` after `optimizer.step()`.

Agreement steps. Under every_step sync every step is one; under a sync strategy that keeps
replicas apart (local_sgd, diloco, streaming_diloco, delayed) only every `sync.every`-th step and
the run's last are, so inner steps make no collective of the loop's own. At an agreement step
`decide()` makes one all-reduce (SUM) over mesh.world of world_size + 2 + len(payload) floats and
one host read of the result:
- slot r = 1 when rank r saw a non-finite loss or gradient norm: the update is skipped on every
  rank (the data and the learning-rate schedule still advance); `train.max_bad_steps` skips in a
  row stop the run with NonFiniteError;
- two slots with rank 0's clock ("save now": checkpoint.every_minutes; "stop now":
  train.exit_after_minutes), so time-based decisions are the same on every rank;
- the payload (`payload()`, set by the loop): values summed over the world, e.g. the loss and the
  gradient-noise sums, which thereby cost no collective of their own.
Between agreement steps `decide()` checks this rank alone (one host read, no communication) and
skips this replica's update when its loss or gradient norm is not finite.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from plait.checkpoint.store import fault_once
from plait.errors import NonFiniteError


class StepGuard:
    def __init__(self, mesh, train_cfg, *, state, clock: Callable[[], tuple[bool, bool]],
                 optimizer, agree_every: int = 1, fault_root: Path | None = None,
                 last_checkpoint: Callable[[], Path | None] = lambda: None):
        self.mesh, self.state, self.clock, self.optimizer = mesh, state, clock, optimizer
        t = train_cfg
        self.total_steps = t.steps
        self.max_bad = t.max_bad_steps
        self.fault = t.fault if t.fault_rank == mesh.rank else "none"
        self.fault_step, self.fault_steps = t.fault_step, t.fault_steps
        self.fault_root = fault_root
        self.agree_every = agree_every
        self.last_checkpoint = last_checkpoint
        self.payload: Callable[[], torch.Tensor] | None = None
        self.in_a_row = 0
        self.first_bad = 0
        self.local_bad = 0  # this replica's skips since the last agreement (local strategies)
        self.loss: torch.Tensor | None = None
        self._decided = False
        self.reset()

    def reset(self) -> None:
        """Forget the last step's outcome (called at the start of each step)."""
        self.last_skipped = self.save_due = self.stop_due = False
        self.agreed: list[float] | None = None  # the summed payload of an agreement step
        self._decided = False

    def agreement_step(self, step: int) -> bool:
        return self.agree_every <= 1 or step % self.agree_every == 0 or step >= self.total_steps

    def _hits(self, kind: str, step: int) -> bool:
        if self.fault != kind:
            return False
        return (self.fault_step <= step
                < self.fault_step + (self.fault_steps if kind == "nan" else 1))

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Take this step's loss (this rank's share); the debug NaN fault poisons it here."""
        self.reset()
        if self._hits("nan", self.state.step + 1):
            loss = loss * float("nan")
        self.loss = loss
        return loss

    def _local_bad(self) -> torch.Tensor:
        """1.0 when this rank's loss or gradient norm is not finite
        (a tensor: no host sync here)."""
        popt = self.optimizer
        vals = [] if self.loss is None else [self.loss.detach().float().reshape(-1)]
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

    def decide(self, judge: bool = True) -> bool:
        """True: apply this step's update. Runs once per step (later calls repeat the verdict).
        `judge` False: the update is already skipped (an fp16 overflow, agreed by the loss scaler),
        so only the clock and the payload are agreed."""
        if self._decided:
            return not self.last_skipped
        self._decided = True
        mesh, step = self.mesh, self.state.step + 1
        if (self._hits("kill", step) and self.fault_root is not None
                and fault_once(self.fault_root, "kill")):
            os.kill(os.getpid(), signal.SIGKILL)
        if not self.agreement_step(step):
            # this replica alone: no collective between syncs
            bad = judge and bool(self._local_bad().item())
            self.local_bad += bad
            self.last_skipped = bad
            return not bad
        n = mesh.world_size
        extra = self.payload() if self.payload is not None else torch.zeros(0, device=mesh.device)
        v = torch.zeros(n + 2 + extra.numel(), device=mesh.device)
        if judge:
            v[mesh.rank] = self._local_bad()
        if mesh.rank == 0:
            save, stop = self.clock()
            v[n], v[n + 1] = float(save), float(stop)
        v[n + 2:] = extra.float()
        if not self._hits("skip_collective", step):
            mesh.comm.all_reduce(v, mesh.world)
        vals = v.tolist()  # the step's one host read
        self.save_due, self.stop_due = bool(vals[n]), bool(vals[n + 1])
        self.agreed = vals[n + 2:]
        bad = [r for r in range(n) if vals[r]]
        local, self.local_bad = self.local_bad, 0
        if not bad:
            self.in_a_row = 0
            return True
        return self._skip(step, bad, local)

    def _skip(self, step: int, bad: list[int], local: int) -> bool:
        self.state.skipped_steps += 1
        self.in_a_row += 1
        self.last_skipped = True
        self.first_bad = self.first_bad if self.in_a_row > 1 else step
        if self.in_a_row >= self.max_bad:
            last = self.last_checkpoint()
            raise NonFiniteError(
                f"train.max_bad_steps = {self.max_bad}: steps {self.first_bad} to {step} all had a "
                f"non-finite loss or gradient norm (last on rank(s) {bad}), so the run stops. "
                + (f"The last good checkpoint is {last} (nothing was saved after it); resume from "
                   f"it with a lower optim.lr or a stricter optim.grad_clip." if last is not None
                   else "No checkpoint was saved (set checkpoint.every to keep one)."))
        if self.mesh.rank == 0:
            more = f"; {local} local skip(s) since the last agreement" if local else ""
            print(f"plait: step {step} skipped on every rank: non-finite loss or gradient norm on "
                  f"rank(s) {bad} ({self.in_a_row} in a row, train.max_bad_steps = "
                  f"{self.max_bad}{more})", flush=True)
        return False

    def finish_step(self, applied: bool = True) -> None:
        """After optimizer.step() (`applied` False: an fp16 overflow skipped it): a step whose
        update never reached the hook still makes its agreement,
        so every rank issues the same collectives."""
        if not self._decided:
            self.decide(judge=applied)

