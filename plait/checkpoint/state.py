"""What a checkpoint holds, as one flat torch.distributed.checkpoint (DCP) state dict,
and how it comes back.

Keys (flat; "/" separates levels, parameter names keep their dots):

    model/<name>              each parameter under its original model name (kept by pipeline stages)
    optim/<name>/<state key>  per-parameter optimizer state (Adam's moments, momentum, step counts)
    trainer/<field>           step, samples, skipped steps, noise-scale estimate, fp16 loss scale
    rank<R>/rng/...           rank R's RNG states                      } layout-dependent: restored
    rank<R>/compressor/...    its error-feedback residuals, PowerSGD Q } only under the same layout
    rank<R>/sync/...          its sync strategy's state (DiLoCo's outer state, exchanges in flight)

Resharding. A tensor-parallel shard is saved as a DTensor on a 1-D DeviceMesh over `mesh.tp`
with placement Shard(dim) and the unpadded full shape as global shape: DTensor's chunks (ceil
division, the last one short) are exactly plait's padded layout with the padding rows dropped, so
DCP stores each shard once, as chunks of the full tensor, and a load under any tp size reads the
overlapping chunks into each rank's shard, in place. A shard of packed blocks (a fused q | k | v
split per block, `plait_tp_parts`) is several ranges of the full tensor, one per block: it is
saved as a ShardedTensor with one local shard per range (DCP reads and writes each range as a
chunk of the full tensor, so such a checkpoint too reshards to any tp, and a tp = 1 run holds the
whole tensor under the same key). A key/value head replicated over several tp ranks (tp above the
number of kv heads) is the same range on each holder: written once, read by each. Replicated
tensors are plain tensors: every dp (and tp) replica offers the same key and DCP writes it once.
Pipeline stages hold disjoint keys.
Optimizer state goes through the same path per parameter: an optimizer that shards its own state
(ZeRO) offers `full_state_dict()` / `load_full_state_dict()` in torch's layout over the full
(tp-local) parameters and is used through them; a plain torch optimizer through its state dict.

Sync strategies whose replicas drift apart between syncs (local SGD, DiLoCo, streaming DiLoCo)
save model and optimizer state per replica, under `replica<d>/` (d: the dp index, or the replica
index when parallel.replicas > 1, whose dp ranks hold the same state), and resume only under the
same layout. Every other run reshards between layouts, `parallel.replicas` included: replicas hold
the same model and optimizer state, offered under the same keys and written once.
DCP's own planning traffic (a few small gathers over the default group) bypasses
plait.comm: it is not training traffic and is not counted.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from plait.checkpoint.store import CheckpointError

DIVERGENT = ("local_sgd", "diloco", "streaming_diloco")  # replicas differ between syncs
# DCP warns on each ShardedTensor it plans; a shard of packed blocks is one on purpose (a DTensor
# holds one range per rank)
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating "
                        "ShardedTensor", category=FutureWarning)


def layout_of(cfg, mesh) -> dict:
    """Everything that decides which rank holds what:
    per-rank state is restored only when it matches."""
    p = cfg.parallel
    compression = "onebit_adam" if cfg.optim.name == "onebit_adam" else cfg.compression.name
    return {"world_size": mesh.world_size, "replicas": mesh.replicas, "dp": mesh.dp_size,
            "tp": mesh.tp_size, "pp": mesh.pp_size, "zero": p.zero,
            "virtual_stages": p.virtual_stages, "bucket_mb": p.bucket_mb,
            "compression": compression, "sync": cfg.sync.strategy}


# -- flat keys ----------------------------------------------------------------------------------
EMPTY = "<plait: empty dict>"  # DCP drops empty dicts while flattening; this leaf keeps their key


def flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            flatten(f"{prefix}/{k}", v, out)
        if not obj:
            out[prefix] = EMPTY
    else:
        out[prefix] = obj
    return out


def unflatten(flat: dict, prefix: str) -> dict:
    out: dict = {}
    for key, v in flat.items():
        if not key.startswith(prefix + "/"):
            continue
        *path, leaf = key[len(prefix) + 1:].split("/")
        d = out
        for part in path:
            d = d.setdefault(part, {})
        d[leaf] = {} if isinstance(v, str) and v == EMPTY else v
    return out


def template(metadata, prefix: str, tensors: bool = True) -> dict:
    """Empty containers for every saved key under `prefix` (DCP loads into what it is given)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix + "/"):
            if isinstance(md, TensorStorageMetadata):
                if tensors:
                    out[key] = torch.empty(md.size, dtype=md.properties.dtype)
            else:
                out[key] = None
    return out


