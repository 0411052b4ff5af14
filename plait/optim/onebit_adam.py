"""1-bit Adam (Tang et al. 2021): Adam for a warm-up, then frozen variance and 1-bit momentum.

Warm-up (the first `dp_exchange.warmup_steps` steps): the reducer all-reduces gradients densely and
the update is AdamW's (decoupled weight decay, bias-corrected), step for step the same arithmetic
as torch.optim.AdamW.

Compressed phase: the variance v is frozen at its last warm-up value. The reducer leaves each
rank's local gradient g_i in place (it sends nothing, see plait.compression.onebit), and the
optimizer computes, for every parameter of every group,

    x_i = β1 · m / n + (1 − β1) · g_i        (Σ_i x_i = β1·m + (1 − β1)·Σ_i g_i,
                                             Σ_i g_i the gradient)
    m   = Σ_i x_i                            one sign-compressed two-phase exchange of all
                                             parameters flattened together (worker and server
                                             error feedback), the same m on every rank
    p  -= lr · (wd · p + m̂ / (√v̂_frozen + eps))

Communication contract: in the compressed phase one all-to-all and one all-gather on the dp group
per step, 2(n−1)/n · (d'/8 + 4n) bytes per rank for d parameters (d' = d rounded up to 8n); in the
warm-up, the reducer's dense all-reduce. Gradient clipping (ParallelOptimizer) then acts on each
rank's local gradient. A parameter must receive gradients during the warm-up: its frozen variance
is what scales its later updates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from plait.compression.onebit import OneBitExchange


class OneBitAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 100,
                 error_feedback: bool = True, exchange: OneBitExchange | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.dp_exchange = (exchange if exchange is not None
                            else OneBitExchange(warmup_steps, error_feedback))

    @property
    def compressing(self) -> bool:
        """True when this step's gradients are local and the momentum is exchanged 1-bit."""
        return self.dp_exchange.steps >= self.dp_exchange.warmup_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ex = self.dp_exchange
        if self.compressing:
            self._compressed_step(ex.steps + 1)
        else:
            self._adam_step(ex.steps + 1)
        ex.advance()
        return loss

    def _state(self, p: nn.Parameter) -> dict:
        st = self.state[p]
        if not st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _adam_step(self, t: int) -> None:
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))

    def _compressed_step(self, t: int) -> None:
        ex = self.dp_exchange
        n = ex.world
        entries = [(group, p) for group in self.param_groups for p in group["params"]]
        # one flat vector of every parameter, in a fixed order: the same layout on every rank
        x = torch.empty(sum(p.numel() for _, p in entries), dtype=torch.float32,
                        device=entries[0][1].device if entries else None)
        off = 0
        for group, p in entries:
            b1 = group["betas"][0]
            seg = x[off: off + p.numel()].view_as(p)
            seg.copy_(self._state(p)["exp_avg"]).mul_(b1 / n)
            if p.grad is not None:
                seg.add_(p.grad, alpha=1 - b1)
            off += p.numel()
        ex.momentum_sum(x)
        frozen_t = ex.warmup_steps
        off = 0
        for group, p in entries:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            st = self._state(p)
            m = st["exp_avg"]
            m.copy_(x[off: off + p.numel()].view_as(p))
            off += p.numel()
            p.mul_(1 - lr * wd)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** frozen_t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))

    # -- checkpoint state: the exchange's step count and error buffers travel with the optimizer
    def state_dict(self):
        sd = super().state_dict()
        sd["onebit"] = self.dp_exchange.state_dict()
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        onebit = state_dict.pop("onebit", None)
        super().load_state_dict(state_dict)
        if onebit is not None:
            self.dp_exchange.load_state_dict(onebit)


class OneBitAdamFactory:
    """params -> OneBitAdam, carrying the shared `dp_exchange` that parallelize() hands the
    reducer."""

    def __init__(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 groups_fn, warmup_steps: int = 10):
        self.kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.groups_fn = groups_fn
        self.dp_exchange = OneBitExchange(warmup_steps)

    def __call__(self, params: list[nn.Parameter]) -> OneBitAdam:
        return OneBitAdam(self.groups_fn(params), exchange=self.dp_exchange, **self.kw)
