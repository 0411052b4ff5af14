"""Payload encodings, pure functions with no communication (tested on their own).

Every encoding turns rows of fp32 values into rows of bytes (uint8) and back, so that one
collective moves a whole payload, scales included, and all ranks decode the same bytes to the
same numbers. Layout of one encoded row: [scales as fp32 bytes | data].

- sign: 1 bit per element (bit 1 = non-negative), bit-packed 8 to a byte, and one scale per chunk
  of `chunk` elements (0: one per row), the mean absolute value (the α minimising ‖x − α·sign(x)‖²
  over the chunk). Row length must divide by 8 and by the chunk.
- int8: round-to-nearest of x / s into [-127, 127], one scale s = max|x| / 127 per chunk of
  `chunk` elements. Row length must divide by `chunk`.
- top-k: k int32 indices followed by the k fp32 values' bits, in one int32 tensor.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # bit 7 holds the first element of a byte


def _scale_bytes(scales: torch.Tensor) -> torch.Tensor:
    # (rows, s) fp32 -> (rows, 4·s) uint8
    return scales.float().contiguous().view(torch.uint8).view(scales.shape[0], -1)


def _bytes_scale(raw: torch.Tensor, count: int) -> torch.Tensor:
    # (rows, 4·count) uint8 -> (rows, count) fp32;
    # clone: a slice of a row need not be 4-byte aligned
    return raw.reshape(-1).clone().view(torch.float32).view(raw.shape[0], count)


# -- sign --------------------------------------------------------------------------------------
def sign_row_bytes(length: int, chunk: int = 0) -> int:
    return 4 * (length // chunk if chunk else 1) + length // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(rows, L) bool -> (rows, L/8) uint8."""
    rows, length = bits.shape
    b = bits.view(rows, length // 8, 8).to(torch.uint8)
    return (b << _SHIFTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(rows, L/8) uint8 -> (rows, L) bool."""
    rows, nbytes = packed.shape
    return ((packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1).view(rows, nbytes * 8).bool()


def encode_sign(x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """(rows, L) float -> (rows, 4·s + L/8) uint8: s scales (mean|x| per chunk; s = 1 when
    chunk = 0), then the sign bits."""
    rows, length = x.shape
    c = chunk or length
    if length % 8 or length % c:
        raise ValueError("sign encoding needs a row length divisible by 8 and by the chunk "
                         f"{chunk}, got {length}")
    scale = x.abs().float().view(rows, length // c, c).mean(dim=-1)  # (rows, s)
    return torch.cat([_scale_bytes(scale), pack_bits(x >= 0)], dim=1)


def decode_sign(payload: torch.Tensor, length: int, chunk: int = 0) -> torch.Tensor:
    """(rows, 4·s + L/8) uint8 -> (rows, L) fp32 of ±scale of each element's chunk."""
    c = chunk or length
    s = length // c
    scale = _bytes_scale(payload[:, : 4 * s], s)
    signs = unpack_bits(payload[:, 4 * s:]).float().mul_(2).sub_(1)[:, :length]
    return signs.view(-1, s, c).mul_(scale.unsqueeze(-1)).view(-1, length)


# -- int8 --------------------------------------------------------------------------------------
def int8_row_bytes(length: int, chunk: int) -> int:
    return 4 * (length // chunk) + length


def encode_int8(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(rows, L) float -> (rows, 4·L/chunk + L) uint8: per-chunk scales, then int8 codes."""
    rows, length = x.shape
    if length % chunk:
        raise ValueError(f"int8 encoding needs a row length divisible by the chunk {chunk}, got "
                         f"{length}")
    xc = x.float().view(rows, length // chunk, chunk)
    scale = xc.abs().amax(dim=-1) / 127.0  # (rows, chunks)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xc / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return torch.cat([_scale_bytes(scale), q.view(rows, length).view(torch.uint8)], dim=1)


def decode_int8(payload: torch.Tensor, length: int, chunk: int) -> torch.Tensor:
    """(rows, 4·L/chunk + L) uint8 -> (rows, L) fp32."""
    rows = payload.shape[0]
    n_chunks = length // chunk
    scale = _bytes_scale(payload[:, : 4 * n_chunks], n_chunks)
    q = payload[:, 4 * n_chunks:].contiguous().view(torch.int8).float().view(rows, n_chunks, chunk)
    return q.mul_(scale.unsqueeze(-1)).view(rows, length)


# -- top-k -------------------------------------------------------------------------------------
def topk_counts(numels: list[int], fraction: float) -> list[int]:
    """k per tensor: ceil(fraction · numel),
    at least 1 and at most numel (the same on every rank)."""
    out = []
    for n in numels:
        k = int(-(-n * fraction // 1))  # ceil without float surprises on exact products
        out.append(max(1, min(n, k)))
    return out


def encode_topk(x: torch.Tensor, spans: list[tuple[int, int]],
                counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest-|x| entries of each span (offset, numel) of flat fp32 `x`.

    Returns (payload, picked): payload is int32 [2K] = K indices into `x`, then K fp32 value bits;
    picked is the int64 index tensor (to zero those entries in the residual).
    """
    idx = []
    for (off, n), k in zip(spans, counts):
        seg = x[off: off + n]
        idx.append(seg.abs().topk(k, sorted=False).indices + off)
    picked = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64, device=x.device)
    vals = x[picked].float()
    return torch.cat([picked.to(torch.int32), vals.view(torch.int32)]), picked


def decode_topk_into(out: torch.Tensor, payloads: torch.Tensor) -> torch.Tensor:
    """Sum rows of payloads ((ranks, 2K) int32) into flat `out` (zeroed first), in rank order."""
    out.zero_()
    k = payloads.shape[1] // 2
    for row in payloads:  # fixed order: every rank adds the same numbers in the same order
        out.index_add_(0, row[:k].long(), row[k:].contiguous().view(torch.float32).to(out.dtype))
    return out
