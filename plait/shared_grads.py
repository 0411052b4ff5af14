"""Gradients held in several copies by model-parallel ranks: summed before the step, counted once.

Two kinds of parameter live on more than one rank of one model copy, each copy seeing only part of
the gradient:

- a weight tied across the pipeline (an input embedding tied to the output head, pp > 1): the
  first stage keeps it for the embedding, the last stage a copy for the head
  (plait.pipeline.tied marks both, `plait_tied` = the first stage's name, `plait_tied_copy` on the
  last stage's). Each holds the gradient of its own use; the true gradient is their sum.
- key/value heads replicated over tensor-parallel ranks (tp > the number of kv heads):
  each rank's k / v projection holds the kv head its query heads read, and gets only their part
  of its gradient (plait.tensor_parallel.layers marks the replicated element ranges,
  `plait_tp_replica`).

`SharedGrads.sum()` runs once per step in `ParallelOptimizer.step`, after the data-parallel
exchange has finished and before the fp16 check, the gradient norm and clipping, on whatever the
optimizer steps: the whole gradient, or with ZeRO this rank's piece of it. Summing after the dp
sum gives the same result as before it (both are sums), and the pieces line up: the tied weight
is alone in its gradient bucket (plait.parallelize), so both ends own the same elements of it
over dp, and tp ranks lay their buckets out alike.

Communication, in this order, on every rank that holds such a parameter:
- tied: one all-reduce (SUM) over `mesh.emb` (the first and the last stage of this (dp, tp)
  position) of the tied gradients this rank steps, flattened: 2·(2−1)/2 · 4n = 4n bytes for n
  elements (the embedding's V/tp × D, or 1/dp of it under ZeRO);
- kv replicas: one all-reduce (SUM) over `mesh.tp` of a (G, n) table, G the number of groups of
  tp ranks sharing a kv head (e.g. the number of kv heads), n the replicated elements this rank
  steps: each rank writes its row, so each row sums its group (2(tp−1)/tp · 4Gn bytes).
Ranks that hold neither communicate nothing here.

The gradient norm counts each distinct element once: a tied copy on the last stage not at all,
a replicated kv range only on the first rank of its group (as tp-replicated weights count on tp
rank 0 only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plait.mesh import Mesh


@dataclass
class _Unit:
    """What one tensor the optimizer steps holds of a model parameter."""

    tensor: torch.Tensor  # holds .grad: the parameter itself, or a ZeRO piece (a 1-D leaf)
    source: torch.Tensor  # the model parameter (tp-local)
    start: int  # the first element of the flattened source it holds
    numel: int
    # (a, b, groups): elements [a, b) of its flattened gradient replicated over tp / groups ranks
    replica: list[tuple[int, int, int]] = field(default_factory=list)


def _units(params: list[torch.Tensor], optimizer) -> list[_Unit]:
    pieces = getattr(optimizer, "pieces", None)
    full = getattr(optimizer, "full_params", None)
    if pieces is not None and full is not None:  # ZeRO: this rank's pieces of the parameters
        return [_Unit(pc.leaf, full[pc.slot], pc.param_start, pc.length) for pc in pieces]
    return [_Unit(p, p, 0, p.numel()) for p in params]


def _flat_grad(t: torch.Tensor) -> torch.Tensor:
    if t.grad is None:  # no gradient reached it: a zero one, so every copy steps alike
        t.grad = torch.zeros_like(t)
    return t.grad.view(-1)


class SharedGrads:
    """The shared gradients among `params` (what the optimizer steps; `optimizer` tells ZeRO
    pieces apart), and the gradients the global norm counts."""

    def __init__(self, params: list[torch.Tensor], optimizer, mesh: Mesh):
        self.mesh = mesh
        self.units = _units(params, optimizer)
        self.tied: list[_Unit] = []
        groups: set[int] = set()
        for u in self.units:
            if getattr(u.source, "plait_tied", None) is not None and mesh.emb.size > 1:
                self.tied.append(u)
            for a, b, g in getattr(u.source, "plait_tp_replica", ()):
                lo, hi = max(a, u.start), min(b, u.start + u.numel)
                if lo < hi:
                    u.replica.append((lo - u.start, hi - u.start, g))
                    groups.add(g)
        # the same order at both ends of the pipeline: by the first stage's name
        self.tied.sort(key=lambda u: (u.source.plait_tied, u.start))
        self.groups = sorted(groups)

    def sum(self) -> None:
        """Sum every shared gradient over the ranks holding a copy (module docstring)."""
        if self.tied:
            self._all_reduce([_flat_grad(u.tensor) for u in self.tied], self.mesh.emb)
        tp, r = self.mesh.tp_size, self.mesh.tp_index
        for g in self.groups:
            views = [_flat_grad(u.tensor)[a:b] for u in self.units
                     for a, b, gg in u.replica if gg == g]
            n = sum(v.numel() for v in views)
            table = torch.zeros(g, n, dtype=views[0].dtype, device=views[0].device)
            row = r // (tp // g)  # the group of tp ranks holding the same kv head
            table[row] = torch.cat(views)
            self.mesh.comm.all_reduce(table, self.mesh.tp)
            for v, part in zip(views, torch.split(table[row], [v.numel() for v in views])):
                v.copy_(part)

    def _all_reduce(self, views: list[torch.Tensor], group) -> None:
        flat = torch.cat(views)
        self.mesh.comm.all_reduce(flat, group)
        for v, part in zip(views, torch.split(flat, [v.numel() for v in views])):
            v.copy_(part)

    def norm_grads(self) -> list[torch.Tensor]:
        """This rank's gradients as the global norm counts them: every element on exactly one
        rank of the model copy."""
        tp, r = self.mesh.tp_size, self.mesh.tp_index
        out = []
        for u in self.units:
            g = u.tensor.grad
            if g is None or getattr(u.source, "plait_tied_copy", False):
                continue
            if r != 0 and getattr(u.source, "plait_tp_replicated", False):
                continue
            skip = [(a, b) for a, b, groups in u.replica if r % (tp // groups)]
            if not skip:
                out.append(g.detach())
                continue
            flat, at = g.detach().view(-1), 0
            for a, b in sorted(skip):
                if a > at:
                    out.append(flat[at:a])
                at = b
            if at < flat.numel():
                out.append(flat[at:])
        return out
