"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks").

Per parameter tensor (a "layer"), with gradient g, global learning rate lr, trust coefficient η,
weight decay λ and momentum μ (Algorithm 1 of the paper):

    φ = η · ‖w‖ / (‖g‖ + λ·‖w‖)        (1 when ‖w‖ or ‖g‖ is 0)
    buf ← μ·buf + lr·φ·(g + λ·w)
    w ← w − buf

Parameters that are not adapted (1-D by default: biases, norm weights) take plain momentum SGD,
buf ← μ·buf + lr·g, with no trust ratio and no weight decay. Because φ carries η (0.001 by
default), LARS learning rates are orders of magnitude above SGD's (the paper uses lr of several
units for AlexNet / ResNet at batch 8k–32k).

Communication contract: the only cross-rank step is the optional `norm_reducer` (see
plait.optim.layerwise), called once per `step()` with the [‖w‖², ‖g‖²] rows of the adapted local
pieces; with it, a sharded parameter gets exactly the trust ratio of its whole layer.
"""

from __future__ import annotations

import torch

from plait.optim.layerwise import NormReducer, decay_of, is_adapted, reduce_norms, squared_norms


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 1e-4,
                 trust_coefficient: float = 1e-3, nesterov: bool = False,
                 norm_reducer: NormReducer | None = None):
        if lr < 0 or weight_decay < 0 or trust_coefficient <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"LARS: lr ({lr}) and weight_decay ({weight_decay}) must be >= 0, "
                             f"trust_coefficient ({trust_coefficient}) > 0, momentum ({momentum}) "
                             "in [0, 1)")
        if nesterov and momentum == 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, nesterov=nesterov, adapt=None)
        super().__init__(params, defaults)
        self.norm_reducer = norm_reducer

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the trust ratio needs whole-layer norms before any update: norms first, then the steps
        todo: list[tuple[torch.Tensor, dict, bool]] = []
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                device = device or p.device
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                todo.append((p, group, is_adapted(group, p)))
        adapted = [p for p, _, a in todo if a]
        sq = reduce_norms(self.norm_reducer, adapted,
                          squared_norms([(p, p.grad) for p in adapted], device))
        norms = iter(sq.sqrt())
        for p, group, adapt in todo:
            g = p.grad.float()
            wd = decay_of(group, p)
            d = g.add(p.float(), alpha=wd) if wd else g
            scale = group["lr"]
            if adapt:
                w_norm, g_norm = next(norms)
                ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm),
                                    torch.ones_like(w_norm))
                d = d * (scale * ratio)
            else:
                d = d * scale
            mu = group["momentum"]
            if mu:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(mu).add_(d)
                buf = state["momentum_buffer"]
                d = d.add(buf, alpha=mu) if group["nesterov"] else buf
            p.sub_(d.to(p.dtype))
        return loss
