"""Online estimate of the gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018).

G is the true gradient, Σ the per-sample gradient covariance; B_simple (in samples) is where a
bigger batch stops paying: far below it, doubling the batch halves the steps; far above it, extra
samples per step buy almost nothing.

Estimator (two batch sizes, no extra backward pass). A gradient averaged over b samples has
E‖G_b‖² = |G|² + tr(Σ)/b. Each step already computes gradients at two sizes:
- small, b = train.micro_batch: every micro-batch's own gradient, before accumulation and before
  the data-parallel reduction. A tensor hook on each parameter sees exactly that micro-batch's
  contribution to .grad (autograd calls it before accumulating, and before the reducer's
  post-accumulate hooks start any all-reduce), so its squared norm costs one fp32 norm per
  parameter per micro-batch, accumulated on the device with no synchronization. The contribution
  is (b/B)·G_b because the trainer divides each micro-batch's summed loss by the step's global
  token count; the estimator undoes that factor. All micro-batches of all dp ranks are averaged.
- big, B = the step's global batch: the accumulated, reduced gradient, whose norm the optimizer
  already computed for clipping (when optim.grad_clip = 0 the optimizer's `grad_norm()` computes
  it, which knows how the layout shards gradients: tp pieces, ZeRO pieces).
Then (REFERENCE.md, "Critical batch")

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)        tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Both are unbiased but noisy per step; each is smoothed by an exponential moving average and the
ratio of the averages is reported as `critical_batch` (a ratio of averages, not an average of
ratios, which the noisy denominator would wreck). It needs B > b: a run with one micro-batch on
one rank has no second batch size and reports nothing. It also needs the step's gradient to be
the exact gradient of the global batch (see `supported`): sync strategies that keep replicas
apart, lossy gradient compression and ZeRO-3 (whose gradients reach the parameters already
reduce-scattered) report nothing.

The smoothing lags: the estimate trails the true B_simple by about 1/(1−β) steps, and B_simple
grows as the loss falls, so a run with few large steps reads lower than a run with many small
ones at the same sample count. Units: samples (sequences), like train.global_batch.

Communication contract: the small-batch sum must be summed over every dp rank's micro-batches
and every model-parallel piece (tp-replicated weights counted on tp rank 0 only). The trainer
sends its dp part inside the all-reduce it already makes for the logged loss (so a pure
data-parallel run adds no collective), and `NoiseScaleMonitor.end_step` sums the rest over
`mesh.mp` (a 4-byte all-reduce, only when tp·pp > 1). Called alone, `end_step` makes one
all-reduce (SUM) of two fp32 values on `mesh.world`. When the optimizer did not clip, its
`grad_norm()` adds that method's own reduction. Every rank must call it once per step.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn


def two_batch_estimate(b_small: float, sq_small: float, b_big: float,
                       sq_big: float) -> tuple[float, float]:
    """(|G|², tr(Σ)) from mean squared gradient norms at batch sizes b_small < b_big."""
    if not b_big > b_small > 0:
        raise ValueError(f"two_batch_estimate needs 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def supported(cfg) -> str | None:
    """None when the trainer's gradients give an exact estimate under `cfg`, else why not."""
    if cfg.sync.strategy != "every_step":
        return f"sync.strategy = {cfg.sync.strategy} steps replicas on their own gradients"
    if cfg.compression.name not in ("none", "fp16", "bf16") or cfg.optim.name == "onebit_adam":
        return "the reduced gradient is compressed"
    if cfg.parallel.zero == 3:
        return "ZeRO-3 gradients reach the parameters already reduce-scattered"
    return None


