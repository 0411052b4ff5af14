"""Bucketed gradient all-reduce over the data-parallel group, overlapped with backward.

Communication contract
- Gradients live in flat fp32 (or the parameters' dtype) buckets; each parameter's `.grad` is a
  view into its bucket, so a bucket is all-reduced in place with no copy.
- Buckets are filled in reverse registration order (roughly the order backward produces
  gradients); the first bucket is capped at `first_bucket_bytes` so its all-reduce starts early.
- A bucket's asynchronous all-reduce (SUM, on `group`) starts from the post-accumulate-grad hook
  of its last ready parameter, but only after every earlier bucket has started: buckets are
  always issued in index order, the same on every rank, whatever order autograd finishes them.
- `finish()` issues what is left (parameters that got no gradient contribute zeros), waits for
  every bucket, and optionally divides by the group size. Call it once per optimizer step.
- With a `compressor` (plait.compression) the bucket's exchange is `compressor.exchange(index,
  buffer, per-parameter views)` instead of the all-reduce: issued at the same point, in the same
  order; its later phases run when `finish()` waits the buckets, in bucket order.
- While `sync` is False (non-final micro-batches of gradient accumulation) hooks only accumulate.
- Pipelines (`segments`, `final_backward`): the parameters of each pipeline chunk are one
  segment, and no bucket spans two segments, so a chunk's buckets are complete as soon as its own
  last backward of the step is (the runner runs that one inside `final_backward(chunk modules)`,
  every other instruction under `no_sync()`). Segments are laid out last first, as parameters
  are, which is the order in which the schedules finish chunks. The issue order stays the bucket
  index order, the same on every dp rank: the dp ranks of a pipeline stage run the same program.
- ZeRO options (plait.data_parallel.zero): `pad_to` zero-pads each bucket to a multiple of it (a
  reduce-scatter needs equal chunks; the padding stays zero and no view covers it);
  `release_after_reduce` drops each bucket's buffer (and its parameters' `.grad`) once its
  exchange is waited, and allocates it again, zeroed, when the bucket's first gradient of the
  next step arrives: between steps only what the exchange kept (a gradient shard) is held.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from plait.comm import Comm, Group, Handle

if TYPE_CHECKING:
    from plait.compression import Compressor


class _Bucket:
    def __init__(self, index: int, params: list[nn.Parameter], dtype: torch.dtype,
                 device: torch.device, pad_to: int = 1):
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        # buffer length: numel rounded up to a multiple of pad_to
        self.padded = -(-self.numel // pad_to) * pad_to
        self.dtype, self.device = dtype, device
        self.buffer: torch.Tensor | None = None
        self.views: dict[int, torch.Tensor] = {}
        self.allocate()
        self.ready: set[int] = set()
        self.handle: Handle | None = None

    def allocate(self) -> None:
        self.buffer = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        off = 0
        for p in self.params:
            self.views[id(p)] = self.buffer[off: off + p.numel()].view_as(p)
            off += p.numel()

    def release(self) -> None:
        self.buffer = None
        self.views = {}


class GradReducer:
    def __init__(self, params: list[nn.Parameter], group: Group, comm: Comm,
                 bucket_bytes: int = 25 * 2**20, first_bucket_bytes: int = 2**20,
                 average: bool = False, dtype: torch.dtype | None = None,
                 compressor: Compressor | None = None, pad_to: int = 1,
                 release_after_reduce: bool = False,
                 segments: list[list[nn.Parameter]] | None = None):
        """`segments`: the parameters in groups that never share a bucket (pipeline chunks), in
        place of `params`' order; parameters of `params` in no segment get the last buckets."""
        self.group = group
        self.pad_to = pad_to
        self.release_after_reduce = release_after_reduce
        self.comm = comm
        # None: the plain in-place all-reduce; else compressor.exchange decides each
        # bucket's traffic
        self.compressor = compressor.bind(group, comm) if compressor is not None else None
        self.average = average
        self.sync = True
        self._on_issue = None  # final_backward's callback: bucket index -> None
        groups = [list(params)] if segments is None else [list(g) for g in segments]
        seg_of: dict[int, int] = {}  # the first group a trainable parameter appears in
        for i, group_params in enumerate(groups):
            for p in group_params:
                if p.requires_grad:
                    seg_of.setdefault(id(p), i)
        # parameters in no segment: laid out first, so their buckets come last
        rest = [p for p in params if p.requires_grad and id(p) not in seg_of]
        for p in rest:
            seg_of[id(p)] = -1
        seen: set[int] = set()
        params = [p for p in (*rest, *(p for g in groups for p in g)) if p.requires_grad
                  and not (id(p) in seen or seen.add(id(p)))]
        self.params = params
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        cur: list[nn.Parameter] = []
        # buckets asked smaller than 1 MiB: all of them
        cur_bytes, cap = 0, min(first_bucket_bytes, bucket_bytes)
        for p in reversed(params):
            # a bucket holds one dtype and device, and one segment
            if cur and (cur_bytes + p.numel() * p.element_size() > cap or p.dtype != cur[0].dtype
                        or p.device != cur[0].device or seg_of[id(p)] != seg_of[id(cur[0])]):
                self._add_bucket(cur, dtype)
                cur, cur_bytes, cap = [], 0, bucket_bytes
            cur.append(p)
            cur_bytes += p.numel() * p.element_size()
        if cur:
            self._add_bucket(cur, dtype)
        self._next = 0  # next bucket index to issue
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self.zero_grad()

    def _add_bucket(self, params: list[nn.Parameter], dtype: torch.dtype | None) -> None:
        b = _Bucket(len(self.buckets), params, dtype or params[0].dtype, params[0].device,
                    self.pad_to)
        self.buckets.append(b)
        for p in params:
            self._bucket_of[id(p)] = b

    # -- gradient storage ------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero every bucket and point each .grad at its view (replaces optimizer.zero_grad)."""
        for b in self.buckets:
            if self.release_after_reduce:  # allocated again by the bucket's first gradient
                b.release()
                for p in b.params:
                    p.grad = None
            else:
                b.buffer.zero_()
                for p in b.params:
                    p.grad = b.views[id(p)]
            b.ready.clear()
            b.handle = None
        self._next = 0

    def _adopt(self, p: nn.Parameter) -> None:
        """Make p.grad the bucket view again if something replaced it
        (e.g. zero_grad(set_to_none))."""
        b = self._bucket_of[id(p)]
        if b.buffer is None:  # released after the last step's exchange
            b.allocate()
            for q in b.params:  # gradients still to come accumulate in place
                if q.grad is None:
                    q.grad = b.views[id(q)]
        view = b.views[id(p)]
        if p.grad is not view:
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view

    # -- hooks -----------------------------------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        self._adopt(p)
        if not self.sync:
            return
        b = self._bucket_of[id(p)]
        b.ready.add(id(p))
        if len(b.ready) == len(b.params):
            self._issue_ready()
        if self.compressor is not None:
            self.compressor.poll()

    def _issue_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.ready) < len(b.params):
                return
            self._issue(b)

    def _issue(self, b: _Bucket) -> None:
        if self.compressor is None:
            b.handle = self.comm.all_reduce(b.buffer, self.group, async_op=True)
        else:  # the summed gradient is in b.buffer once the handle is waited
            b.handle = self.compressor.exchange(b.index, b.buffer,
                                                [b.views[id(p)] for p in b.params])
        self._next += 1
        if self._on_issue is not None:
            self._on_issue(b.index)

    # -- step ------------------------------------------------------------------------------
    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the next backward outside the context reduces them all."""
        prev, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = prev

    @contextmanager
    def final_backward(self, modules: list[nn.Module], on_issue=None):
        """The backward run inside is the step's last one for `modules`' parameters: their
        buckets are exchanged from the hooks as they fill (in index order, after every earlier
        bucket), and on leaving, those of their parameters that got no gradient count as ready
        (zeros, as in `finish`). `on_issue(bucket index)` is called at each issue inside.
        Under an outer `no_sync()` it is one more accumulating backward."""
        if not self.sync:
            yield
            return
        prev, self.sync, self._on_issue = self.sync, True, on_issue
        try:
            yield
            for m in modules:
                for p in m.parameters():
                    b = self._bucket_of.get(id(p))
                    if b is not None and id(p) not in b.ready:
                        self._on_grad(p)
        finally:
            self.sync, self._on_issue = prev, None

    def finish(self) -> None:
        """Issue remaining buckets in order, wait for all, then (optionally) average."""
        for p in self.params:
            self._adopt(p)
        while self._next < len(self.buckets):
            self._issue(self.buckets[self._next])
        for b in self.buckets:
            b.handle.wait()
            if self.average:
                b.buffer.div_(self.group.size)
            if self.release_after_reduce:
                for p in b.params:
                    p.grad = None
                b.release()
            b.ready.clear()
            b.handle = None
        self._next = 0
        if self.compressor is not None:
            self.compressor.end_step()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
