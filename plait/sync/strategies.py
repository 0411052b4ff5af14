"""The low-communication and asynchronous strategies, each a payload and a use on a cadence.

| strategy         | payload of a fragment  | use of the replicas' average     | exchange        |
|------------------|------------------------|----------------------------------|-----------------|
| local_sgd        | local parameters       | becomes the parameters           | inline, every H |
| diloco           | Δ = θ_global − θ_local | outer SGD-Nesterov step;         | inline, every H |
|                  |                        | θ_local ← θ_global               |                 |
| streaming_diloco | Δ of one fragment      | outer step τ steps later,        | background      |
|                  |                        | mixed by α                       |                 |
| delayed          | this step's gradient   | the optimizer step τ steps later | background      |

Replicas: the dp ranks, or with parallel.replicas > 1 the replicas of the layout (mesh.rep, dense
dp inside each every step). Bytes per rank (ring formula, n replicas, N local parameters, b bytes
per element of the codec):
local_sgd and diloco 2(n−1)/n · 4N every H steps (diloco: b instead of 4 when quantized);
streaming 2(n−1)/n · b·F per fragment sync with F ≈ N/P, P syncs every H steps (the same average
as diloco, the peak 1/P of it); delayed 2(n−1)/n · 4N every step, as plain data parallelism.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from plait.config import SyncConfig
from plait.mesh import Mesh
from plait.sync.base import EveryStep, ScheduledSync, SyncStrategy
from plait.sync.cadence import Apply, delayed_schedule, streaming_schedule
from plait.sync.transport import make_codec


class LocalSGD(ScheduledSync):
    """H local steps on each replica's own gradient, then the replicas' parameters are averaged
    (one blocking all-reduce of every parameter on the replicas' group, mesh.dp or mesh.rep)."""

    name = "local_sgd"

    def __init__(self, params, mesh: Mesh, every: int, total_steps: int | None = None,
                 slow_factor: float = 1.0):
        super().__init__(params, mesh, partial(_cadence, every, 1, 0, total_steps),
                         total_steps=total_steps, slow_factor=slow_factor)

    def payload(self, fragment):
        return self.flat.read(*self.span(fragment))

    def use(self, ins, avg, inner):
        self.flat.write(*self.span(ins.fragment), avg)


def _cadence(every, fragments, delay, steps, start):
    return streaming_schedule(every, fragments, delay, steps=steps, start=start)


class StreamingDiLoCo(ScheduledSync):
    """DiLoCo over P fragments, each synced every H steps on a staggered offset, its exchange
    overlapping τ inner steps (Douillard et al. 2025).

    State (identical on every replica): θ_global (the parameters at the last outer step) and the
    outer momentum, each a flat fp32 vector. On `Send` of fragment p: Δ_p = θ_global_p − θ_local_p
    is averaged over dp (optionally encoded: fp16 / int8 / fp4). On `Apply` τ steps later:
    m ← μ·m + Δ̄, θ_global_p ← θ_global_p − lr·(Δ̄ + μ·m) (Nesterov; μ = 0: plain SGD), then
    θ_local_p ← α·θ_local_p + (1 − α)·θ_global_p
    (α = 0 on the run's last step: all replicas end equal).
    """

    name = "streaming_diloco"

    def __init__(self, params, mesh: Mesh, every: int, fragments: int, delay: int, alpha: float,
                 outer_lr: float, outer_momentum: float, quantize: str = "none",
                 total_steps: int | None = None, slow_factor: float = 1.0):
        super().__init__(params, mesh, partial(_cadence, every, fragments, delay, total_steps),
                         fragments=fragments, codec=make_codec(quantize), background=delay > 0,
                         total_steps=total_steps, slow_factor=slow_factor)
        self.alpha = alpha
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.theta = self.flat.read(0, self.flat.length)  # θ_global
        self.momentum = torch.zeros_like(self.theta) if outer_momentum > 0 else None

    def payload(self, fragment):
        lo, hi = self.span(fragment)
        return self.theta[lo:hi] - self.flat.read(lo, hi)

    def use(self, ins: Apply, avg, inner):
        lo, hi = self.span(ins.fragment)
        theta = self.theta[lo:hi]
        step = avg
        if self.momentum is not None:
            m = self.momentum[lo:hi]
            m.mul_(self.outer_momentum).add_(avg)
            step = avg.add(m, alpha=self.outer_momentum)
        theta.sub_(step, alpha=self.outer_lr)
        if ins.final or self.alpha == 0.0:
            self.flat.write(lo, hi, theta)
        else:
            self.flat.write(lo, hi, torch.lerp(theta, self.flat.read(lo, hi), self.alpha))

    def state_dict(self):
        sd = super().state_dict()
        sd["theta_global"] = self.theta.clone()
        if self.momentum is not None:
            sd["outer_momentum"] = self.momentum.clone()
        return sd

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.theta.copy_(sd["theta_global"])
        if self.momentum is not None:
            self.momentum.copy_(sd["outer_momentum"])


class DiLoCo(StreamingDiLoCo):
    """DiLoCo (Douillard et al. 2023): H inner steps with any optimizer, then one blocking outer
    step on the averaged outer gradient; every replica restarts from θ_global."""

    name = "diloco"

    def __init__(self, params, mesh: Mesh, every: int, outer_lr: float, outer_momentum: float,
                 quantize: str = "none", total_steps: int | None = None, slow_factor: float = 1.0):
        super().__init__(params, mesh, every, 1, 0, 0.0, outer_lr, outer_momentum, quantize,
                         total_steps, slow_factor)


class Delayed(ScheduledSync):
    """Data parallelism with stale gradients (PipeDream-2BW's one-step delay for τ = 1): step t's
    summed gradient is all-reduced in the background while step t + 1 computes, and the optimizer
    steps on the gradient of step t − τ. The first τ steps do not update; the run's last step
    applies what is still in flight. Replicas stay identical (they all step on the same sums)."""

    name = "delayed"

    def __init__(self, params, mesh: Mesh, delay: int = 1, total_steps: int | None = None,
                 slow_factor: float = 1.0):
        super().__init__(params, mesh, partial(delayed_schedule, delay, total_steps),
                         background=True, total_steps=total_steps, slow_factor=slow_factor)

    def payload(self, fragment):
        # summed over the replicas, not averaged: the loop already normalized by the global batch
        # (base.py)
        return self.flat.read(*self.span(fragment), grads=True).mul_(self.group.size)

    def use(self, ins, avg, inner):
        self.flat.write(*self.span(ins.fragment), avg, grads=True)
        inner()


def build_strategy(cfg: SyncConfig, params: list[nn.Parameter], mesh: Mesh,
                   total_steps: int | None = None) -> SyncStrategy:
    """The strategy `cfg.strategy` over this rank's `params`
    (collective when it needs a background group).

    `total_steps`: the run's length, when known; the last step then ends every exchange in flight
    (and, for local_sgd / diloco / streaming_diloco, leaves every replica with the same parameters).
    """
    slow = cfg.slow_factor if mesh.rank == cfg.slow_rank else 1.0
    s = cfg.strategy
    if s == "every_step":
        return EveryStep(slow)
    if s == "local_sgd":
        return LocalSGD(params, mesh, cfg.every, total_steps, slow)
    if s == "diloco":
        return DiLoCo(params, mesh, cfg.every, cfg.outer_lr, cfg.outer_momentum, cfg.quantize,
                      total_steps, slow)
    if s == "streaming_diloco":
        return StreamingDiLoCo(params, mesh, cfg.every, cfg.fragments, cfg.delay, cfg.alpha,
                               cfg.outer_lr, cfg.outer_momentum, cfg.quantize, total_steps, slow)
    if s == "delayed":
        return Delayed(params, mesh, cfg.delay, total_steps, slow)
    raise ValueError(f"sync.strategy = {s!r}")