class NoiseScale:
    """EMA-smoothed B_simple from a stream of (b_small, |G_small|², b_big, |G_big|²) measurements.

    The squared norms may be Python floats or 0-d tensors (then nothing leaves the device: the
    value is a tensor, NaN while there is no estimate; `metric_value` turns it into a float or
    None).
    """

    def __init__(self, beta: float = 0.95):
        self.beta = beta
        self.g2 = 0.0
        self.trace = 0.0
        self.updates = 0

    def update(self, b_small: float, sq_small: float, b_big: float, sq_big: float):
        g2, trace = two_batch_estimate(b_small, sq_small, b_big, sq_big)
        # the EMAs start at 0, but only their ratio is reported, so no bias correction is needed
        new_g2 = self.beta * self.g2 + (1 - self.beta) * g2
        new_trace = self.beta * self.trace + (1 - self.beta) * trace
        # a non-finite step (an fp16 overflow) leaves the averages as they were
        if isinstance(new_g2, torch.Tensor):
            ok = torch.isfinite(new_g2) & torch.isfinite(new_trace)
            self.g2 = torch.where(
                ok, new_g2, torch.as_tensor(self.g2, dtype=new_g2.dtype, device=new_g2.device))
            self.trace = torch.where(ok, new_trace,
                                     torch.as_tensor(self.trace, dtype=new_g2.dtype,
                                                     device=new_g2.device))
        elif math.isfinite(new_g2) and math.isfinite(new_trace):
            self.g2, self.trace = new_g2, new_trace
        else:
            return self.value
        self.updates += 1
        return self.value

    def state_dict(self) -> dict:
        return {"g2": self.g2, "trace": self.trace, "updates": self.updates}

    def load_state_dict(self, sd: dict) -> None:
        self.g2, self.trace, self.updates = sd["g2"], sd["trace"], int(sd["updates"])

    @property
    def value(self):
        """The current B_simple in samples, or None (NaN for tensors) while the smoothed |G|² is not
        positive."""
        if self.updates == 0:
            return None
        if isinstance(self.g2, torch.Tensor):
            ok = (self.g2 > 0) & (self.trace >= 0)
            return torch.where(ok, self.trace / self.g2, torch.full_like(self.g2, math.nan))
        if self.g2 <= 0 or self.trace < 0:
            return None
        return self.trace / self.g2


def metric_value(x) -> float | None:
    """A `critical_batch` value as a plain float for logs (None when there is no estimate yet)."""
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) else v


