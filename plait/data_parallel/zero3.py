"""ZeRO-3 (parameters sharded too) through torch's FSDP2 `fully_shard` on the dp dimension.

What is sharded: every parameter of the model (or pipeline stage) this rank holds, along dim 0 over
mesh.dp: FSDP2 pads dim 0 to a multiple of Nd and rank r keeps rows [r·c, (r+1)·c), c = ⌈d0/Nd⌉.
Units: each transformer block (the model's ParallelSpec `block_types`, else each child of an
nn.ModuleList) is one `fully_shard` unit, the module itself the root unit (embedding, final norm,
head). Tensor-parallel layers hold plain tensors already split over tp, so FSDP2 splits those
shards once more over dp; a pipeline stage is a module like any other (`PipelineStage` holding
blocks, and answering with its model's spec).

Communication contract (FSDP2's own collectives on mesh.dp's process group, which bypass
plait.comm; their bytes are written into `mesh.comm.stats` by formula, here):
- forward: each unit all-gathers its parameters before it runs and frees them after (every unit,
  the root too: reshard_after_forward = True, which torch 2.13 honours for the root; a torch that
  keeps the root gathered until backward gathers it once, and the records follow what happens);
  backward all-gathers them again;
- backward: each unit's gradients are reduce-scattered (SUM, see below) once its backward is done;
  under `no_sync()` (non-final micro-batches) they only accumulate, unsharded, and the last
  backward reduce-scatters the sum.
- pipelines: the runner runs every instruction under `no_sync()` except, per chunk, the last
  backward of the step, which it runs inside `final_backward(chunk modules)`: there exactly the
  units whose parameters all became final reduce-scatter (every other unit's flag is off, since
  FSDP2's end-of-backward callback visits every unit of the module), so each unit reduce-scatters
  once per step, from the chunk's last backward. Trade-off: a unit holds its unsharded
  accumulated gradient (4 bytes per parameter of the unit, as ZeRO-2's full buckets) from its
  first backward of the step to its last, where reduce-scattering every micro-batch would keep
  only the 1/Nd shard but send m× the bytes.
- bytes per step: all-gather 2·(Nd−1)/Nd·4(Ψ+P) per micro-batch and reduce-scatter
  (Nd−1)/Nd·4(Ψ+P) once, P the dim-0 padding: 3Ψ elements for a step of one micro-batch, as in
  Rajbhandari et al. Records are written from module hooks when the forward that implies them
  runs: an all-gather for every unit whose parameters are sharded when its forward starts,
  another for every unit still sharded after its forward (gathered again in backward), and a
  reduce-scatter when gradients will be synchronized (in a pipeline: when `final_backward` turns
  a unit's reduction on).
- summed gradients: FSDP2 averages over dp; plait's trainer divides the loss by the global token
  count and sums. `set_gradient_divide_factor(1.0)` with `set_force_sum_reduction_for_comms(True)`
  make the reduce-scatter a plain SUM (exact; gloo has no PREMUL_SUM); on a torch without them
  the averaged shards are multiplied by Nd after backward (exact when Nd is a power of two).
- replicas (parallel.replicas > 1, HSDP): `finish()` sums every local gradient shard over
  mesh.rep (one coalesced all-reduce), after the dp reduce-scatter: 2(R−1)/R · 4(Ψ+P)/Nd bytes.
- sequence parallelism: a norm weight's gradient hook (sum over tp) sits on the original
  parameter, which FSDP2 replaces; `finish()` all-reduces those gradient shards over mesh.tp
  instead (one coalesced all-reduce; the sum commutes with the dp reduce-scatter).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from plait.comm import Group, wire_bytes
from plait.data_parallel.zero_optim import Piece, ZeroOptimizer, leaf_of, slots_of
from plait.mesh import Mesh
from plait.parallel_spec import blocks_of

# plait's marks on a parameter (tp layout, tied copies, kv replicas), kept across FSDP2's swap
_ATTRS = ("plait_tp_replicated", "plait_tp_shard", "plait_tp_grad_hook", "plait_tp_parts",
          "plait_tp_groups", "plait_tp_replica", "plait_tied", "plait_tied_copy")


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def padded_numel(shape: torch.Size, n: int) -> int:
    """Elements FSDP2 all-gathers / reduce-scatters for a parameter of `shape` over n ranks."""
    if len(shape) == 0:
        return n
    return math.ceil(shape[0] / n) * n * math.prod(shape[1:])


def units_of(model: nn.Module) -> list[nn.Module]:
    """The fully_shard units below the root: the blocks of the model's ParallelSpec
    (plait.parallel_spec.blocks_of), else each child of an nn.ModuleList."""
    blocks = blocks_of(model)
    if blocks:
        return blocks
    return [c for m in model.modules() if isinstance(m, nn.ModuleList) for c in m]


class FullyShardedDP:
    """ZeRO-3's gradient path, in the place of the reducer: `no_sync()`, `final_backward()`,
    `finish()`, `zero_grad()`.

    `model` is changed in place (FSDP2 swaps its parameters for DTensor shards); `state_gatherer`
    turns its sharded state dict back into full tensors (a collective over mesh.dp).
    """

    def __init__(self, model: nn.Module, mesh: Mesh, rep: Group | None = None):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.model, self.mesh = model, mesh
        self.rep = rep  # parallel.replicas > 1: gradient shards are summed over it in finish()
        self.n = mesh.dp_size
        attrs = {name: {a: getattr(p, a) for a in _ATTRS if hasattr(p, a)}
                 for name, p in model.named_parameters()}
        dm = DeviceMesh.from_group(mesh.dp.pg, mesh.device.type, mesh_dim_names=("dp",))
        units = units_of(model)
        for u in units:
            fully_shard(u, mesh=dm, reshard_after_forward=True)
        fully_shard(model, mesh=dm, reshard_after_forward=True)
        self.units = [*units, model]
        self.exact_sum = all(hasattr(FSDPModule, m) for m in ("set_gradient_divide_factor",
                                                               "set_force_sum_reduction_for_comms"))
        for u in self.units:
            if self.exact_sum:
                u.set_gradient_divide_factor(1.0)
                u.set_force_sum_reduction_for_comms(True)
        # the root too, so backward gathers every unit again
        if hasattr(model, "set_reshard_after_forward"):
            model.set_reshard_after_forward(True, recurse=False)
        self.params = [p for _, p in model.named_parameters()]
        for name, p in model.named_parameters():  # FSDP2 made new Parameters: keep plait's marks
            for a, v in attrs.get(name, {}).items():
                setattr(p, a, v)
        self.tp_summed = [p for p in self.params if getattr(p, "plait_tp_grad_hook", False)]
        self.sync = True
        # this step's pipeline bookkeeping: modules whose gradients are final, units reduced
        self._final: set[int] = set()
        self._reduced: set[int] = set()
        self.optimizer: ZeroOptimizer | None = None
        self._managed = {id(u): self._direct_params(u) for u in self.units}
        # per unit: its current forward started from sharded parameters
        self._fresh: dict[int, bool] = {}
        for u in self.units:
            if self._managed[id(u)]:
                u.register_forward_pre_hook(self._pre_forward, prepend=True)
                u.register_forward_hook(self._post_forward)

    # -- byte records ----------------------------------------------------------------------
    def _direct_params(self, unit: nn.Module) -> list[tuple[nn.Module, str, int]]:
        """(module, attribute, padded bytes) of the parameters `unit` itself gathers
        (not its sub-units')."""
        nested = {id(u) for u in self.units if u is not unit}
        out, seen, stack = [], set(), [unit]
        while stack:
            m = stack.pop()
            for name, p in m.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((m, name, padded_numel(p.shape, self.n) * p.element_size()))
            stack.extend(c for c in m.children() if id(c) not in nested)
        return out

    def _sharded(self, unit: nn.Module) -> bool:
        m, name, _ = self._managed[id(unit)][0]
        return _is_dtensor(getattr(m, name))

    def _record(self, op: str, unit: nn.Module) -> None:
        nbytes = sum(b for _, _, b in self._managed[id(unit)])
        self.mesh.comm.stats.record(op, self.mesh.dp.name, nbytes, wire_bytes(op, nbytes, self.n),
                                    0.0)

    def _pre_forward(self, unit, args) -> None:
        self._fresh[id(unit)] = self._sharded(unit)
        if self._fresh[id(unit)]:
            self._record("all_gather", unit)

    def _post_forward(self, unit, args, out) -> None:
        # a forward that found the unit gathered is a recomputation inside backward (activation
        # checkpointing): its gathers and reduction are already recorded
        if not torch.is_grad_enabled() or not self._fresh.pop(id(unit), False):
            return
        if self._sharded(unit):  # resharded: backward gathers it again
            self._record("all_gather", unit)
        if self.sync:
            self._record("reduce_scatter", unit)

    # -- the reducer's interface -----------------------------------------------------------
    @contextmanager
    def no_sync(self):
        """Accumulate unsharded gradients; the next backward outside reduce-scatters the sum."""
        prev, self.sync = self.sync, False
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.sync = prev
            self.model.set_requires_gradient_sync(prev)

    @contextmanager
    def final_backward(self, modules: list[nn.Module], on_issue=None):
        """The backward run inside is the step's last one for `modules` (a pipeline chunk's
        layers): every unit whose parameters all belong to modules made final so far this step
        reduce-scatters in it, once; every other unit only accumulates. `on_issue(unit index)` is
        called for each unit turned on (the reduce-scatter itself runs in FSDP2's hooks). Under
        an outer `no_sync()` it is one more accumulating backward."""
        if not self.sync:
            yield
            return
        self._final.update(id(m) for mod in modules for m in mod.modules())
        now = [i for i, u in enumerate(self.units) if self._managed[id(u)]
               and id(u) not in self._reduced
               and all(id(m) in self._final for m, _, _ in self._managed[id(u)])]
        for i, u in enumerate(self.units):
            u.set_requires_gradient_sync(i in now, recurse=False)
        for i in now:
            self._reduced.add(id(self.units[i]))
            self._record("reduce_scatter", self.units[i])
            if on_issue is not None:
                on_issue(i)
        try:
            yield
        finally:
            for u in self.units:
                u.set_requires_gradient_sync(self.sync, recurse=False)

    @torch.no_grad()
    def finish(self) -> None:
        """After the step's last backward: make the gradient shards plain sums,
        bind the optimizer's pieces."""
        if self._final:  # a pipeline step: every unit must have been made final once
            left = [i for i, u in enumerate(self.units)
                    if self._managed[id(u)] and id(u) not in self._reduced]
            if left:
                raise RuntimeError(f"ZeRO-3 units {left} hold parameters outside every module "
                                   "given to final_backward: their gradients were never reduced")
        self._final, self._reduced = set(), set()
        if not self.exact_sum:
            for p in self.params:
                if p.grad is not None:
                    _local(p.grad).mul_(self.n)
        grads = [_local(p.grad) for p in self.tp_summed if p.grad is not None]
        if grads and self.mesh.tp_size > 1:
            _all_reduce_into(grads, self.mesh.comm, self.mesh.tp)
        if self.rep is not None:  # HSDP: the same shard of every replica, one coalesced all-reduce
            _all_reduce_into([_local(p.grad) for p in self.params if p.grad is not None],
                             self.mesh.comm, self.rep)
        if self.optimizer is not None:
            bind_pieces(self.optimizer)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.optimizer is not None:
            for pc in self.optimizer.pieces:
                pc.leaf.grad = None

    # -- full state ------------------------------------------------------------------------
    @torch.no_grad()
    def state_gatherer(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sharded state dict -> full tensors: one all-gather over mesh.dp per sharded tensor,
        in key order."""
        out = {}
        for k, v in sd.items():
            if not _is_dtensor(v):
                out[k] = v
                continue
            local = v.to_local()
            d0 = v.shape[0]
            c = math.ceil(d0 / self.n)
            chunk = local.new_zeros((c, *v.shape[1:]))
            chunk[: local.shape[0]] = local
            full = local.new_empty((c * self.n, *v.shape[1:]))
            self.mesh.comm.all_gather(full, chunk, self.mesh.dp)
            out[k] = full[:d0].clone()
        return out


def _all_reduce_into(grads: list[torch.Tensor], comm, group: Group) -> None:
    """SUM-all-reduce `grads` over `group` as one flat tensor, in place."""
    if not grads or group.size == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group)
    off = 0
    for g in grads:
        g.copy_(flat[off: off + g.numel()].view_as(g))
        off += g.numel()


def bind_pieces(zo: ZeroOptimizer) -> None:
    """Point each leaf at its parameter's current local shard and gradient
    (FSDP2 may reallocate both)."""
    for pc in zo.pieces:
        p = zo.full_params[pc.slot]
        pc.leaf.data = _local(p.detach()).reshape(-1)
        pc.leaf.grad = None if p.grad is None else _local(p.grad).reshape(-1)


def shard_fsdp(optimizer: torch.optim.Optimizer, engine: FullyShardedDP,
               mesh: Mesh) -> ZeroOptimizer:
    """Wrap an optimizer built over the FSDP2 (DTensor) parameters so it steps plain local shards.

    Each parameter is its own flat space of Nd·c·rest elements (c = ⌈d0/Nd⌉ rows, rest the other
    dimensions); rank r's piece is its c·rest-element chunk minus the padding rows.
    """
    n, r = mesh.dp_size, mesh.dp_index
    full = slots_of(optimizer)
    pieces, spans, chunks = [], {}, []
    for slot, p in enumerate(full):
        d0 = p.shape[0] if p.dim() else 1
        rest = p.numel() // max(d0, 1)
        c = math.ceil(d0 / n)
        local = _local(p.detach())
        spans[slot] = (slot, 0)
        chunks.append(c * rest)
        if local.numel():
            leaf = leaf_of(local.reshape(-1), p)
            pieces.append(Piece(slot, slot, r * c * rest, local.numel(), r * c * rest, leaf))
    zo = ZeroOptimizer(optimizer, pieces, spans, chunks, mesh, 3,
                       memory_sources=lambda: (list(full),
                                               [p.grad for p in full if p.grad is not None]))
    zo.padding = sum(padded_numel(p.shape, n) - p.numel() for p in full)
    engine.optimizer = zo
    return zo
