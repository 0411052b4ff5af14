"""The pipeline's communication around the schedule's own messages.

- `post_batch`: one batch of the schedule's sends and receives as a single batched isend/irecv.
- `gather_rows`: every pp rank's variable-length float table, to every pp rank (counts
  all-gathered first, then the tables padded to the longest: all_gather needs equal sizes).
- `StageStateGatherer`: this rank's stage state dict -> the whole model's, on every pp rank. For
  each pp rank in turn, that rank broadcasts the shapes of its tensors (their number and ranks
  are known everywhere from the split), then one flat buffer per dtype.
- `HiddenWire`: what of a hidden state is sent, and how a received one is rebuilt (with tp > 1,
  1/tp of it per message and an all-gather over tp on receipt).
All but HiddenWire's all-gather are collectives of the pp group: every member calls them in the
same order.
"""

from __future__ import annotations

import math

import torch

from plait.comm import Comm, Group, Handle


def post_batch(comm: Comm, group: Group, sends: list[tuple[torch.Tensor, int]],
               recvs: list[tuple[torch.Tensor, int]]) -> Handle:
    """Post sends and receives (tensor, peer pp rank) together;
    the caller waits the handle when it needs them."""
    return comm.p2p(sends, recvs, group, async_op=True)


def gather_rows(comm: Comm, group: Group, rows: torch.Tensor) -> list[torch.Tensor]:
    """All-gather a (n_r, k) float64 table from each member;
    returns the list of tables in group order."""
    k = rows.shape[1]
    n = torch.tensor([float(rows.shape[0])], dtype=torch.float64, device=rows.device)
    counts = torch.empty(group.size, dtype=torch.float64, device=rows.device)
    comm.all_gather(counts, n, group)
    longest = max(1, int(counts.max()))
    padded = torch.zeros(longest, k, dtype=torch.float64, device=rows.device)
    padded[: rows.shape[0]] = rows
    out = torch.empty(group.size * longest, k, dtype=torch.float64, device=rows.device)
    comm.all_gather(out, padded, group)
    return [out[i * longest: i * longest + int(c)] for i, c in enumerate(counts.tolist())]


class StageStateGatherer:
    """Turns this rank's stage state dict into the whole model's, with the original key names.

    `entries[r]` lists (key, ndim, dtype) of pp rank r's state dict in the model's key order;
    every rank knows all of them from the split. Collective over `group`; returns the full dict
    on every member, in the original model's key order.
    """

    def __init__(self, comm: Comm, group: Group, entries: list[list[tuple[str, int, torch.dtype]]],
                 keys: list[str], device: torch.device):
        self.comm, self.group, self.entries, self.keys, self.device = \
            comm, group, entries, keys, device

    def __call__(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for src, entries in enumerate(self.entries):
            mine = src == self.group.rank
            if mine:
                missing = [k for k, _, _ in entries if k not in local]
                if missing:
                    raise KeyError(f"stage state dict of pp rank {src} lacks {missing[:3]}")
            dims = torch.zeros(sum(nd for _, nd, _ in entries), dtype=torch.int64,
                               device=self.device)
            if mine and dims.numel():
                dims.copy_(torch.tensor([d for k, _, _ in entries for d in local[k].shape],
                                        dtype=torch.int64))
            if dims.numel():  # every member knows the sizes, so all skip together
                self.comm.broadcast(dims, src, self.group)
            shapes, at = [], 0
            for _, nd, _ in entries:
                shapes.append(tuple(int(d) for d in dims[at: at + nd].tolist()))
                at += nd
            for dtype in dict.fromkeys(dt for _, _, dt in entries):
                idx = [i for i, (_, _, dt) in enumerate(entries) if dt == dtype]
                sizes = [torch.Size(shapes[i]).numel() for i in idx]
                if mine:
                    flat = torch.cat([local[entries[i][0]].detach().reshape(-1)
                                      .to(self.device, dtype) for i in idx])
                else:
                    flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
                self.comm.broadcast(flat, src, self.group)
                for i, part in zip(idx, torch.split(flat, sizes)):
                    out[entries[i][0]] = part.view(shapes[i]).clone()
        return {k: out[k] for k in self.keys}


class HiddenWire:
    """How a hidden state travels between stages over pp.

    Without `tp_group`: as it is. With it (tp > 1 without sequence parallelism, where every tp
    rank holds the same hidden state; Megatron's scatter/gather): each tp rank sends only its
    slice of the flattened tensor, zero-padded to c = ⌈n/tp⌉ elements per rank, to the same tp
    rank of the next (or, for gradients, previous) stage, and the receiver rebuilds the whole
    tensor with one all-gather of tp·c elements over `tp_group`. Per message pp carries c elements
    instead of n; the padding, at most tp − 1 elements, is sent and counted. The all-gathers are
    collectives of the tp group: its members run the same pipeline program, so they issue them in
    the same order.
    """

    def __init__(self, comm: Comm, tp_group: Group | None = None):
        self.comm, self.group = comm, tp_group
        self.n = tp_group.size if tp_group is not None else 1

    def outgoing(self, t: torch.Tensor) -> torch.Tensor:
        """What this rank sends of hidden state `t`."""
        if self.n == 1:
            return t
        flat = t.reshape(-1)
        c = -(-flat.numel() // self.n)
        if flat.numel() % self.n:
            flat = torch.nn.functional.pad(flat, (0, c * self.n - flat.numel()))
        r = self.group.rank
        return flat[r * c:(r + 1) * c].contiguous()

    def buffer(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The receive buffer for a hidden state of `shape`."""
        if self.n == 1:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty(-(-math.prod(shape) // self.n), dtype=dtype, device=device)

    def incoming(self, buf: torch.Tensor, shape: tuple) -> torch.Tensor:
        """The whole hidden state from a received buffer (all-gathers over tp when sliced)."""
        if self.n == 1:
            return buf
        full = torch.empty(buf.numel() * self.n, dtype=buf.dtype, device=buf.device)
        self.comm.all_gather(full, buf, self.group)
        return full[:math.prod(shape)].view(shape)
