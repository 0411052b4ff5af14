"""What LAMB and LARS share: layer-wise trust ratios computed from whole-layer norms.

A layer-wise optimizer scales each parameter's update by a trust ratio built from norms of the
whole layer (‖w‖ and ‖update‖ or ‖grad‖). Under sharding a rank holds only a piece of a layer,
a tensor-parallel shard or a ZeRO shard, so the squared norms of the local pieces must be summed
over the ranks that hold the other pieces before the ratio is formed. That sum is the job of the
`norm_reducer`.

norm_reducer contract
- Signature: `norm_reducer(params, sq) -> sq_total`. `params` is the list of local parameter
  tensors whose update is adapted this step (in the optimizer's order); `sq` is a float32 tensor
  of shape (len(params), 2) on their device: row i holds the two squared norms of params[i]'s
  local piece that the optimizer needs (column 0 ‖w‖², column 1 ‖update‖² for LAMB, ‖grad‖² for
  LARS). It returns a tensor of the same shape whose row i is the sum of row i over every piece
  of params[i]'s whole layer. It must not modify the parameters.
- It is called exactly once per `step()`, on every rank, even when `params` is empty (a rank of a
  ZeRO group may hold no adapted piece), so it may be a collective. Every rank of the group must
  step the optimizer the same number of times.
- Default (None): the identity, i.e. every parameter is whole on this rank.

`GroupNormReducer` is the reducer for a group of ranks that each hold one piece of every
parameter (tensor parallelism, or a ZeRO layout that splits every parameter over the group): one
all-reduce (SUM) of the stacked table on that group, through `plait.comm.Comm`. For a layout
where ranks hold pieces of different parameters, give it `slot`/`n_slots`: each local piece is
added into the row of its layer in an (n_slots, 2) table, the table is all-reduced, and each
piece reads back its layer's row. Parameters that are whole on every rank of the group (a
tensor-parallel replicated weight) are marked by `replicated(p)` and kept local.

Adapted or not: a param group's `adapt` option (True / False / None). None (the default) adapts
parameters with two or more dimensions and excludes 1-D ones (biases, norm weights) from both the
trust ratio and weight decay. True / False decide explicitly (then the group's weight_decay
applies as given); a ZeRO wrapper whose shards are flat 1-D views of matrices must say True.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plait.comm import Comm, Group

NormReducer = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


class GroupNormReducer:
    """Sums each layer's squared norms over `group` with one all-reduce per optimizer step."""

    def __init__(self, comm: Comm, group: Group,
                 replicated: Callable[[torch.Tensor], bool] | None = None,
                 slot: Callable[[torch.Tensor], int] | None = None, n_slots: int = 0):
        if (slot is None) != (n_slots == 0):
            raise ValueError("GroupNormReducer: give both slot and n_slots (a table of layers), or "
                             "neither")
        self.comm = comm
        self.group = group
        self.replicated = replicated
        self.slot = slot
        self.n_slots = n_slots

    def __call__(self, params: list[torch.Tensor], sq: torch.Tensor) -> torch.Tensor:
        keep = torch.tensor([bool(self.replicated and self.replicated(p)) for p in params],
                            dtype=torch.bool, device=sq.device)
        if self.slot is None:
            table = sq.clone()
            self.comm.all_reduce(table, self.group)
            return torch.where(keep[:, None], sq, table)
        rows = torch.tensor([self.slot(p) for p in params], dtype=torch.long, device=sq.device)
        table = torch.zeros(self.n_slots, sq.shape[1], dtype=sq.dtype, device=sq.device)
        table.index_add_(0, rows, sq)
        self.comm.all_reduce(table, self.group)
        return torch.where(keep[:, None], sq, table[rows])


def tensor_parallel_norm_reducer(mesh) -> NormReducer | None:
    """The reducer for plait's tensor-parallel layout: sum over `mesh.tp`, except weights marked
    `plait_tp_replicated` (whole on every tp rank). None when tp = 1 (nothing to reduce)."""
    if mesh.tp_size == 1:
        return None
    return GroupNormReducer(mesh.comm, mesh.tp,
                            replicated=lambda p: getattr(p, "plait_tp_replicated", False))


def is_adapted(group: dict, p: torch.Tensor) -> bool:
    adapt = group.get("adapt")
    return p.dim() >= 2 if adapt is None else bool(adapt)


def decay_of(group: dict, p: torch.Tensor) -> float:
    """Weight decay of p: the group's, except 1-D parameters under the default (adapt=None) rule."""
    if group.get("adapt") is None and p.dim() < 2:
        return 0.0
    return group["weight_decay"]


def reduce_norms(norm_reducer: NormReducer | None, params: list[torch.Tensor],
                 sq: torch.Tensor) -> torch.Tensor:
    """Apply the reducer and check its answer's shape (a wrong reducer must fail loudly)."""
    if norm_reducer is None:
        return sq
    out = norm_reducer(params, sq)
    if not isinstance(out, torch.Tensor) or out.shape != sq.shape:
        raise ValueError(f"norm_reducer returned {getattr(out, 'shape', type(out))}, expected a "
                         f"tensor of shape {tuple(sq.shape)} (one row of squared norms per adapted "
                         "parameter)")
    return out


def squared_norms(pairs: list[tuple[torch.Tensor, torch.Tensor]], device) -> torch.Tensor:
    """(n, 2) float32 table of [‖a‖², ‖b‖²] for each pair, computed in fp32."""
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.float32, device=device)
    rows = [torch.stack([torch.linalg.vector_norm(a, dtype=torch.float32),
                         torch.linalg.vector_norm(b, dtype=torch.float32)]) for a, b in pairs]
    return torch.stack(rows).pow(2)
