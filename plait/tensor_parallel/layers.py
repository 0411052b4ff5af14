"""Megatron-style tensor-parallel layers and the vocab-parallel cross-entropy.

Each layer holds 1/t of its weight (t = tp group size) and keeps the attribute names of the
layer it replaces (`weight`, `bias`), so state-dict keys stay those of the unsharded model.
Sharded parameters carry `plait_tp_shard = (dim, full_size)`: the dimension split over tp and
its unpadded length (what `gather_full` restores).

Sequence parallelism (`sequence_parallel=True`): activations outside the tp regions hold 1/t of
the sequence (dim 1 of (B, T, D)); the regions' f / g all-reduces become all-gather /
reduce-scatter along the sequence (tp_comm.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from plait.comm import Comm, Group
from plait.mesh import Mesh
from plait.tensor_parallel.tp_comm import (
    all_reduce_grad_hook,
    copy_to_tp,
    gather_seq,
    reduce_from_tp,
    reduce_scatter_seq,
)


def shard(t: torch.Tensor, dim: int, group: Group, padded: int | None = None) -> torch.Tensor:
    """This rank's contiguous 1/t chunk of `t` along `dim`, after zero-padding `dim` to `padded`."""
    full = t.shape[dim]
    padded = padded or full
    if padded % group.size:
        raise ValueError(f"size {padded} along dim {dim} is not divisible by the tp size "
                         f"{group.size}")
    if padded > full:
        pad_shape = list(t.shape)
        pad_shape[dim] = padded - full
        t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
    return t.chunk(group.size, dim=dim)[group.rank].detach().clone()


