"""Top-k sparsification: each rank sends the k largest-magnitude entries of every tensor.

Ranks pick different indices, so payloads cannot be summed by all-reduce: one all-gather of
(indices, values) per bucket, then every rank adds all n sparse payloads in rank order. k per
tensor is ceil(fraction · numel) (at least 1), a function of the shape only, so every rank
gathers equal sizes (gloo cannot all-gather unequal ones).

Bytes per rank per bucket: all-gather of n·8K bytes (K = Σ k over the bucket's tensors: a 4-byte
int32 index plus a 4-byte fp32 value each), i.e. (n−1)/n · n · 8K.
Error feedback keeps everything not sent: residual = (g + e) with the sent entries zeroed.
"""

from __future__ import annotations

import torch

from plait.compression import codecs
from plait.compression.base import Compressor, Pending


def spans_of(flat: torch.Tensor, views) -> list[tuple[int, int]]:
    """(offset in flat, numel) of each view."""
    return [(v.storage_offset() - flat.storage_offset(), v.numel()) for v in views]


class TopKCompressor(Compressor):
    name = "topk"
    linear = False
    biased = True

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True):
        super().__init__(error_feedback)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"compression.topk_fraction = {fraction}: must be in (0, 1]")
        self.fraction = fraction

    def exchange(self, key, flat, views):
        spans = spans_of(flat, views)
        counts = codecs.topk_counts([n for _, n in spans], self.fraction)
        x = self.with_error(key, flat)
        payload, picked = codecs.encode_topk(x, spans, counts)
        gathered = torch.empty((self.world, payload.numel()), dtype=torch.int32, device=flat.device)
        h = self.comm.all_gather(gathered.view(-1), payload, self.group, async_op=True)
        if self.error_feedback:
            x[picked] = 0
            self.keep_error(key, x)

        def then():
            if flat.dtype == torch.float32:
                codecs.decode_topk_into(flat, gathered)
            else:
                flat.copy_(codecs.decode_topk_into(torch.empty(flat.numel(), device=flat.device),
                                                   gathered))

        return Pending(h, then)
