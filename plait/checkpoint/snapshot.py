"""A run's state objects as one DCP state dict (`collect`), and back (`restore`). Key layout:
plait.checkpoint.state.

The state objects (`Parts`): the parallel model and optimizer, the loop's TrainState (step,
samples, skipped steps) and any extras with `state_dict()` / `load_state_dict()` (the gradient
noise scale's running estimate). Nothing here knows the training loop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plait.checkpoint.state import (
    DIVERGENT,
    Shards,
    _scatter_dp,
    check_entries,
    compressor_of,
    flatten,
    load_optimizer_state,
    named_params,
    optimizer_slots,
    optimizer_state,
    raise_agreed,
    rng_state,
    scalars_into,
    set_rng_state,
    settle,
    template,
    unflatten,
)
from plait.checkpoint.store import CheckpointError

# DCP warns on every single-process save and load (also from an asynchronous save's thread) that it
# runs single-process; a one-rank run does so on purpose
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable",
                        category=UserWarning)


def single_process() -> bool:
    """No process group (one rank): DCP then reads and writes without coordinating."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())




@dataclass
class Parts:
    """What a checkpoint holds, as objects: saved by `collect`, loaded in place by `restore`."""

    model: object  # a ParallelModel
    optimizer: object  # a ParallelOptimizer
    state: object  # a TrainState
    mesh: object
    strategy: str = "every_step"  # sync.strategy: diverging replicas save per replica
    extras: dict = field(default_factory=dict)  # name -> object with state_dict / load_state_dict


def replica_prefix(strategy: str, mesh) -> str:
    """Per-replica keys of a strategy whose replicas drift apart: the dp ranks, or with
    parallel.replicas > 1 the replicas of the layout (dense dp inside each)."""
    if strategy not in DIVERGENT:
        return ""
    return f"replica{mesh.replica_index if mesh.replicas > 1 else mesh.dp_index}/"


def _names(module: torch.nn.Module) -> dict[int, str]:
    # each parameter once, under its first name (a tied copy under the first stage's)
    return {id(p): n for n, p in named_params(module).items()}


def collect(tr: Parts, shards: Shards, copy: bool = False) -> dict:
    """Everything needed to continue `tr` exactly,
    as a flat state dict for dcp.save (every rank calls it).

    `copy`: clone tensors (an asynchronous save writes while training goes on). ZeRO optimizers
    gather their state over mesh.dp here (a collective); nothing else communicates.
    """
    mesh = tr.mesh
    keep = (lambda t: t.detach().clone()) if copy else (lambda t: t)
    pre = replica_prefix(tr.strategy, mesh)
    sd: dict = {}
    entries = shards.entries(tr.model.module)
    for e in entries:
        sd[f"{pre}model/{e.name}"] = shards.wrap(keep(e.tensor), e)
    by_name = {e.name: e for e in entries}
    names = _names(tr.model.module)
    opt = tr.optimizer.optimizer
    slots = optimizer_slots(opt)
    for slot, st in optimizer_state(opt)["state"].items():
        p = slots[int(slot)]
        name = names[id(p)]
        for k, v in st.items():
            key = f"{pre}optim/{name}/{k}"
            # one value per element
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                e = by_name[name]
                sd[key] = shards.wrap(keep(v), e)
            else:
                sd[key] = keep(v) if torch.is_tensor(v) else v
    for k, v in tr.state.state_dict().items():
        sd[f"trainer/{k}"] = v
    # e.g. the gradient noise scale's running estimate (a metric)
    for name, obj in tr.extras.items():
        flatten(f"trainer/{name}", obj.state_dict(), sd)
    scaler = getattr(tr.optimizer, "scaler", None)
    if scaler is not None:  # fp16: the loss scale and its schedule
        flatten("trainer/loss_scale", scaler.state_dict(), sd)
    own = f"rank{mesh.rank}"
    flatten(f"{own}/rng", rng_state(mesh.device), sd)
    comp = compressor_of(tr.model, tr.optimizer)
    if comp is not None:
        flatten(f"{own}/compressor", comp.state_dict(), sd)
    if tr.optimizer.sync is not None:
        flatten(f"{own}/sync", tr.optimizer.sync.state_dict(), sd)
    return sd