# -- tensor-parallel shards as DTensors -----------------------------------------------------------
@dataclass
class Entry:
    """One model tensor: its name, the tensor this rank holds, its tp split (dim, unpadded size)
    or None, and the full sizes of its packed blocks along that dim (None: one contiguous split)."""

    name: str
    tensor: torch.Tensor
    split: tuple[int, int] | None
    parts: tuple[int, ...] | None = None
    # per packed block, its whole key/value heads when fewer than tp ranks hold them (replicated)
    groups: tuple[int | None, ...] | None = None

    @property
    def global_shape(self) -> tuple[int, ...]:
        shape = list(self.tensor.shape)
        if self.split is not None:
            shape[self.split[0]] = self.split[1]
        return tuple(shape)

    def pieces(self, tp_index: int, tp_size: int) -> list[tuple[int, int, int]]:
        """This rank's ranges of the full tensor along the split dim (see `pieces`)."""
        return pieces(self.split, self.parts, self.tensor.shape[self.split[0]], tp_index, tp_size,
                      self.groups)


def pieces(split: tuple[int, int], parts: tuple[int, ...] | None, local: int, tp_index: int,
           tp_size: int, groups: tuple[int | None, ...] | None = None
           ) -> list[tuple[int, int, int]]:
    """(offset in the local tensor, offset in the full tensor, length) of each range of the full
    tensor a tp rank holds along the split dim, `local` long there: one range of a contiguous split
    (none on a rank holding only padding), else its 1/tp of each packed block in turn; a block of
    g < tp whole key/value heads (`groups`), its kv head's 1/g (plait.tensor_parallel.layers)."""
    _, full = split
    if parts is None:
        lo = tp_index * local
        n = max(0, min(local, full - lo))
        return [(0, lo, n)] if n else []
    out, at_local, at_full = [], 0, 0
    for block, g in zip(parts, groups or (None,) * len(parts)):
        k = tp_size // g if g and g < tp_size else 1  # ranks holding the same piece
        c = block * k // tp_size
        out.append((at_local, at_full + tp_index // k * c, c))
        at_local, at_full = at_local + c, at_full + block
    return out


class Shards:
    """Wraps this rank's tensors for DCP. No communication
    (the DeviceMesh reuses mesh.tp's group)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._dm = None

    @property
    def dm(self):
        """The 1-D DeviceMesh over mesh.tp (made on first use: runs that never save never touch
        DTensor)."""
        if self._dm is None and self.mesh.tp_size > 1:
            from torch.distributed.device_mesh import DeviceMesh

            self._dm = DeviceMesh.from_group(self.mesh.tp.pg, self.mesh.device.type)
        return self._dm

    def entries(self, module: torch.nn.Module) -> list[Entry]:
        return self.local_entries(module, self.mesh)

    @staticmethod
    def local_entries(module: torch.nn.Module, mesh) -> list[Entry]:
        """Parameters (each once, under its first name) and persistent buffers of `module`."""
        out, seen = [], set()
        for name, p in module.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                split = getattr(p, "plait_tp_shard", None) if mesh.tp_size > 1 else None
                parts = getattr(p, "plait_tp_parts", None) if split is not None else None
                groups = getattr(p, "plait_tp_groups", None) if parts is not None else None
                out.append(Entry(checkpoint_name(name, p), _dp_full(p, mesh), split, parts,
                                 groups))
        keys = set(module.state_dict().keys())
        out += [Entry(n, b, None) for n, b in module.named_buffers() if n in keys]
        return out

    def wrap(self, local: torch.Tensor, e: Entry):
        """`local` (this rank's padded chunk of `e`'s tensor, or a same-shaped optimizer state) as
        a DTensor of the unpadded full tensor, or for packed blocks a ShardedTensor of its ranges;
        `local` itself if whole. After a load into the result, `settle` it (a ShardedTensor may
        hold copies of `local`'s ranges)."""
        if e.split is None or self.mesh.tp_size == 1:
            return local
        if e.parts is not None:
            return self._ranges(local, e)
        from torch.distributed.tensor import DTensor, Shard

        dim, full = e.split
        c = local.shape[dim]
        # rows of real data: the last chunk may be short
        n = max(0, min(c, full - self.mesh.tp_index * c))
        shape = list(local.shape)
        shape[dim] = full
        stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        return DTensor.from_local(local.narrow(dim, 0, n), self.dm, [Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=tuple(stride))

    def _ranges(self, local: torch.Tensor, e: Entry):
        """A ShardedTensor of the full tensor whose local shards are this rank's ranges of
        `local` (views where contiguous, else copies, written back by `settle`).

        Its metadata covers the full tensor, each range once: a range several ranks hold (a
        replicated kv head) is listed under its first holder, except on the holders, which list
        it as their own: each offers it (the save writes one copy), each reads it back."""
        import torch.distributed._shard.sharded_tensor as sht
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

        dim, full = e.split
        mesh = self.mesh
        shape = list(local.shape)
        shape[dim] = full
        held = partial(pieces, e.split, e.parts, local.shape[dim], tp_size=mesh.tp_size,
                       groups=e.groups)
        owner: dict[tuple[int, int], int] = {}  # (offset in the full tensor, length) -> tp rank
        for j in range(mesh.tp_size):
            for _, at_full, n in held(j):
                owner.setdefault((at_full, n), j)
        mine_at = {}
        for at_local, at_full, n in held(mesh.tp_index):
            owner[at_full, n], mine_at[at_full, n] = mesh.tp_index, at_local
        metas, mine, copies = [], [], []
        for (at_full, n), j in sorted(owner.items()):
            offsets, sizes = [0] * len(shape), list(shape)
            offsets[dim], sizes[dim] = at_full, n
            md = ShardMetadata(offsets, sizes, f"rank:{mesh.tp.ranks[j]}/{local.device}")
            metas.append(md)
            if j == mesh.tp_index:
                view = local.detach().narrow(dim, mine_at[at_full, n], n)
                t = view if view.is_contiguous() else view.contiguous()
                if t is not view:
                    copies.append((view, t))
                mine.append(sht.Shard(t, md))
        props = TensorProperties(dtype=local.dtype, requires_grad=False)
        st = sht.ShardedTensor._init_from_local_shards_and_global_metadata(
            mine, sht.ShardedTensorMetadata(metas, torch.Size(shape), props))
        st.plait_copies = copies
        return st


def settle(obj) -> None:
    """After a load into `Shards.wrap`'s result: copy ranges held as copies back into place."""
    for view, t in getattr(obj, "plait_copies", ()):
        view.copy_(t)


def checkpoint_name(name: str, p: torch.Tensor) -> str:
    """The name a parameter is saved under: its own, but a weight tied across the pipeline (an
    embedding and the head's copy of it on the last stage, plait.pipeline.tied) is one tensor,
    saved once under the first stage's name, as a one-stage model saves it, and loaded into both
    copies (optimizer state too)."""
    return getattr(p, "plait_tied", None) or name


def named_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter of `module` once, under its checkpoint name."""
    return {checkpoint_name(n, p): p for n, p in module.named_parameters()}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _dp_full(p: torch.Tensor, mesh) -> torch.Tensor:
    """A parameter as this rank's tp-local tensor: ZeRO-3 shards it over dp too (a DTensor),
    gathered here (an all-gather on mesh.dp);
    otherwise the tensor itself (loads write into it in place)."""
    if not _is_dtensor(p):
        return p.detach()
    local = p.to_local().detach()
    d0, n = p.shape[0], mesh.dp_size
    c = math.ceil(d0 / n)
    chunk = local.new_zeros((c, *p.shape[1:]))
    chunk[: local.shape[0]] = local
    full = local.new_empty((c * n, *p.shape[1:]))
    mesh.comm.all_gather(full, chunk, mesh.dp)
    return full[:d0].clone()


def _scatter_dp(p: torch.Tensor, full: torch.Tensor, mesh) -> None:
    """Copy this rank's dp rows of `full` into a ZeRO-3 parameter's local shard
    (no communication)."""
    if not _is_dtensor(p):
        return
    local = p.to_local()
    c = math.ceil(p.shape[0] / mesh.dp_size)
    with torch.no_grad():
        local.copy_(full[mesh.dp_index * c: mesh.dp_index * c + local.shape[0]])


# -- the optimizer, per parameter ------------------------------------------------------------------
def optimizer_slots(opt) -> list[torch.Tensor]:
    """The parameters in the optimizer's state-dict numbering
    (a sharding wrapper names its full ones)."""
    full = getattr(opt, "full_params", None)
    return list(full) if full is not None else [p for g in opt.param_groups for p in g["params"]]


def optimizer_state(opt) -> dict:
    """torch's layout {"state": {slot: {key: value}}, "param_groups": ...} over full (tp-local)
    parameters."""
    return opt.full_state_dict() if hasattr(opt, "full_state_dict") else opt.state_dict()


def load_optimizer_state(opt, state: dict) -> None:
    groups = (opt.original_groups() if hasattr(opt, "original_groups")
              else opt.state_dict()["param_groups"])
    sd = {"state": state, "param_groups": groups}
    if hasattr(opt, "load_full_state_dict"):
        opt.load_full_state_dict(sd)
    else:
        opt.load_state_dict(sd)


# -- per-rank state --------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": np.random.get_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def compressor_of(model, popt):
    """The dp exchange's compressor (its residuals are per rank), or None."""
    reducer = getattr(model, "reducer", None)
    comp = getattr(reducer, "compressor", None) if reducer is not None else None
    return comp if comp is not None else getattr(popt.optimizer, "dp_exchange", None)


def scalars_into(fresh: dict, saved: dict) -> dict:
    """`fresh` (a state dict) with every non-tensor value found in `saved` taken from it: the
    counters of a compressor without its per-layout buffers."""
    flat = flatten("s", fresh, {})
    for k, v in flatten("s", saved, {}).items():
        if not torch.is_tensor(v) and k in flat:
            flat[k] = v
    return unflatten(flat, "s")


def check_entries(entries: list[Entry], metadata, prefix: str, where: str) -> list[str]:
    """What does not match between this rank's model tensors and the checkpoint's index."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    problems = []
    md = metadata.state_dict_metadata
    for e in entries:
        key = f"{prefix}model/{e.name}"
        got = md.get(key)
        if not isinstance(got, TensorStorageMetadata):
            problems.append(f"{where} has no tensor {e.name!r} (this model has one of shape "
                            f"{list(e.global_shape)})")
        elif tuple(got.size) != e.global_shape:
            problems.append(f"{where}: {e.name} has shape {list(got.size)} there, "
                            f"{list(e.global_shape)} in this model")
    return problems


def raise_agreed(problems: list[str], mesh, what: str) -> None:
    """Raise on every rank when any rank found problems (one all-reduce over the world)."""
    flags = torch.zeros(mesh.world_size, device=mesh.device)
    flags[mesh.rank] = float(bool(problems))
    mesh.comm.all_reduce(flags, mesh.world)
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if not bad:
        return
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{what}: " + "; ".join(problems[:3]) + more)
    raise CheckpointError(f"{what}: rank(s) {bad} found a mismatch (see their error)")
