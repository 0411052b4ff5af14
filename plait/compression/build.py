"""The [compression] section -> the compressor that exchanges the reducer's gradient buckets."""

from __future__ import annotations

from plait.compression.base import BF16Compressor, Compressor, FP16Compressor, NoCompression
from plait.compression.onebit import OneBitExchange
from plait.compression.powersgd import PowerSGDCompressor
from plait.compression.quantized import Int8Compressor, SignCompressor
from plait.compression.topk import TopKCompressor
from plait.errors import ConfigError

NAMES = ("none", "fp16", "bf16", "int8", "topk", "sign", "powersgd")


def make_compressor(name: str, rank: int = 4, topk_fraction: float = 0.01,
                    error_feedback: bool = True, warmup_steps: int = 0,
                    sign_chunk: int = 256) -> Compressor:
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return FP16Compressor()
    if name == "bf16":
        return BF16Compressor()
    if name == "int8":
        return Int8Compressor(error_feedback)
    if name == "sign":
        return SignCompressor(error_feedback, sign_chunk)
    if name == "topk":
        return TopKCompressor(topk_fraction, error_feedback)
    if name == "powersgd":
        return PowerSGDCompressor(rank, warmup_steps, error_feedback)
    raise ConfigError(f"compression.name = {name!r}: choose one of {', '.join(NAMES)}")


def build_compressor(cfg=None, owner: OneBitExchange | None = None) -> Compressor | None:
    """The reducer's bucket exchange from a CompressionConfig; None (no section): plain all-reduce.

    `none` gives NoCompression, the same all-reduce through the compressor interface.

    `owner` is the exchange of an optimizer that sums gradients itself (1-bit Adam): it takes
    the compressor's place, configured from the section, and excludes any other compressor.
    """
    if owner is not None:
        if cfg is not None and cfg.name != "none":
            raise ConfigError(f"compression.name = {cfg.name!r} with optim.name = onebit_adam: "
                              "1-bit Adam compresses the data-parallel exchange itself; set "
                              "compression.name=none")
        if cfg is not None:
            try:
                owner.configure(cfg.warmup_steps, cfg.error_feedback)
            except ValueError as e:
                raise ConfigError(f"compression.warmup_steps = {cfg.warmup_steps}: {e}; set it to "
                                  "1 or more") from e
        return owner
    if cfg is None:
        return None
    try:
        return make_compressor(cfg.name, cfg.rank, cfg.topk_fraction, cfg.error_feedback,
                               cfg.warmup_steps, cfg.sign_chunk)
    except ValueError as e:
        raise ConfigError(str(e)) from e