class NoiseScaleMonitor:
    """The trainer's side: per-micro-batch gradient norms from tensor hooks, one reduction per step.

    Call `begin_step()` before a step's first forward and `end_step(optimizer, global_batch)`
    after `optimizer.step()` and before `zero_grad()` (the reduced gradients must still be in
    .grad when the optimizer did not clip). The estimate stays on the device (no host
    synchronization per step); at logging steps the loop reads it and passes it to `check`,
    which warns when the global batch is far from it.
    """

    def __init__(self, params: list[nn.Parameter], mesh, micro_batch: int, beta: float = 0.95,
                 factor: float = 10.0, warn_after: int | None = None, lead: bool | None = None):
        self.mesh = mesh
        self.micro = micro_batch
        self.estimate = NoiseScale(beta)
        self.factor = factor
        self.warn_after = warn_after if warn_after is not None else math.ceil(3 / (1 - beta))
        self.lead = lead if lead is not None else mesh.rank == 0
        self._last_check: float | None = None
        self.warned: set[str] = set()
        self.active = False
        self._sq = torch.zeros((), dtype=torch.float32, device=mesh.device)
        self._scale = 1.0
        seen: set[int] = set()
        self.params = [p for p in params
                       if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        # a tp-replicated weight's gradient is whole on every tp rank: count it once
        self.counted = [p for p in self.params
                        if not (getattr(p, "plait_tp_replicated", False) and mesh.tp_index != 0)]
        self._hooks = [p.register_hook(self._on_grad) for p in self.counted]

    def _on_grad(self, grad: torch.Tensor) -> None:
        if self.active:
            self._sq += torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()

    def begin_step(self, grad_scale: float = 1.0) -> None:
        """`grad_scale`: what backward multiplies this step's gradients by (the fp16 loss scale),
        undone here."""
        self._sq.zero_()
        self._scale = grad_scale
        self.active = True

    @property
    def local_sum(self) -> torch.Tensor:
        """This step's Σ over this rank's micro-batches of ‖its gradient piece‖² so far
        (0-d, on the device)."""
        return self._sq / self._scale ** 2 if self._scale != 1.0 else self._sq

    def end_step(self, optimizer, global_batch: int, dp_sum: torch.Tensor | None = None,
                 applied: bool = True, world_sum: float | None = None) -> dict:
        """Fold this step in; returns {'critical_batch': the smoothed estimate} (a 0-d tensor, NaN
        while there is none; None before the first step with two batch sizes). See `metric_value`.

        `dp_sum`: `local_sum` already summed over mesh.dp by the caller (the trainer sends it in the
        loss's all-reduce); then only model-parallel pieces are summed here (over mesh.mp, when it
        has more than one rank). `world_sum`: `local_sum` summed over mesh.world by the caller (the
        training loop's step agreement carries it): no collective here. Neither: end_step sums it
        over mesh.world itself. `applied` False (an fp16 overflow skipped the update on every rank):
        the step is left out.
        """
        self.active = False
        B, b = global_batch, self.micro
        # one micro-batch in the whole step (e.g. the start of a ramp-up): no second size
        if B <= b or not applied:
            return {"critical_batch": self.estimate.value}
        clipped = (getattr(optimizer, "grad_clip", 0) > 0
                   and getattr(optimizer, "last_grad_norm", None) is not None)
        # a plain optimizer over whole tensors
        own_norm = not clipped and not hasattr(optimizer, "grad_norm")
        big_local = torch.zeros((), dtype=torch.float32, device=self.mesh.device)
        if own_norm:
            for p in self.counted:
                if p.grad is not None:
                    big_local += torch.linalg.vector_norm(p.grad.detach(),
                                                          dtype=torch.float32).square()
        if world_sum is not None:
            small = torch.tensor(world_sum, dtype=torch.float32, device=self.mesh.device)
            big_sum = big_local
            if own_norm:
                self.mesh.comm.all_reduce(big_sum, self.mesh.world)
        elif dp_sum is None:
            vec = torch.stack([self.local_sum, big_local])
            self.mesh.comm.all_reduce(vec, self.mesh.world)
            small, big_sum = vec[0], vec[1]
        else:
            small = dp_sum.detach().float().clone()
            # tp / pp pieces (free when mp has one rank)
            self.mesh.comm.all_reduce(small, self.mesh.mp)
            big_sum = big_local
            if own_norm:
                self.mesh.comm.all_reduce(big_sum, self.mesh.world)
        # mean over the B/b micro-batches of ‖G_b‖² (see the module docstring)
        sq_small = small * (B / b)
        if own_norm:
            # every dp rank of every replica added the same reduced |G_B|²
            sq_big = big_sum / self.mesh.data_size
        else:
            # the pre-clipping norm
            norm = optimizer.last_grad_norm if clipped else optimizer.grad_norm()
            sq_big = torch.as_tensor(norm, dtype=torch.float32, device=small.device).square()
        return {"critical_batch": self.estimate.update(b, sq_small, B, sq_big)}

    def check(self, global_batch: int, value: float | None) -> None:
        """At a logging step, with the estimate read on the host: warn once per direction when the
        global batch is `factor` times off, and only once the estimate is reliable: after
        `warn_after` updates (3/(1−β): the EMAs' zero start has faded below 5%) and when it agrees
        within 2× with its value at the previous check (the estimate grows as the loss falls)."""
        n = self.estimate.updates
        last, self._last_check = self._last_check, value
        if not self.lead or value is None or last is None or n < self.warn_after:
            return
        if max(value, last) > 2 * min(value, last):
            return
        self._maybe_warn(global_batch, value)

    def _maybe_warn(self, B: int, value: float | None) -> None:
        if value is None:
            return
        if B > self.factor * value and "above" not in self.warned:
            self.warned.add("above")
            print(f"plait: warning: global batch {B} is {B / max(value, 1e-30):.0f}× the estimated "
                  f"critical batch {value:.0f} (gradient noise scale): most of each step's samples "
                  "are wasted; a smaller train.global_batch reaches the same loss with far fewer "
                  "samples", file=sys.stderr, flush=True)
        if B * self.factor < value and "below" not in self.warned:
            self.warned.add("below")
            print(f"plait: warning: global batch {B} is {value / B:.0f}× below the estimated "
                  f"critical batch {value:.0f} (gradient noise scale): a larger train.global_batch "
                  f"would reach the same loss in far fewer steps at about the same samples",
                  file=sys.stderr, flush=True)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
