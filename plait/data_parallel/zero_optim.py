"""The ZeRO optimizer wrapper: a torch optimizer stepping only this rank's pieces of each parameter.

Shared by ZeRO-1/2 (pieces of flat gradient buckets, plait.data_parallel.zero) and ZeRO-3 (local
FSDP2 shards, plait.data_parallel.zero3). A piece is a 1-D leaf tensor sharing memory with the
parameter storage it updates; its `.grad` is the matching slice of the reduced gradient shard.

Communication contract: `step()` itself communicates nothing (the builder's `after_step` does);
LAMB / LARS's `ShardNormReducer` issues one all-reduce on mesh.dp per step; `full_state_dict()`
issues per state key one all-reduce (scalars) or one all-gather per flat space (per-element
state) on mesh.dp; every dp rank must call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from plait.data_parallel.zero_memory import optimizer_bytes, psi_of, storage_bytes
from plait.errors import ConfigError
from plait.mesh import Mesh
from plait.optim.layerwise import GroupNormReducer


@dataclass
class Piece:
    """This rank's part of one parameter: elements [param_start, param_start + length) of the
    flattened parameter, at [start, start + length) of flat space `space` (a bucket for ZeRO-1/2,
    the parameter's own padded space for ZeRO-3)."""

    # the parameter's index in the optimizer's parameter order (torch's state-dict numbering)
    slot: int
    space: int
    start: int
    length: int
    param_start: int
    leaf: nn.Parameter


def leaf_of(data: torch.Tensor, source: torch.Tensor) -> nn.Parameter:
    """A leaf sharing `data`'s memory, marked as a dp shard of `source`
    (its tp attributes copied)."""
    leaf = nn.Parameter(data, requires_grad=True)
    leaf.plait_dp_sharded = True
    if getattr(source, "plait_tp_replicated", False):
        leaf.plait_tp_replicated = True
    return leaf


def slots_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in order (torch numbers state-dict entries this way)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


class ZeroOptimizer:
    """A torch optimizer built over the full parameters, made to step only this rank's pieces.

    The optimizer's param groups are rebuilt over the leaves, one group per original group with
    the same options, so weight decay by group and learning-rate schedules act as before. Layer-
    wise optimizers (a group option `adapt`, plait's LAMB / LARS) see flat 1-D pieces: each group
    with adapt = None is split into an adapted part (pieces of ≥2-D parameters, adapt = True) and a
    plain part (1-D ones: adapt = False, weight_decay = 0), which is what adapt = None means for
    whole tensors; their `norm_reducer` becomes `ShardNormReducer`.

    `step()` steps the leaves, then runs `after_step` (ZeRO-1/2: the parameter all-gather).
    Checkpoints: `state_dict()` / `load_state_dict()` are this rank's shard (same layout only);
    `full_state_dict()` all-gathers it into torch's layout with full-shape tensors, and
    `load_full_state_dict()` takes that layout and keeps this rank's slice.

    `spans[slot] = (space, offset)`: where parameter `slot`'s first element sits in its flat space;
    `space_chunks[space]`: the chunk each rank owns of that space (its length is Nd times that).
    """

    dp_sharded = True  # gradients are pieces: ParallelOptimizer.grad_norm sums over dp too

    def __init__(self, optimizer: torch.optim.Optimizer, pieces: list[Piece],
                 spans: dict[int, tuple[int, int]], space_chunks: list[int], mesh: Mesh, stage: int,
                 after_step=None, memory_sources=None):
        if optimizer.state:
            raise ConfigError("parallel.zero > 0: the optimizer already has state; build it "
                              "before the first step (or pass a factory: lambda params: "
                              "AdamW(params, ...))")
        self.inner = optimizer
        self.full_params = slots_of(optimizer)
        self.group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        self.pieces = sorted(pieces, key=lambda pc: pc.slot)
        self.spans = spans
        self.space_chunks = space_chunks
        self.mesh = mesh
        self.stage = stage
        self.after_step = after_step
        # () -> (parameter tensors, gradient tensors) held by this rank, for
        # plait.data_parallel.zero_memory
        self.memory_sources = memory_sources
        # model-state bytes, measured at the end of the first step
        self.measured: dict | None = None
        for pc in self.pieces:
            pc.leaf.plait_zero_slot = pc.slot
        self._regroup()
        if hasattr(optimizer, "norm_reducer"):
            optimizer.norm_reducer = ShardNormReducer(mesh, self.full_params,
                                                      optimizer.norm_reducer)

    # -- param groups ----------------------------------------------------------------------
    def _regroup(self) -> None:
        leaf_of = {pc.slot: pc.leaf for pc in self.pieces}
        groups = []
        # per rebuilt group: (original group, "whole" | "matrix" | "vector")
        self.origin: list[tuple[int, str]] = []
        slot = 0
        for gi, g in enumerate(self.inner.param_groups):
            opts = {k: v for k, v in g.items() if k != "params"}
            slots = list(range(slot, slot + len(g["params"])))
            slot += len(g["params"])
            if "adapt" in opts and opts["adapt"] is None:
                parts = [("matrix", dict(opts, adapt=True),
                          [s for s in slots if self.full_params[s].dim() >= 2]),
                         ("vector", dict(opts, adapt=False, weight_decay=0.0),
                          [s for s in slots if self.full_params[s].dim() < 2])]
            else:
                parts = [("whole", opts, slots)]
            for part, o, ss in parts:
                groups.append({**o, "params": [leaf_of[s] for s in ss if s in leaf_of]})
                self.origin.append((gi, part))
        self.inner.param_groups = []
        for g in groups:  # every rank has the same groups, some possibly empty
            self.inner.add_param_group(g)

    def original_groups(self) -> list[dict]:
        """The original param groups' current options, with torch's slot numbering as "params"."""
        out, slot = [], 0
        for gi, n in enumerate(self.group_sizes):
            i, part = next((i, part) for i, (g, part) in enumerate(self.origin) if g == gi)
            opts = {k: v for k, v in self.inner.param_groups[i].items() if k != "params"}
            if part != "whole":
                opts["adapt"] = None  # the matrix part kept the group's weight decay
            out.append({**opts, "params": list(range(slot, slot + n))})
            slot += n
        return out

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self):
        return self.inner.defaults

    @property
    def params(self) -> list[nn.Parameter]:
        """The leaves this rank steps (what ParallelOptimizer clips)."""
        return [pc.leaf for pc in self.pieces]

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        if self.after_step is not None:
            self.after_step()
        if self.measured is None and self.memory_sources is not None:
            self.measured = self.measure_memory()
        return loss

    def measure_memory(self) -> dict:
        """Model-state bytes of this rank, now (called at the end of the first step);
        see zero_memory."""
        params, grads = self.memory_sources()
        elem, scalar = optimizer_bytes(self.inner.state)
        out = {"zero": self.stage, "dp": self.mesh.dp_size, "psi": psi_of(params),
               "padding": int(getattr(self, "padding", 0)),
               "owned": sum(pc.length for pc in self.pieces),
               "parameters": storage_bytes(params), "gradients": storage_bytes(grads),
               "optimizer_state": elem, "optimizer_scalars": scalar}
        out["model_state"] = out["parameters"] + out["gradients"] + out["optimizer_state"] + scalar
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for pc in self.pieces:
            if pc.leaf.grad is not None:
                pc.leaf.grad.zero_()

    # -- checkpoints -----------------------------------------------------------------------
    def _layout(self) -> list[tuple[int, int, int]]:
        return [(pc.slot, pc.param_start, pc.length) for pc in self.pieces]

    def state_dict(self) -> dict:
        """This rank's shard in torch's layout over the leaves, plus the layout it belongs to."""
        sd = self.inner.state_dict()
        sd["zero"] = {"stage": self.stage, "dp": self.mesh.dp_size, "dp_rank": self.mesh.dp_index,
                      "pieces": self._layout()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        sd = dict(sd)
        layout = sd.pop("zero", None)
        if layout is None or [tuple(x) for x in layout["pieces"]] != self._layout():
            raise ValueError("ZeRO optimizer state of another layout (parallel.dp, parallel.zero "
                             "or parallel.bucket_mb changed): save and load it with "
                             "full_state_dict() / load_full_state_dict()")
        self.inner.load_state_dict(sd)

    def _keys(self) -> list[tuple[str, bool]]:
        """(state key, per element?) of this rank's first stepped piece."""
        for pc in self.pieces:
            st = self.inner.state.get(pc.leaf)
            if st:
                return [(k, torch.is_tensor(v) and v.dim() > 0 and v.numel() == pc.length)
                        for k, v in st.items()]
        return []

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """torch's optimizer state-dict layout over the full parameters (collective over mesh.dp).

        Per-element state (Adam's moments, momentum) is all-gathered space by space, one all-gather
        per state key and space; scalar state (step counts) comes from the rank holding each
        parameter's first element (one all-reduce per key). Every dp rank must hold a piece.
        """
        comm, dp, n, r, dev = (self.mesh.comm, self.mesh.dp, self.mesh.dp_size, self.mesh.dp_index,
                               self.mesh.device)
        keys = self._keys()
        count = torch.tensor([len(keys)], device=dev)
        comm.all_reduce(count, dp, op="min")
        if int(count) != len(keys) or not keys:
            raise RuntimeError("full_state_dict(): some dp rank has no optimizer state (take a "
                               "step first; every dp rank must hold a piece of the model)")
        by_space: dict[int, list[Piece]] = {}
        for pc in self.pieces:
            by_space.setdefault(pc.space, []).append(pc)
        members: dict[int, list[tuple[int, int]]] = {}
        for slot, (space, off) in sorted(self.spans.items()):
            members.setdefault(space, []).append((slot, off))
        state: dict[int, dict] = {slot: {} for slot in sorted(self.spans)}
        for k, per_elem in keys:
            like = next(self.inner.state[pc.leaf][k] for pc in self.pieces
                        if pc.leaf in self.inner.state)
            if not per_elem:
                table = torch.zeros(len(self.full_params), dtype=torch.float64, device=dev)
                for pc in self.pieces:
                    if pc.param_start == 0:
                        table[pc.slot] = float(self.inner.state[pc.leaf][k])
                comm.all_reduce(table, dp)
                for slot in state:
                    v = table[slot]
                    state[slot][k] = (v.to(like.dtype).reshape(like.shape).to(like.device)
                                      if torch.is_tensor(like) else type(like)(v.item()))
                continue
            for space in sorted(members):
                s = self.space_chunks[space]
                chunk = torch.zeros(s, dtype=like.dtype, device=dev)
                for pc in by_space.get(space, ()):
                    chunk[pc.start - r * s: pc.start - r * s + pc.length] = \
                        self.inner.state[pc.leaf][k]
                full = torch.empty(s * n, dtype=like.dtype, device=dev)
                comm.all_gather(full, chunk, dp)
                for slot, off in members[space]:
                    p = self.full_params[slot]
                    state[slot][k] = full[off: off + p.numel()].view(p.shape).clone()
        return {"state": state, "param_groups": self.original_groups()}

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict) -> None:
        """Take torch's layout with full-shape tensors;
        keep this rank's slice (no communication)."""
        if len(sd["param_groups"]) != len(self.group_sizes):
            raise ValueError(f"optimizer state has {len(sd['param_groups'])} param groups, this "
                             f"optimizer {len(self.group_sizes)}")
        for g, (gi, part) in zip(self.inner.param_groups, self.origin):
            for k, v in sd["param_groups"][gi].items():
                if (k == "params" or (part != "whole" and k == "adapt")
                        or (part == "vector" and k == "weight_decay")):
                    continue
                g[k] = v
        self.inner.state.clear()
        for pc in self.pieces:
            full = sd["state"].get(pc.slot, sd["state"].get(str(pc.slot)))
            if full is None:
                continue
            p = self.full_params[pc.slot]
            st = {}
            for k, v in full.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.numel() == p.numel():
                    st[k] = (v.reshape(-1)[pc.param_start: pc.param_start + pc.length]
                             .to(pc.leaf.device).clone())
                else:
                    st[k] = v.clone() if torch.is_tensor(v) else v
            self.inner.state[pc.leaf] = st


class ShardNormReducer:
    """LAMB / LARS norm reducer for pieces: each parameter's squared norms summed over dp (one
    all-reduce of a (parameters × 2) table, rows by slot), then `inner` (tensor parallelism) on
    the full local parameters. Called once per step on every rank (a collective)."""

    def __init__(self, mesh: Mesh, full_params: list[torch.Tensor], inner=None):
        self.full_params = full_params
        self.inner = inner
        self.dp = GroupNormReducer(mesh.comm, mesh.dp, slot=lambda p: p.plait_zero_slot,
                                   n_slots=max(1, len(full_params)))

    def __call__(self, params: list[torch.Tensor], sq: torch.Tensor) -> torch.Tensor:
        out = self.dp(params, sq)
        if self.inner is not None:
            out = self.inner([self.full_params[p.plait_zero_slot] for p in params], out)
        return out