def block_sizes(n: int, parts: int | tuple[int, ...]) -> tuple[int, ...]:
    """The sizes of the packed blocks along a dimension of n: `parts` equal ones, or as given."""
    if isinstance(parts, int):
        if n % parts:
            raise ValueError(f"{n} rows do not split into {parts} equal packed blocks")
        return (n // parts,) * parts
    if sum(parts) != n:
        raise ValueError(f"packed blocks {parts} add up to {sum(parts)}, not {n}")
    return tuple(parts)


def holders(groups: int | None, tp: int) -> int:
    """How many tp ranks hold each piece of a block of `groups` whole units (heads) under tp:
    1 when tp ≤ groups (or None: no units), else tp / groups (each unit replicated)."""
    return 1 if groups is None or tp <= groups else tp // groups


def shard_packed(t: torch.Tensor, dim: int, group: Group, parts: int | tuple[int, ...],
                 groups: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """This rank's 1/t of each consecutive packed block of `t` along `dim` (`parts` equal blocks,
    or blocks of the given sizes), concatenated: a fused q | k | v weight, where every rank keeps
    its heads' q, k and v (with grouped-query attention k and v are smaller than q).

    `groups[b]`: block b is that many whole units (key/value heads); with fewer units than tp
    ranks, rank r keeps unit r // (tp / units), so consecutive ranks hold the same one."""
    sizes = block_sizes(t.shape[dim], parts)
    groups = groups or (None,) * len(sizes)
    mine = []
    for b, g in zip(t.split(sizes, dim=dim), groups):
        k = holders(g, group.size)
        n = group.size // k  # distinct pieces of this block
        if b.shape[dim] % n:
            raise ValueError(f"packed block of {b.shape[dim]} rows along dim {dim} is not "
                             f"divisible by the {n} pieces it is split into (tp = {group.size})")
        mine.append(b.chunk(n, dim=dim)[group.rank // k])
    return torch.cat(mine, dim=dim).detach().clone()


def replica_ranges(sizes: tuple[int, ...], groups: tuple[int | None, ...], tp: int,
                   row: int) -> tuple[tuple[int, int, int], ...]:
    """(first, end element, units) of each block held by several tp ranks, in the flattened local
    tensor whose split dim is dim 0 with `row` elements per row (plait.shared_grads sums them)."""
    out, at = [], 0
    for size, g in zip(sizes, groups):
        local = size * holders(g, tp) // tp
        if holders(g, tp) > 1:
            out.append((at * row, (at + local) * row, g))
        at += local
    return tuple(out)


def _param(data: torch.Tensor, dim: int, full: int, requires_grad: bool = True) -> nn.Parameter:
    p = nn.Parameter(data, requires_grad=requires_grad)
    p.plait_tp_shard = (dim, full)
    return p


def mark_replicated(p: nn.Parameter, mesh: Mesh, partial_grad: bool) -> None:
    """Mark a parameter held whole on every tp rank; sum its gradient over tp when `partial_grad`
    (it acts on 1/t of the sequence under sequence parallelism): a backward hook, see
    tp_comm.all_reduce_grad_hook."""
    p.plait_tp_replicated = True
    if (partial_grad and mesh.tp_size > 1 and p.requires_grad
            and not getattr(p, "plait_tp_grad_hook", False)):
        p.register_hook(all_reduce_grad_hook(mesh.comm, mesh.tp))
        p.plait_tp_grad_hook = True


class ColumnParallelLinear(nn.Module):
    """y_r = x · W_rᵀ + b_r: the output features split over tp; W_r = rows [r·out/t, (r+1)·out/t).

    Input: replicated (B, T, in), or (B, T/t, in) under sequence parallelism. Output: (B, T, out/t).
    With `enter_region` the layer applies the region's entry collective itself: f (forward
    identity, backward all-reduce of the input gradient on tp) or, under sequence parallelism,
    all-gather of the sequence (backward reduce-scatter). Without it the caller has done so once
    for several column layers sharing one input (q/k/v; gate/up), so backward sends one
    all-reduce, not one per layer. `out_features` must divide by t (after `padded_out`).

    `parts` > 1: the output is that many equal packed blocks (a fused q | k | v), each split over
    tp, so rank r holds block 0's r-th slice, then block 1's, ...; a tuple: blocks of those sizes
    (q | k | v under grouped-query attention). `plait_tp_parts` on the weight: the block sizes.
    `groups`: per block, its number of whole units (key/value heads) or None; a block of fewer
    units than tp ranks is replicated, rank r holding unit r // (tp / units) (shard_packed), and
    the weight's `plait_tp_replica` lists those rows, whose gradient each holder gets only in part
    (its own query heads' share): plait.shared_grads sums it over the holders before the step.
    `transposed`: the weight is kept as (in, out/t), the layout of the (in, out) matrix
    it came from (transformers' Conv1D), so state-dict shapes stay the model's; the split
    dimension is then 1.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mesh: Mesh,
                 enter_region: bool = True, sequence_parallel: bool = False,
                 padded_out: int | None = None, parts: int | tuple[int, ...] = 1,
                 transposed: bool = False, groups: tuple[int | None, ...] | None = None):
        super().__init__()
        self.comm, self.group = mesh.comm, mesh.tp
        self.enter_region = enter_region
        self.sequence_parallel = sequence_parallel
        self.transposed = transposed
        full_out, self.in_features = weight.shape  # weight: (out, in)
        self.full_out_features = full_out
        # a block of fewer units than tp ranks is replicated; else `groups` change nothing
        packed = parts != 1 or any(holders(g, mesh.tp_size) > 1 for g in groups or ())
        w = (shard_packed(weight, 0, mesh.tp, parts, groups) if packed
             else shard(weight, 0, mesh.tp, padded_out))
        self.out_features = w.shape[0]  # local: (padded) out / t
        self.weight = _param(w.t().contiguous() if transposed else w, 1 if transposed else 0,
                             full_out, weight.requires_grad)
        if bias is not None:
            b = (shard_packed(bias, 0, mesh.tp, parts, groups) if packed
                 else shard(bias, 0, mesh.tp, padded_out))
            self.bias = _param(b, 0, full_out)
        else:
            self.bias = None
        sizes = block_sizes(full_out, parts)
        for p, row in ((self.weight, self.in_features), (self.bias, 1)):
            if p is None or not packed:
                continue
            p.plait_tp_parts = sizes
            replicas = replica_ranges(sizes, groups or (None,) * len(sizes), mesh.tp_size, row)
            if replicas and transposed:
                raise ValueError("replicated key/value heads of a transposed (Conv1D) weight")
            if replicas:
                p.plait_tp_groups, p.plait_tp_replica = groups, replicas

    @classmethod
    def from_linear(cls, lin: nn.Linear, mesh: Mesh, **kw) -> ColumnParallelLinear:
        return cls(lin.weight, lin.bias, mesh, **kw)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, mesh: Mesh, **kw) -> ColumnParallelLinear:
        """From a transformers Conv1D (weight (in, out), y = x·W + b)."""
        return cls(conv.weight.t(), conv.bias, mesh, transposed=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enter_region:
            x = gather_seq(x, self.comm, self.group) if self.sequence_parallel else copy_to_tp(
                x, self.comm, self.group)
        w = self.weight.t() if self.transposed else self.weight
        return F.linear(x, w, self.bias)  # (B, T, out/t)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} of {self.full_out_features}, "
                f"tp={self.group.size}, enter_region={self.enter_region}, "
                f"sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r · W_rᵀ + b: the input features split over tp; W_r = columns [r·in/t, (r+1)·in/t).

    Input: (B, T, in/t), this rank's features. Output: the all-reduced sum over tp, g (backward:
    identity), replicated (B, T, out); under sequence parallelism a reduce-scatter along the
    sequence instead, (B, T/t, out) (backward: all-gather). The bias is replicated and added after
    the reduction; under sequence parallelism its gradient is summed over tp by a hook.
    `transposed`: the weight is kept as (in/t, out), as the transformers Conv1D it came from.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mesh: Mesh,
                 sequence_parallel: bool = False, transposed: bool = False):
        super().__init__()
        self.comm, self.group = mesh.comm, mesh.tp
        self.sequence_parallel = sequence_parallel
        self.transposed = transposed
        self.out_features, full_in = weight.shape  # weight: (out, in)
        self.full_in_features = full_in
        w = shard(weight, 1, mesh.tp)
        self.in_features = w.shape[1]
        self.weight = _param(w.t().contiguous() if transposed else w, 0 if transposed else 1,
                             full_in, weight.requires_grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
            mark_replicated(self.bias, mesh, partial_grad=sequence_parallel)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, mesh: Mesh, **kw) -> RowParallelLinear:
        return cls(lin.weight, lin.bias, mesh, **kw)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, mesh: Mesh, **kw) -> RowParallelLinear:
        """From a transformers Conv1D (weight (in, out), y = x·W + b)."""
        return cls(conv.weight.t(), conv.bias, mesh, transposed=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.transposed else self.weight
        y = F.linear(x, w)  # (B, T, out): this rank's partial sum
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.comm, self.group)  # (B, T/t, out)
        else:
            y = reduce_from_tp(y, self.comm, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} of {self.full_in_features}, out={self.out_features}, "
                f"tp={self.group.size}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over tp: rank r holds token ids [r·V'/t, (r+1)·V'/t), V' = `padded`.

    Input: token ids (B, T), replicated. Each rank looks up the ids it holds (zeros elsewhere),
    then the partial embeddings are all-reduced on tp (g; backward identity), giving (B, T, D),
    or under sequence parallelism reduce-scattered along the sequence, giving (B, T/t, D)
    (backward all-gather). Padded rows are never looked up; they stay zero. `output_scale`: a
    factor the embedding's output is multiplied by, as the model's own embedding did (Gemma's
    √hidden), in the weight's dtype; None: none.
    """

    output_scale: float | None = None

    def __init__(self, weight: torch.Tensor, mesh: Mesh, sequence_parallel: bool = False,
                 padded: int | None = None):
        super().__init__()
        self.comm, self.group = mesh.comm, mesh.tp
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = _param(shard(weight, 0, mesh.tp, padded), 0, self.num_embeddings,
                             weight.requires_grad)
        self.vocab_start = mesh.tp.rank * self.weight.shape[0]
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, mesh: Mesh, **kw) -> VocabParallelEmbedding:
        return cls(emb.weight, mesh, **kw)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        # (B, T, D) partial
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            x = reduce_scatter_seq(x, self.comm, self.group)
        else:
            x = reduce_from_tp(x, self.comm, self.group)
        if self.output_scale is not None:
            x = x * torch.tensor(self.output_scale, dtype=self.weight.dtype, device=x.device)
        return x

    def extra_repr(self) -> str:
        return (f"ids [{self.vocab_start}, {self.vocab_end}) of {self.num_embeddings}, "
                f"dim={self.embedding_dim}, tp={self.group.size}, sp={self.sequence_parallel}")


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (padded logits are masked out of the loss)."""
    return math.ceil(vocab / tp) * tp


# -- vocab-parallel cross-entropy --------------------------------------------------------------
IGNORE_INDEX = -100  # a target that is not trained on (F.cross_entropy's default ignore_index)

class _VocabParallelCE(Function):
    @staticmethod
    def forward(ctx, logits, targets, comm, group, vocab_start, vocab_size):
        # logits: (N, V'/t) this rank's columns; targets: (N,) global ids
        x = logits.float()
        n_local = x.shape[-1]
        if vocab_start + n_local > vocab_size:  # padding columns: never a class, probability 0
            x = x.clone()
            x[:, max(0, vocab_size - vocab_start):] = float("-inf")
        m = x.max(dim=-1).values  # (N,)
        comm.all_reduce(m, group, op="max")
        x = x - m.unsqueeze(-1)
        e = x.exp()
        inside = (targets >= vocab_start) & (targets < vocab_start + n_local)
        local_t = (targets - vocab_start).masked_fill(~inside, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)  # (N,)
        sums = torch.stack([e.sum(-1), picked])  # one all-reduce for both: (2, N)
        comm.all_reduce(sums, group)
        trained = targets != IGNORE_INDEX  # (N,): an ignored target has loss 0 and no gradient
        loss = (sums[0].log() - sums[1]).masked_fill(~trained, 0.0)  # logsumexp - target logit
        e.div_(sums[0].unsqueeze(-1))  # softmax of this rank's columns
        ctx.save_for_backward(e, local_t, inside, trained)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, inside, trained = ctx.saved_tensors
        g = softmax.clone()
        g[torch.arange(g.shape[0], device=g.device), local_t] -= inside.to(g.dtype)
        # no communication: each rank owns its columns' gradient
        g.mul_((grad * trained.to(grad.dtype)).unsqueeze(-1))
        return g.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, comm: Comm,
                                 group: Group, vocab_start: int, vocab_size: int,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over vocab-sharded logits, never gathering the full (N, V) logits.

    logits (..., V'/t): this rank's columns [vocab_start, vocab_start + V'/t); targets (...) global
    ids < vocab_size, or -100 (IGNORE_INDEX: a masked target, loss 0 and no gradient, left out of
    the mean, as F.cross_entropy's default ignore_index). Columns >= vocab_size (padding) are
    excluded, so the loss and its gradients equal F.cross_entropy on the unpadded logits.
    Forward: two all-reduces on `group` of N elements (max, then sum-exp and target logit
    together); backward: none. reduction: mean | sum | none; the same on every tp rank.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    loss = _VocabParallelCE.apply(flat, targets.reshape(-1), comm, group, vocab_start, vocab_size)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":  # over the trained targets (all ignored: nan, as F.cross_entropy)
        return loss.sum() / (targets != IGNORE_INDEX).sum()
    if reduction == "none":
        return loss.view(targets.shape)
    raise ValueError(f"reduction = {reduction!r}: choose mean, sum or none")


class VocabParallelLoss:
    """The language-model loss for logits from a vocab-parallel head:
    `(logits, targets, reduction)`."""

    def __init__(self, mesh: Mesh, head: ColumnParallelLinear):
        self.comm, self.group = mesh.comm, mesh.tp
        self.vocab_start = mesh.tp.rank * head.out_features
        self.vocab_size = head.full_out_features

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.comm, self.group,
                                            self.vocab_start, self.vocab_size, reduction)
