"""Deterministic, resumable sampling of fixed-length sequences.

The token stream is cut into non-overlapping chunks of seq_len + 1 tokens. Epoch e visits them in
the permutation drawn from (seed, e). Global sample i of the run is chunk perm_e[i mod n] with
e = i div n, so the whole data order is a pure function of (seed, samples consumed): that number
is the data position saved in checkpoints, and it stays exact when the batch size changes.

A step's global batch is samples [start, start + G); data-parallel rank r reads the r-th
contiguous 1/dp of it, so ranks read disjoint samples and the union is the single-process batch.
"""

from __future__ import annotations

import numpy as np
import torch

from plait.errors import ConfigError


class ChunkSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True,
                 what: str = "train"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.n_chunks = (len(tokens) - 1) // seq_len
        if self.n_chunks < 1:
            raise ConfigError(f"the {what} split has {len(tokens)} tokens, fewer than "
                              f"train.seq_len + 1 = {seq_len + 1}: use more data or a shorter "
                              "train.seq_len")
        self._perm_epoch = -1
        self._perm = None
        # page-locked batches let the host-to-GPU copy run asynchronously
        # (a pageable copy waits for the stream)
        self.pin_memory = False

    def _chunk(self, i: int) -> int:
        if not self.shuffle:
            return i % self.n_chunks
        epoch = i // self.n_chunks
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            self._perm_epoch = epoch
        return int(self._perm[i % self.n_chunks])

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [start, start+count) as (inputs, targets), each (count, seq_len) int64."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[c * T: c * T + T + 1], dtype=np.int64)
                         for c in (self._chunk(i) for i in range(start, start + count))])
        t = torch.from_numpy(rows)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


def rank_slice(start: int, global_batch: int, dp: int, dp_index: int) -> tuple[int, int]:
    """(first sample, count) of data-parallel rank dp_index's share of a global batch."""
    per = global_batch // dp
    return start + dp_index * per, per


def micro_batches(sampler: ChunkSampler, start: int, count: int, micro: int):
    """Split samples [start, start+count) into micro-batches of `micro`
    (the last may be smaller)."""
    for s in range(start, start + count, micro):
        yield sampler.batch(s, min(micro, start + count - s))
