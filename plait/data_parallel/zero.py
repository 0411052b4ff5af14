"""ZeRO over the data-parallel group: sharded optimizer state (stage 1), gradients (2),
parameters (3).

Terms. Ψ: the parameter elements this model-parallel rank trains (its tensor-parallel shards, its
pipeline stage), each tensor once (tied weights once). Nd = mesh.dp size, r = this rank's dp index.

Stages 1 and 2 are plait's own, built on the plain reducer (plait.data_parallel.GradReducer):
- Layout. The reducer's buckets (reverse registration order, `parallel.bucket_mb`) are zero-padded
  to p_b = ⌈n_b/Nd⌉·Nd elements; rank r owns chunk [r·s_b, (r+1)·s_b) of each, s_b = p_b/Nd.
  The parameters move into one flat buffer per bucket with the gradient bucket's layout (`p.data`
  becomes a view), so a chunk of the flat parameter buffer is exactly the parameters whose reduced
  gradient is the same chunk of the gradient bucket. P = Σ_b (p_b − n_b) padding elements.
- Pieces. Where rank r's chunk overlaps a parameter, a 1-D leaf tensor views that slice of the flat
  parameter buffer; its `.grad` is the matching slice of the reduced gradient chunk. The wrapped
  torch optimizer steps these leaves in the original param groups (see `ZeroOptimizer`), so an
  element-wise optimizer (AdamW, SGD) computes bit for bit what it computes on the full tensors.
Communication contract (every rank of mesh.dp, in bucket order, from the training thread):
- backward: each bucket is reduce-scattered (SUM) from the reducer's post-accumulate-grad hooks,
  as plain DP issues its all-reduce (overlapped with the rest of backward; `ShardExchange`):
  (Nd−1)/Nd · 4p_b bytes per bucket. Non-final micro-batches (`no_sync`) only accumulate; in a
  pipeline, each chunk's buckets go from its own last backward (the reducer's `final_backward`).
- step: once the leaves are stepped, one all-gather per bucket of the flat parameter buffer, in
  place (the input is this rank's chunk of the output), all issued, then all waited.
  Per step 2·(Nd−1)/Nd·4(Ψ+P) bytes: plain DP's all-reduce plus the padding.
- ZeRO-1 reduce-scatters into this rank's chunk of the full gradient bucket (kept whole, 4(Ψ+P)
  bytes); ZeRO-2 into a separate chunk buffer (4(Ψ+P)/Nd bytes) and drops the full buckets after
  the exchange (`GradReducer(release_after_reduce=True)`): they exist only from a step's first
  backward to its optimizer step.
Stage 3 is torch's FSDP2 (`plait.data_parallel.zero3`); its local shards are stepped the same way.

Gradient clipping: the leaves' gradients are disjoint pieces, so `ParallelOptimizer.grad_norm`
sums their squares over the whole world (`dp_sharded`). LAMB / LARS get a norm reducer that adds
each parameter's pieces over dp (one all-reduce of a (parameters × 2) table per step) before the
optimizer's own tensor-parallel reducer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from plait.comm import Group
from plait.compression.base import Compressor, Pending
from plait.data_parallel.zero_optim import Piece, ZeroOptimizer, leaf_of, slots_of
from plait.errors import ConfigError
from plait.mesh import Mesh

__all__ = ["Piece", "ShardExchange", "ZeroOptimizer", "apply_zero", "build_reducer", "check_zero",
           "shard_buckets", "wrap_optimizer"]


class ShardExchange(Compressor):
    """GradReducer's bucket exchange for ZeRO-1/2:
    reduce-scatter (SUM) of the padded bucket over dp.

    ZeRO-1 (`keep_shards=False`) writes rank r's reduced chunk in place into chunk r of the bucket;
    ZeRO-2 into a chunk-sized buffer per bucket (`shard`), which outlives the bucket.
    With `rep` (parallel.replicas > 1) the reduced chunk is then all-reduced (SUM) over the
    replicas, when the reducer waits the bucket: (R−1)/R · 2 · 4p_b/Nd bytes on rep (HSDP).
    """

    name = "reduce_scatter"

    def __init__(self, keep_shards: bool, rep: Group | None = None):
        super().__init__(error_feedback=False)
        self.keep_shards = keep_shards
        self.rep = rep
        self.shards: dict[int, torch.Tensor] = {}

    def shard(self, key: int, flat: torch.Tensor | None, padded: int,
              like: torch.Tensor) -> torch.Tensor:
        """Where this rank's reduced chunk of bucket `key` (`padded` elements; `flat` its buffer)
        lands."""
        n, r = self.group.size, self.group.rank
        s = padded // n
        if not self.keep_shards:
            return flat[r * s:(r + 1) * s]
        if key not in self.shards:
            self.shards[key] = torch.zeros(s, dtype=like.dtype, device=like.device)
        return self.shards[key]

    def exchange(self, key, flat, views):
        if flat.numel() % self.group.size:
            raise RuntimeError(f"bucket {key}: {flat.numel()} elements do not split over dp = "
                               f"{self.group.size}; the reducer must pad buckets (pad_to = dp)")
        out = self.shard(key, flat, flat.numel(), flat)
        first = self.comm.reduce_scatter(out, flat, self.group, async_op=True)
        if self.rep is None:
            return Pending(first)
        return Pending(first, lambda: self.comm.all_reduce(out, self.rep))


# -- ZeRO-1/2 construction -------------------------------------------------------------------
def build_reducer(params: list[nn.Parameter], mesh: Mesh, stage: int, bucket_bytes: int,
                  segments: list[list[nn.Parameter]] | None = None, rep: Group | None = None):
    """The ZeRO-1/2 gradient path: a GradReducer whose buckets are padded to a multiple of dp and
    reduce-scattered (ZeRO-2 also frees the full buckets after each exchange); `segments` as the
    reducer's (pipeline chunks); `rep`: the replicas' group, over which each shard is summed."""
    from plait.data_parallel.reducer import GradReducer

    return GradReducer(params, mesh.dp, mesh.comm, bucket_bytes=bucket_bytes, pad_to=mesh.dp_size,
                       compressor=ShardExchange(keep_shards=stage == 2, rep=rep),
                       release_after_reduce=stage == 2, segments=segments)


def shard_buckets(optimizer: torch.optim.Optimizer, reducer, mesh: Mesh,
                  stage: int) -> ZeroOptimizer:
    """ZeRO-1/2 over a reducer from `build_reducer`: moves the parameters into flat per-bucket
    buffers, makes this rank's pieces and wraps the optimizer (no communication)."""
    n, r = mesh.dp_size, mesh.dp_index
    exchange = reducer.compressor
    full = slots_of(optimizer)
    slot_of = {id(p): i for i, p in enumerate(full)}
    missing = [i for i, p in enumerate(full) if id(p) not in reducer._bucket_of]
    if missing:
        raise ConfigError(f"parallel.zero = {stage}: {len(missing)} optimizer parameters have no "
                          "gradient bucket (frozen parameters, or parameters outside the model, "
                          "cannot be sharded)")
    flats, pieces, spans, chunks = [], [], {}, []
    with torch.no_grad():
        for b in reducer.buckets:
            s = b.padded // n
            lo, hi = r * s, (r + 1) * s
            flat = torch.zeros(b.padded, dtype=b.params[0].dtype, device=b.params[0].device)
            # (s,): ZeRO-1 a view of the (kept) bucket, ZeRO-2 a buffer of its own
            grad_chunk = exchange.shard(b.index, b.buffer, b.padded, flat)
            off = 0
            for p in b.params:
                k = p.numel()
                flat[off: off + k].copy_(p.detach().reshape(-1))
                p.data = flat[off: off + k].view_as(p)
                a, e = max(lo, off), min(hi, off + k)
                if id(p) in slot_of:
                    spans[slot_of[id(p)]] = (b.index, off)
                    if a < e:
                        leaf = leaf_of(flat[a:e], p)
                        leaf.grad = grad_chunk[a - lo: e - lo]
                        pieces.append(Piece(slot_of[id(p)], b.index, a, e - a, a - off, leaf))
                off += k
            flats.append(flat)
            chunks.append(s)

    def gather_params() -> None:
        hs = []
        for f in flats:
            s = f.numel() // n
            hs.append(mesh.comm.all_gather(f, f[r * s:(r + 1) * s], mesh.dp, async_op=True))
        for h in hs:
            h.wait()

    def sources():
        grads = ([b.buffer for b in reducer.buckets if b.buffer is not None]
                 + list(exchange.shards.values()))
        grads += [p.grad for p in full if p.grad is not None]
        return list(full), grads

    zo = ZeroOptimizer(optimizer, pieces, spans, chunks, mesh, stage, after_step=gather_params,
                       memory_sources=sources)
    zo.padding = sum(b.padded - b.numel for b in reducer.buckets)
    return zo


