"""Activation checkpointing: keep less of the forward pass for backward, recompute the rest.

Modes (`train.activation_checkpointing`):

- `none`: autograd keeps every activation a backward needs.
- `full`: each transformer block (the model's ParallelSpec `block_types`, plait.parallel_spec)
  keeps only its inputs; its forward runs again, block by block, when backward reaches it. Per
  block and micro-batch the memory drops from all of the block's activations (sbh(34 + 5as/h)
  bytes at 16 bits, Korthikanti et al. 2022) to its input, at the price of one more forward of
  every block (≈ +33% of the step's FLOPs).
- `selective`: only the attention core (the spec's `attention_core`; for plait's GPT
  `Attention.core`: grouped-query head expansion and softmax(QKᵀ/√E)V) is recomputed; its inputs
  q, k, v are kept. That is the part whose memory grows with the sequence (the a·s² term) and
  costs few FLOPs to redo. With a fused (flash) kernel the s² matrix is never stored, so on such
  kernels the saving is the core's output, the softmax statistics and the expanded key/value heads.

Both use `torch.utils.checkpoint` with `use_reentrant=False`: the graph is built through the
parameters as usual, so each parameter's gradient is accumulated by its own AccumulateGrad node and
the post-accumulate-grad hooks of the data-parallel reducer, tensor-parallel gradient hooks and
ZeRO fire as without recomputation; autocast state and RNG state are replayed. Under no_grad
(evaluation) the wrapped forward runs plainly.

Communication contract (tensor parallelism). Collectives inside a recomputed region run again in
backward, on the same group, in the same order on every tp rank (every rank walks the same graph),
and are counted by `plait.comm` like any other: `full` adds, per block and micro-batch, the forward
collectives whose results some saved tensor depends on. torch stops a recomputation as soon as the
last tensor backward needs is rebuilt ("early stop"), so the block's final collective (the MLP's
row-parallel all-reduce, or reduce-scatter under sequence parallelism) is not repeated: without
sequence parallelism 1 extra all-reduce of b·s·h elements per block and micro-batch (the attention
output's); with it 3 (the two region-entry all-gathers and the attention reduce-scatter). Under the
zero-bubble pipeline (ZB-H1) the weight-gradient pass (W) is a backward of its own and recomputes
each block of stages after the first once more, so twice the extra collectives there (W's many
autograd calls share one recomputation through torch's GraphExecGroup, torch >= 2.10; without it
each call recomputes). `selective` repeats no collective (the attention core has none).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from plait.errors import ConfigError
from plait.parallel_spec import blocks_of, spec_of

MODES = ("none", "full", "selective")


def _recomputed(fn):
    """`fn` under non-reentrant checkpointing whenever autograd records the graph."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    run.plait_recomputed = True
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Wrap, in place, each block's forward (`full`) or each attention core (`selective`).

    Blocks and attention core are those of the model's ParallelSpec (plait.parallel_spec.spec_of).
    Returns how many were wrapped (idempotent: an already wrapped one is left alone). The model
    may be whole, tensor-parallel or one pipeline stage: the blocks keep their modules, names and
    parameters. ConfigError when the mode is unknown or the model has nothing to wrap.
    """
    if mode not in MODES:
        raise ConfigError(f"train.activation_checkpointing = {mode!r}: choose one of "
                          f"{', '.join(MODES)}")
    if mode == "none":
        return 0
    if mode == "full":
        targets, attr, what = blocks_of(model), "forward", "blocks (ParallelSpec.block_types)"
    else:
        kind, attr = spec_of(model).attention_core or (None, "")
        targets = [m for m in model.modules() if kind is not None and isinstance(m, kind)]
        what = "attention core (ParallelSpec.attention_core)"
    if not targets:
        raise ConfigError(f"train.activation_checkpointing = {mode}: {type(model).__name__} "
                          f"describes no {what} to wrap; set it to none, give the model a "
                          f"parallel_spec(), or wrap your own blocks with torch.utils.checkpoint")
    n = 0
    for m in targets:
        fn = getattr(m, attr)
        if not getattr(fn, "plait_recomputed", False):
            # an instance attribute: the class and other models are untouched
            setattr(m, attr, _recomputed(fn))
            n += 1
    return n


@contextmanager
def count_saved_bytes(exclude: list[torch.Tensor] = ()):
    """Count the bytes autograd saves for backward inside the context: yields a one-element list.

    Each distinct tensor (by data pointer and size) is counted once; tensors sharing storage with
    `exclude` (the parameters) are not. Tensors saved inside a checkpointed region are held by the
    checkpoint, not by autograd, and are not seen here: only what the region keeps (its inputs) is.
    """
    skip = {t.data_ptr() for t in exclude}
    seen: set[tuple[int, int]] = set()
    counter = [0]

    def pack(t: torch.Tensor):
        key = (t.data_ptr(), t.numel())
        if t.data_ptr() not in skip and key not in seen:
            seen.add(key)
            counter[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter
