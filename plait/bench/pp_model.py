"""The model of `plait bench pp`: identical GPT blocks that each map a hidden state to the next."""

from __future__ import annotations

import torch
import torch.nn as nn

from plait.models.gpt import Block, rope_tables


class RopeBlock(nn.Module):
    """A GPT block that carries its own RoPE tables, so it maps one hidden state to the next."""

    def __init__(self, cfg, seq_len: int):
        super().__init__()
        self.block = Block(cfg)
        cos, sin = rope_tables(cfg.head_dim, seq_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        T = x.shape[1]
        return self.block(x, self.cos[:T], self.sin[:T])


def mse_sum(out: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    return nn.functional.mse_loss(out.float(), target.float(), reduction=reduction)