# -- parallelize() step 5 ------------------------------------------------------------------------
def check_zero(cfg, mesh: Mesh, compression=None, optimizer=None) -> None:
    """ConfigError for what ZeRO does not combine with
    (raised on every rank before any collective)."""
    z = cfg.zero
    if z not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero = {z}: choose 0, 1, 2 or 3")
    if getattr(optimizer, "dp_exchange", None) is not None:
        raise ConfigError(f"optim.name = onebit_adam with parallel.zero = {z}: 1-bit Adam "
                          "exchanges whole gradients itself; set parallel.zero=0 or another "
                          "optimizer")
    if compression is not None and compression.name != "none":
        raise ConfigError(f"compression.name = {compression.name!r} with parallel.zero = {z}: ZeRO "
                          "reduce-scatters gradient buckets uncompressed; set "
                          "compression.name=none or parallel.zero=0")
    if z == 3 and mesh.pp_size > 1 and cfg.schedule == "zb_h1":
        raise ConfigError("parallel.schedule = zb_h1 with parallel.zero = 3: the split backward "
                          "computes weight gradients outside FSDP2's hooks; choose gpipe, 1f1b or "
                          "interleaved_1f1b, or parallel.zero <= 2")


def apply_zero(model: nn.Module, mesh: Mesh, cfg, compression=None, optimizer=None,
               segments: list[list[nn.Parameter]] | None = None, rep: Group | None = None):
    """The dp gradient path for parallel.zero = 1, 2 (a padded, reduce-scattering GradReducer) or
    3 (FSDP2 over mesh.dp; changes `model` in place). None at dp = 1, where ZeRO is the identity.
    `segments`: the reducer's (pipeline chunks; FSDP2's units follow the model's blocks).
    `rep` (parallel.replicas > 1): each rank's reduced gradient shard is then summed over it."""
    check_zero(cfg, mesh, compression, optimizer)
    if mesh.dp_size == 1:
        return None
    if cfg.zero == 3:
        from plait.data_parallel.zero3 import FullyShardedDP

        return FullyShardedDP(model, mesh, rep)
    return build_reducer(list(model.parameters()), mesh, cfg.zero, int(cfg.bucket_mb * 2**20),
                         segments, rep)


def wrap_optimizer(optimizer: torch.optim.Optimizer, reducer, mesh: Mesh, cfg) -> ZeroOptimizer:
    """The ZeroOptimizer over `reducer` (from `apply_zero`);
    its `params` are what ParallelOptimizer clips."""
    if reducer is None:
        raise ConfigError(f"parallel.zero = {cfg.zero} needs the per-step gradient exchange "
                          "(sync.strategy = every_step): set sync.strategy=every_step or "
                          "parallel.zero=0")
    if cfg.zero == 3:
        from plait.data_parallel.zero3 import shard_fsdp

        return shard_fsdp(optimizer, reducer, mesh)
    return shard_buckets(optimizer, reducer, mesh, cfg.zero)
