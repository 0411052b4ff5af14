"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import torch
import torch.nn as nn

from plait.config import OptimConfig
from plait.optim.schedule import lr_factor


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms' weights and biases (1-D) are not decayed."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def optimizer_factory(cfg: OptimConfig, device: torch.device):
    """params -> torch optimizer, as configured. Fused AdamW on CUDA."""

    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        groups = param_groups(params, cfg.weight_decay)
        if cfg.name == "adamw":
            kw = {"fused": True} if device.type == "cuda" else {}
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        raise ValueError(f"optim.name = {cfg.name!r}: choose adamw or sgd")

    return build


__all__ = ["lr_factor", "optimizer_factory", "param_groups"]
