"""The [optim] section -> a factory `params -> torch optimizer` (what `parallelize()` takes)."""

from __future__ import annotations

import torch
import torch.nn as nn

from plait.config import OptimConfig
from plait.optim.lamb import LAMB
from plait.optim.lars import LARS
from plait.optim.layerwise import NormReducer
from plait.optim.onebit_adam import OneBitAdamFactory


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms' weights and biases (1-D) are not decayed."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def optimizer_factory(cfg: OptimConfig, device: torch.device,
                      norm_reducer: NormReducer | None = None):
    """params -> torch optimizer, as configured. Fused AdamW on CUDA.

    `norm_reducer` reaches LAMB / LARS (the whole-layer norms of sharded parameters, see
    plait.optim.layerwise); the other optimizers are element-wise and ignore it.
    """
    # a factory that carries its data-parallel exchange (see parallelize)
    if cfg.name == "onebit_adam":
        return OneBitAdamFactory(cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay,
                                 lambda params: param_groups(params, cfg.weight_decay))

    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        groups = param_groups(params, cfg.weight_decay)
        if cfg.name == "adamw":
            kw = {"fused": True} if device.type == "cuda" else {}
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                     **kw)
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        if cfg.name == "lamb":
            return LAMB(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                        weight_decay=cfg.weight_decay, norm_reducer=norm_reducer)
        if cfg.name == "lars":
            return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        norm_reducer=norm_reducer)
        raise ValueError(f"optim.name = {cfg.name!r}: choose adamw, sgd, lamb or lars")

    return build
