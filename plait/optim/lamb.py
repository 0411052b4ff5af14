"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes").

Per parameter tensor (a "layer"), at step t with gradient g:

    m ← β1·m + (1−β1)·g            v ← β2·v + (1−β2)·g²
    r = m̂ / (√v̂ + ε)               (m̂, v̂ bias-corrected)
    u = r + λ·w                     (λ: weight decay)
    w ← w − lr · φ · u,   φ = ‖w‖ / ‖u‖   (1 when either norm is 0;
                                          clamped to max_trust_ratio if set)

Parameters that are not adapted (1-D by default: biases, norm weights) take the plain Adam step
w ← w − lr·r, with no trust ratio and no weight decay.

Communication contract: the only cross-rank step is the optional `norm_reducer` (see
plait.optim.layerwise), called once per `step()` with the [‖w‖², ‖u‖²] rows of the adapted local
pieces; with it, a sharded parameter gets exactly the trust ratio of its whole layer. The
element-wise update is local. Memory: the adapted parameters' updates u are held until the norms
are reduced (one parameter-sized temporary on top of Adam's two moments).
"""

from __future__ import annotations

import torch

from plait.optim.layerwise import NormReducer, decay_of, is_adapted, reduce_norms, squared_norms


class LAMB(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 max_trust_ratio: float | None = None, norm_reducer: NormReducer | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"LAMB: lr ({lr}), eps ({eps}) and weight_decay ({weight_decay}) must "
                             "be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LAMB: betas {betas} must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust_ratio=max_trust_ratio,
                        adapt=None)
        super().__init__(params, defaults)
        self.norm_reducer = norm_reducer

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adapted: list[tuple[torch.Tensor, torch.Tensor, dict]] = []  # (param, update u, group)
        device = None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                device = device or p.device
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
                u = (m / c1) / ((v / c2).sqrt_().add_(group["eps"]))
                wd = decay_of(group, p)
                if wd:
                    u.add_(p.float(), alpha=wd)
                if is_adapted(group, p):
                    adapted.append((p, u, group))
                else:
                    p.add_(u.to(p.dtype), alpha=-group["lr"])
        params = [p for p, _, _ in adapted]
        sq = reduce_norms(self.norm_reducer, params,
                          squared_norms([(p, u) for p, u, _ in adapted], device))
        norms = sq.sqrt()
        for i, (p, u, group) in enumerate(adapted):
            w_norm, u_norm = norms[i, 0], norms[i, 1]
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                torch.ones_like(w_norm))
            if group["max_trust_ratio"] is not None:
                ratio = ratio.clamp(max=group["max_trust_ratio"])
            p.add_((u * ratio).to(p.dtype), alpha=-group["lr"])
        return loss
