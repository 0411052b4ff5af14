"""A Llama-style decoder-only transformer, readable top to bottom.

RMSNorm, rotary position embeddings, SwiGLU feed-forward, causal SDPA attention with optional
grouped-query attention (fewer key/value heads than query heads), optional tied embeddings.

Packed documents: `forward(idx, positions)` takes each token's position within its document
(0 where a document starts). RoPE then rotates by those positions, and attention is causal and
block-diagonal: a token attends only to earlier tokens of its own document (`document_mask`).

This file imports nothing distributed. Parallel transforms swap its Linear / Embedding layers for
sharded ones; attention reads its local head count from the projection shapes, so a
tensor-parallel q_proj holding 1/t of the heads just works.

Shapes: B batch, T sequence, D model width, H query heads, K key/value heads, E head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped-query attention)
    d_model: int = 64
    ffn_hidden: int = 0  # 0: SwiGLU's 8/3·d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


# name: (n_layers, d_model, n_heads, n_kv_heads)
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=256),
    "10m": dict(n_layers=6, d_model=384, n_heads=6, max_seq_len=512),
    "124m": dict(n_layers=12, d_model=768, n_heads=12, max_seq_len=1024),
    "350m": dict(n_layers=24, d_model=1024, n_heads=16, max_seq_len=1024),
    "1.3b": dict(n_layers=24, d_model=2048, n_heads=16, max_seq_len=1024),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)  # (T, E/2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, E); cos, sin: (T, E/2), or (B, 1, T, E/2) for per-sample positions;
    # rotate pairs (x[2i], x[2i+1])
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) positions within documents -> (B, 1, T, T) boolean attention mask, True = attend.

    A document starts where the position is 0; token i may attend to token j when j <= i and both
    are in the same document (causal, block-diagonal).
    """
    doc = torch.cumsum(positions == 0, dim=-1)  # (B, T): document number of each token
    T = positions.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (causal & (doc.unsqueeze(-1) == doc.unsqueeze(-2))).unsqueeze(1)


def rope_at(cos: torch.Tensor, sin: torch.Tensor, T: int, positions: torch.Tensor | None = None):
    """The RoPE tables for a sequence of length T: rows [0, T), or (B, 1, T, E/2) gathered at
    per-sample `positions` (B, T)."""
    if positions is None:
        return cos[:T], sin[:T]
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention over (B, H, T, E) queries and (B, K, T, E) keys/values; `mask`
        (B, 1, T, T) boolean, True = attend, replaces the plain causal mask (document_mask)."""
        if k.shape[1] != q.shape[1]:  # grouped-query: each kv head serves H/K query heads
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.core(q, k, v, mask)  # (B, H, T, E)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # residual projections, GPT-2 scaling
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V). positions: (B, T) each token's position in
        its document (packed documents: attention stays within each one), or None: one sequence."""
        cos, sin = rope_at(self.rope_cos, self.rope_sin, idx.shape[1], positions)
        mask = None if positions is None else document_mask(positions)
        x = self.tok_emb(idx)  # (B, T, D)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def build_config(preset: str, **overrides) -> GPTConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**fields)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·D·T (PaLM appendix B).

    N counts the weights that take part in matrix multiplies (all but the token embedding lookup;
    with tied embeddings the shared matrix counts once, as the output projection).
    """
    D, L = cfg.d_model, cfg.n_layers
    attn = D * cfg.n_heads * cfg.head_dim * 2 + D * cfg.kv_heads * cfg.head_dim * 2
    mlp = 3 * D * cfg.ffn
    n_matmul = L * (attn + mlp) + D * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * L * D * seq_len
