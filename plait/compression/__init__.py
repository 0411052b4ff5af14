"""Gradient compression for the data-parallel exchange, with error feedback.

    name      linear  biased  payload per d elements            collective(s)
    none      yes     no      4d                                all-reduce
    fp16      yes     no      2d                                all-reduce (summed in fp16)
    bf16      yes     no      2d                                all-reduce (summed in bf16)
    int8      no      yes     d + 4 per 512-element chunk       all-to-all, then all-gather
    topk      no      yes     8k per tensor (int32 index + fp32) all-gather
    sign      no      yes     d/8 + 4 per rank's shard          all-to-all, then all-gather
    powersgd  yes     yes     4r(m+n) per m×n matrix + 4·1-D    two all-reduces (P, then Q)

Biased compressors keep error feedback (on by default, `compression.error_feedback=false` turns it
off). `build.build_compressor` turns the config section into a compressor for GradReducer; `None`
means the reducer's plain all-reduce.
"""

from __future__ import annotations

from plait.compression.base import (
    BF16Compressor,
    Compressor,
    FP16Compressor,
    NoCompression,
    Pending,
)
from plait.compression.build import NAMES, build_compressor, make_compressor
from plait.compression.onebit import OneBitExchange
from plait.compression.powersgd import PowerSGDCompressor
from plait.compression.quantized import Int8Compressor, SignCompressor
from plait.compression.topk import TopKCompressor

__all__ = ["NAMES", "BF16Compressor", "Compressor", "FP16Compressor", "Int8Compressor",
           "NoCompression", "OneBitExchange", "Pending", "PowerSGDCompressor", "SignCompressor",
           "TopKCompressor", "build_compressor", "make_compressor"]
