"""Dynamic loss scaling for fp16 training, and the all-ranks agreement on non-finite values.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The loss is multiplied by a scale S
before backward, so every activation gradient is S times larger; the parameters' fp32 gradients
are divided by S again before anything reads them (clipping, the optimizer). When S is too large
some fp16 gradient overflows to inf (or an inf − inf gives nan): that step is skipped and S halved.
After `growth_interval` steps in a row without overflow S doubles, to use the range again
(Micikevicius et al. 2018; torch's GradScaler follows the same rule). S never goes below a floor
(`min_scale`, train.loss_scale_min, 1 by default): gradients that still overflow there are inf / nan
at any scale (a diverged run, not a range problem), and the run stops with NonFiniteError instead
of skipping every step from then on.

Every rank must take the same decision, or replicas and pipeline stages diverge: an overflow in one
tensor-parallel shard or one pipeline stage is invisible to the other ranks. So the local found-inf
flag is agreed by one all-reduce (MAX) of one float over mesh.world: 4 bytes, 2(n−1)/n · 4 on the
wire, and one host sync per step (the decision is a Python bool). bf16 shares fp32's exponent range
and needs no scaling.
"""

from __future__ import annotations

import torch

from plait.errors import ConfigError, NonFiniteError
from plait.mesh import Mesh


def any_rank(flag: torch.Tensor, mesh: Mesh) -> bool:
    """True on every rank when `flag` (a number, 0 = no) is non-zero on any rank of mesh.world.

    Communication: one all-reduce (MAX) of one fp32 element over mesh.world; waits for it.
    """
    v = flag.detach().float().reshape(1).to(mesh.device, copy=True)
    mesh.comm.all_reduce(v, mesh.world, op="max")
    return bool(v.item() != 0)


def any_rank_nonfinite(tensor: torch.Tensor, mesh: Mesh) -> bool:
    """True on every rank when some element of `tensor` (this rank's loss, norm, ...) is inf or nan
    on any rank of mesh.world. Communication: as `any_rank`."""
    return any_rank((~torch.isfinite(tensor.detach())).any(), mesh)


def _local(g: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient (ZeRO-3) by its local shard: the check must not communicate per tensor."""
    to_local = getattr(g, "to_local", None)
    return to_local() if to_local is not None else g


class LossScaler:
    """The scale S and its schedule. One per training run, the same on every rank.

    Use: multiply the loss by `scale` before backward; then `unscale_and_check(grads, mesh)` before
    clipping and the optimizer step: it divides the gradients by S in place, agrees over mesh.world
    whether any rank overflowed, updates S and returns True when the step may be applied.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        if (init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1
                or growth_interval < 1):
            raise ValueError("LossScaler: init_scale > 0, growth_factor > 1, "
                             "0 < backoff_factor < 1 and growth_interval >= 1 are needed (got "
                             f"{init_scale}, {growth_factor}, {backoff_factor}, {growth_interval})")
        if not 0 < min_scale <= init_scale:
            raise ConfigError(f"train.loss_scale_min = {min_scale} must be > 0 and at most "
                              f"train.loss_scale_init = {init_scale}")
        self.scale = float(init_scale)
        self.min_scale = float(min_scale)
        self.in_a_row = 0  # overflow skips since the last applied step
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # overflow-free steps since the last change of S
        self.skipped = 0  # steps skipped for overflow, in total
        self.last_overflow = False

    def unscale_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divide `grads` by S in place; return this rank's found-inf flag
        (a 1-element tensor, no host sync)."""
        local = [_local(g) for g in grads]
        device = local[0].device if local else torch.device("cpu")
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in local:
            by_device.setdefault(g.device, []).append(g)
        # one fused pass per device: unscale and look for inf / nan
        for dev, gs in by_device.items():
            f = torch.zeros(1, dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, f, inv.to(dev))
            found = torch.maximum(found, f.to(device))
        return found

    def update(self, overflow: bool) -> None:
        """Halve S after an overflow; double it after `growth_interval` good steps in a row."""
        self.last_overflow = overflow
        if overflow:
            if self.scale <= self.min_scale:
                raise NonFiniteError(
                    "fp16 loss scaling: the gradients overflowed at the minimum scale "
                    f"train.loss_scale_min = {self.min_scale:g} ({self.in_a_row + 1} overflow "
                    f"steps in a row, {self.skipped + 1} in all): they are inf / nan at every "
                    "scale, which lowering it further does not cure. Lower optim.lr, set "
                    "optim.grad_clip, or train with train.dtype = bf16")
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped += 1
            self.in_a_row += 1
            return
        self.in_a_row = 0
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def unscale_and_check(self, grads: list[torch.Tensor], mesh: Mesh) -> bool:
        """Unscale, agree over mesh.world (one 4-byte all-reduce), update S.
        True: apply this step."""
        overflow = any_rank(self.unscale_(grads), mesh)
        self.update(overflow)
        return not overflow

    def state_dict(self) -> dict:
        # in_a_row: per session
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.good_steps = int(sd["good_steps"])
        self.skipped = int(sd.get("skipped", 0))