def read_index(path: Path):
    """DCP's index of a checkpoint folder (keys, shapes);
    CheckpointError naming the file when unreadable."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged index can fail in many ways (pickle, I/O)
        raise CheckpointError(f"checkpoint file {str(Path(path) / '.metadata')!r} cannot be read "
                              f"({type(e).__name__}: {e}): the checkpoint is damaged") from e


def load_model(tr: Parts, shards: Shards, path: Path, prefix: str = "") -> None:
    """Load only the model's tensors from a checkpoint folder into `tr`, in place,
    in any layout (collective)."""
    import torch.distributed.checkpoint as dcp

    index = read_index(path)
    entries = shards.entries(tr.model.module)
    raise_agreed(check_entries(entries, index, prefix, f"checkpoint {path}"), tr.mesh,
                 "checkpoint does not fit")
    tmpl = {f"{prefix}model/{e.name}": shards.wrap(e.tensor, e) for e in entries}
    dcp.load(tmpl, checkpoint_id=str(path), no_dist=single_process())
    for obj in tmpl.values():
        settle(obj)
    params = named_params(tr.model.module)
    for e in entries:
        if e.name in params:
            _scatter_dp(params[e.name], e.tensor, tr.mesh)


def restore(tr: Parts, shards: Shards, path: Path, manifest: dict, same_layout: bool,
            with_optimizer: bool) -> dict:
    """Load a checkpoint into `tr` (collective over every rank). Returns what was restored.

    Model and optimizer state load under any layout; per-rank state (RNG, compression residuals,
    sync-strategy state) only when `same_layout`, else the compressor keeps only its counters.
    """
    import torch.distributed.checkpoint as dcp

    mesh = tr.mesh
    pre = replica_prefix(manifest["layout"]["sync"], mesh)
    index = read_index(path)
    entries = shards.entries(tr.model.module)
    raise_agreed(check_entries(entries, index, pre, f"checkpoint {path}"), mesh,
                 "checkpoint does not fit this model")
    # loaded in place
    tmpl = {f"{pre}model/{e.name}": shards.wrap(e.tensor, e) for e in entries}
    by_name = {e.name: e for e in entries}
    shapes = {e.name: e.global_shape for e in entries}
    opt = tr.optimizer.optimizer
    slots = optimizer_slots(opt)
    names = _names(tr.model.module)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # slot -> state key -> the tensor DCP fills (or the key of a loaded object)
    pending: dict[int, dict] = {}
    if with_optimizer:
        for slot, p in enumerate(slots):
            name = names[id(p)]
            base = f"{pre}optim/{name}/"
            st = {}
            for key, md in index.state_dict_metadata.items():
                if not key.startswith(base) or "/" in key[len(base):]:
                    continue
                k = key[len(base):]
                if (isinstance(md, TensorStorageMetadata) and tuple(md.size) == shapes[name]
                        and len(md.size) > 0):
                    # p.shape: the tp-local shape (for ZeRO-3 DTensors the shape gathered over dp)
                    local = torch.zeros(tuple(p.shape), dtype=md.properties.dtype,
                                        device=mesh.device)
                    e = by_name[name]
                    tmpl[key] = shards.wrap(local, e)
                    st[k] = local
                else:  # a step count or another small value: loaded as saved
                    tmpl[key] = (torch.empty(md.size, dtype=md.properties.dtype)
                                 if isinstance(md, TensorStorageMetadata) else None)
                    st[k] = key
            if st:
                pending[slot] = st
    tmpl.update(template(index, "trainer"))
    own = f"rank{mesh.rank}"
    if same_layout:
        tmpl.update(template(index, own))
    else:
        tmpl.update(template(index, "rank0/compressor", tensors=False))
    dcp.load(tmpl, checkpoint_id=str(path), no_dist=single_process())
    for obj in tmpl.values():
        settle(obj)

    params = named_params(tr.model.module)
    for e in entries:
        if e.name in params:
            _scatter_dp(params[e.name], e.tensor, mesh)
    out = {"optimizer": with_optimizer, "rank_state": same_layout}
    if with_optimizer:
        state = {slot: {k: (tmpl[v] if isinstance(v, str) else v) for k, v in st.items()}
                 for slot, st in pending.items()}
        load_optimizer_state(opt, state)
    # the step (the learning-rate schedule follows from it), the data position, the skipped steps
    tr.state.load_state_dict({k: tmpl.get(f"trainer/{k}") for k in tr.state.state_dict()})
    for name, obj in tr.extras.items():
        saved = unflatten(tmpl, f"trainer/{name}")
        if saved:
            obj.load_state_dict(saved)
    scale, scaler = unflatten(tmpl, "trainer/loss_scale"), getattr(tr.optimizer, "scaler", None)
    if scale and scaler is not None:
        scaler.load_state_dict(scale)
    comp = compressor_of(tr.model, tr.optimizer)
    if same_layout:
        if any(k.startswith(f"{own}/rng/") for k in tmpl):
            set_rng_state(unflatten(tmpl, f"{own}/rng"), mesh.device)
        if comp is not None and any(k.startswith(f"{own}/compressor") for k in tmpl):
            comp.load_state_dict(_move(unflatten(tmpl, f"{own}/compressor"), mesh.device))
        if tr.optimizer.sync is not None and any(k.startswith(f"{own}/sync") for k in tmpl):
            tr.optimizer.sync.load_state_dict(_move(unflatten(tmpl, f"{own}/sync"), mesh.device))
    elif (comp is not None and "rank0/compressor/name" in tmpl
            and tmpl["rank0/compressor/name"] == comp.name):
        comp.load_state_dict(scalars_into(comp.state_dict(), unflatten(tmpl, "rank0/compressor")))
    return out


def _move(obj, device: torch.device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj
