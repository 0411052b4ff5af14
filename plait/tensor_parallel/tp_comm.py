"""The tensor-parallel collectives as autograd functions (Megatron's f and g and their SP forms).

Every function here runs exactly one collective in forward or backward (or none), on the `group`
it is given (the mesh's tp group), through `Comm`, so each byte is counted. Tensors are
batch-first: the sequence dimension is `seq_dim` (1 for (B, T, D) activations).

| function                    | forward                           | backward                      |
|-----------------------------|-----------------------------------|-------------------------------|
| `copy_to_tp` (f)            | identity                          | all-reduce (sum) on tp        |
| `reduce_from_tp` (g)        | all-reduce (sum) on tp            | identity                      |
| `gather_seq` (SP f)         | all-gather along the sequence     | reduce-scatter along the      |
|                             | on tp                             | sequence                      |
| `reduce_scatter_seq` (SP g) | reduce-scatter along the sequence | all-gather along the sequence |
| `all_reduce_grad_hook`      | —                                 | all-reduce (sum) of a         |
|                             |                                   | parameter's gradient on tp,   |
|                             |                                   | before accumulation           |

Backward functions never modify the incoming gradient in place: autograd may hand the same
gradient tensor to several consumers (the two inputs of an addition share it).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from plait.comm import Comm, Group
from plait.errors import ConfigError


def _all_reduce(x: torch.Tensor, comm: Comm, group: Group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(out, group)
    return out


def _check_seq(size: int, group: Group) -> None:
    if size % group.size:
        raise ConfigError(
            f"sequence parallelism splits the sequence over parallel.tp = {group.size} ranks, but "
            f"the sequence has {size} positions: make train.seq_len a multiple of {group.size} or "
            "set parallel.sequence_parallel=false"
        )


def _gather_seq(x: torch.Tensor, comm: Comm, group: Group, seq_dim: int) -> torch.Tensor:
    # all_gather concatenates along dim 0: move the sequence there, gather, move it back
    xt = x.transpose(0, seq_dim).contiguous()  # (T/t, ..., D)
    out = torch.empty((xt.shape[0] * group.size, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    comm.all_gather(out, xt, group)
    return out.transpose(0, seq_dim).contiguous()  # (B, T, D)


def _reduce_scatter_seq(x: torch.Tensor, comm: Comm, group: Group, seq_dim: int) -> torch.Tensor:
    _check_seq(x.shape[seq_dim], group)
    xt = x.transpose(0, seq_dim).contiguous()  # (T, ..., D)
    out = torch.empty((xt.shape[0] // group.size, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    comm.reduce_scatter(out, xt, group)
    return out.transpose(0, seq_dim).contiguous()  # (B, T/t, D)


class _CopyToTP(Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        ctx.comm, ctx.group = comm, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.comm, ctx.group), None, None


class _ReduceFromTP(Function):
    @staticmethod
    def forward(ctx, x, comm, group):
        return _all_reduce(x, comm, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherSeq(Function):
    @staticmethod
    def forward(ctx, x, comm, group, seq_dim):
        ctx.comm, ctx.group, ctx.seq_dim = comm, group, seq_dim
        return _gather_seq(x, comm, group, seq_dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.comm, ctx.group, ctx.seq_dim), None, None, None


class _ReduceScatterSeq(Function):
    @staticmethod
    def forward(ctx, x, comm, group, seq_dim):
        ctx.comm, ctx.group, ctx.seq_dim = comm, group, seq_dim
        return _reduce_scatter_seq(x, comm, group, seq_dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.comm, ctx.group, ctx.seq_dim), None, None, None


def copy_to_tp(x: torch.Tensor, comm: Comm, group: Group) -> torch.Tensor:
    """Megatron's f, where a replicated activation enters the tp region.

    Forward: identity, no communication. Backward: all-reduce (sum) of the input gradient on
    `group` (each rank back-propagates through its own shard of the weights, so each holds a
    partial sum of the gradient).
    """
    return _CopyToTP.apply(x, comm, group) if group.size > 1 else x


def reduce_from_tp(x: torch.Tensor, comm: Comm, group: Group) -> torch.Tensor:
    """Megatron's g, where partial sums leave the tp region (row-parallel output, vocab embedding).

    Forward: all-reduce (sum) on `group`. Backward: identity, no communication (the gradient of a
    sum is the same for every summand).
    """
    return _ReduceFromTP.apply(x, comm, group) if group.size > 1 else x


def gather_seq(x: torch.Tensor, comm: Comm, group: Group, seq_dim: int = 1) -> torch.Tensor:
    """Sequence-parallel f: this rank's 1/t of the sequence -> the whole sequence.

    Forward: all-gather along `seq_dim` on `group` (rank r holds positions [r·T/t, (r+1)·T/t)).
    Backward: reduce-scatter (sum) along `seq_dim` on `group`: each rank gets the summed gradient
    of its own positions. Same bytes as f's all-reduce, split over the two passes.
    """
    return _GatherSeq.apply(x, comm, group, seq_dim) if group.size > 1 else x


def reduce_scatter_seq(x: torch.Tensor, comm: Comm, group: Group, seq_dim: int = 1) -> torch.Tensor:
    """Sequence-parallel g: partial sums over the whole sequence -> the full sum of 1/t of it.

    Forward: reduce-scatter (sum) along `seq_dim` on `group`; the sequence length must divide by
    the group size (ConfigError naming train.seq_len otherwise). Backward: all-gather along
    `seq_dim` on `group`.
    """
    return _ReduceScatterSeq.apply(x, comm, group, seq_dim) if group.size > 1 else x


def all_reduce_grad_hook(comm: Comm, group: Group):
    """A `Tensor.register_hook` function: all-reduce (sum) a parameter's gradient over `group`.

    For parameters replicated over tp that act on 1/t of the sequence (norm weights, row-parallel
    biases under sequence parallelism): each rank's gradient covers only its positions. The hook
    runs in backward when the gradient of this backward pass is ready, before it is accumulated
    into `.grad` (so accumulation over micro-batches stays exact) and before any data-parallel
    post-accumulate hook; every tp rank reaches it in the same autograd order.
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad, comm, group)

    return hook
