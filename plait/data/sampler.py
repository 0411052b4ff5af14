"""Deterministic, resumable sampling of fixed-length sequences.

The token stream is cut into non-overlapping chunks of seq_len + 1 tokens. Epoch e visits them in
the permutation drawn from (seed, e). Global sample i of the run is chunk perm_e[i mod n] with
e = i div n, so the whole data order is a pure function of (seed, samples consumed): that number
is the data position saved in checkpoints, and it stays exact when the batch size changes.

A step's global batch is samples [start, start + G); data-parallel rank r reads the r-th
contiguous 1/dp of it, so ranks read disjoint samples and the union is the single-process batch.

Two optional companions change what a batch holds:
- `loss_mask` (fine-tuning data, `plait data prepare --format sft`): one uint8 per token, 1 where
  the token is trained as a target. The same window is cut from it, so it is aligned with the
  tokens by construction; targets whose mask is 0 become -100 (ignored by the loss).
  `target_count(start, count)` counts the trained targets of samples [start, start + count): a
  pure function of the data position, so every rank computes the global batch's count by itself;
- `eos_id` (data.document_masking): batches are (x, y, positions), positions (B, T) each input
  token's position in its document: 0 at the window's first token and after each end-of-text
  token in x, counting up in between (the model keeps attention within each document).
"""

from __future__ import annotations

import numpy as np
import torch

from plait.errors import ConfigError


class ChunkSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True,
                 what: str = "train", *, loss_mask: np.ndarray | None = None,
                 eos_id: int | None = None):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        if loss_mask is not None and len(loss_mask) != len(tokens):
            raise ConfigError(f"the {what} split's loss mask has {len(loss_mask)} entries for "
                              f"{len(tokens)} tokens: prepare the data again")
        self.loss_mask = loss_mask
        self.eos_id = eos_id
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

    def _rows(self, data, start: int, count: int) -> np.ndarray:
        T = self.seq_len
        return np.stack([np.asarray(data[c * T: c * T + T + 1], dtype=np.int64)
                         for c in (self._chunk(i) for i in range(start, start + count))])

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, ...]:
        """Samples [start, start+count) as (inputs, targets), each (count, seq_len) int64, and
        with `eos_id` the inputs' positions in their documents (count, seq_len) int64 as third.
        Targets the loss mask leaves out are -100."""
        t = torch.from_numpy(self._rows(self.tokens, start, count))
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if self.loss_mask is not None:
            trained = torch.from_numpy(self._rows(self.loss_mask, start, count)[:, 1:] != 0)
            y.masked_fill_(~trained, -100)
        out = (x, y) if self.eos_id is None else (x, y, document_positions(x, self.eos_id))
        if self.pin_memory:
            out = tuple(v.pin_memory() for v in out)
        return out

    def target_count(self, start: int, count: int) -> int:
        """Trained targets of samples [start, start+count): count·seq_len without a loss mask.

        Reads only the mask windows (one byte per token), no tokens and no communication."""
        if self.loss_mask is None:
            return count * self.seq_len
        return int(np.count_nonzero(self._rows(self.loss_mask, start, count)[:, 1:]))

    def global_targets(self, start: int, count: int) -> int:
        """`target_count` of a step's global batch [start, start+count): the loss's divisor.
        ConfigError when it is 0: every target of the batch is masked, there is nothing to train
        on (the same on every rank, before the step's first collective)."""
        n = self.target_count(start, count)
        if n == 0:
            raise ConfigError(f"the global batch of samples [{start}, {start + count}) has no "
                              f"trained target: the loss mask of all its {count} sequences is 0 "
                              f"(prompts only); raise train.global_batch or train.seq_len, or "
                              f"prepare data whose records hold responses")
        return n


def document_positions(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) each token's position in its document: a document starts at
    the first token and after each `eos_id` (the end-of-text token belongs to the document it
    ends)."""
    B, T = x.shape
    idx = torch.arange(T, device=x.device).expand(B, T)
    starts = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    starts[:, 0] = True
    starts[:, 1:] = x[:, :-1] == eos_id
    last_start = torch.where(starts, idx, 0).cummax(dim=1).values
    return idx - last_start


def rank_slice(start: int, global_batch: int, dp: int, dp_index: int) -> tuple[int, int]:
    """(first sample, count) of data-parallel rank dp_index's share of a global batch."""
    per = global_batch // dp
    return start + dp_index * per, per


def micro_batches(sampler: ChunkSampler, start: int, count: int, micro: int):
    """Split samples [start, start+count) into micro-batches of `micro`
    (the last may be smaller)."""
    for s in range(start, start + count, micro):
        yield sampler.batch(s, min(micro, start + count - s))
