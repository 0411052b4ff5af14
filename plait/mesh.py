"""The dp × pp × tp grid of ranks and its process groups.

    rank = (pp_index · dp + dp_index) · tp + tp_index

tp is innermost (neighbouring ranks, the same node, the chattiest dimension), pp outermost.
A `Mesh` is immutable and passed explicitly to whatever needs a group; plait keeps no
module-level process-group state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from plait.comm import Comm, Group, single
from plait.config.checks import check_layout, resolve_dp


def rank_of(dp_index: int, tp_index: int, pp_index: int, dp: int, tp: int) -> int:
    return (pp_index * dp + dp_index) * tp + tp_index


@dataclass(frozen=True)
class Mesh:
    """This rank's view of the dp × pp × tp grid.

    Groups: `dp` (same pp and tp index: gradient reduction, ZeRO sharding), `tp` (same pp and dp:
    tensor-parallel collectives), `pp` (same dp and tp: stage-to-stage p2p), `mp` (same dp index:
    every model-parallel rank holding one replica, for norms that span the whole model), `world`.
    """

    dp_size: int
    tp_size: int
    pp_size: int
    rank: int
    dp: Group
    tp: Group
    pp: Group
    mp: Group
    world: Group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm: Comm = field(default_factory=Comm, compare=False)

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size * self.pp_size

    @property
    def dp_index(self) -> int:
        return self.dp.rank

    @property
    def tp_index(self) -> int:
        return self.tp.rank

    @property
    def pp_index(self) -> int:
        return self.pp.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp_size - 1

    def __repr__(self) -> str:
        return (f"Mesh(dp={self.dp_size}, tp={self.tp_size}, pp={self.pp_size}, rank={self.rank}, "
                f"coords=(dp {self.dp_index}, tp {self.tp_index}, pp {self.pp_index}), "
                f"device={self.device})")

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def single(device: torch.device | str = "cpu") -> Mesh:
        """The 1 × 1 × 1 mesh of a single process; no process group needed."""
        g = {n: single(n) for n in ("dp", "tp", "pp", "mp", "world")}
        return Mesh(1, 1, 1, 0, g["dp"], g["tp"], g["pp"], g["mp"], g["world"],
                    torch.device(device), Comm(0))

    @staticmethod
    def build(dp: int = 0, tp: int = 1, pp: int = 1,
              device: torch.device | str | None = None) -> Mesh:
        """Build the mesh over the initialized default process group
        (collective: every rank calls it)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        dp = resolve_dp(world, dp, tp, pp)
        check_layout(world, dp, tp, pp)
        device = torch.device(device) if device is not None else default_device()
        if world == 1:
            return Mesh.single(device)

        def make(name: str, members: list[list[int]]) -> Group:
            mine = None
            for ranks in members:  # every rank creates every group, in the same order
                pg = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    mine = Group(name, tuple(ranks), ranks.index(rank), pg)
            assert mine is not None
            return mine

        r = rank_of
        dp_g = make("dp",
                    [[r(d, t, p, dp, tp) for d in range(dp)] for p in range(pp) for t in range(tp)])
        tp_g = make("tp",
                    [[r(d, t, p, dp, tp) for t in range(tp)] for p in range(pp) for d in range(dp)])
        pp_g = make("pp",
                    [[r(d, t, p, dp, tp) for p in range(pp)] for d in range(dp) for t in range(tp)])
        mp_g = make("mp",
                    [sorted(r(d, t, p, dp, tp) for p in range(pp) for t in range(tp))
                     for d in range(dp)])
        world_g = Group("world", tuple(range(world)), rank, dist.group.WORLD)
        return Mesh(dp, tp, pp, rank, dp_g, tp_g, pp_g, mp_g, world_g, device, Comm(rank))

    @staticmethod
    def from_env(dp: int = 0, tp: int = 1, pp: int = 1, backend: str | None = None,
                 timeout_s: float = 600.0, device: torch.device | str | None = None) -> Mesh:
        """Initialize torch.distributed from the launcher's environment (torchrun) and build the
        mesh.

        The layout is checked against WORLD_SIZE before the process group is created, so a wrong
        layout fails on every rank with the same message and no rank waits for a collective.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dp = resolve_dp(world, dp, tp, pp)
        check_layout(world, dp, tp, pp)
        if device is None:
            device = default_device()
        if world > 1 and not dist.is_initialized():
            backend = backend or default_backend(torch.device(device))
            kwargs = {}
            if torch.device(device).type == "cuda" and backend == "nccl":
                kwargs["device_id"] = torch.device(device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    **kwargs)
        return Mesh.build(dp, tp, pp, device)

    def destroy(self) -> None:
        """Destroy the process groups (every rank, at the end of a run; a one-rank mesh has
        none)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def to_device_mesh(self):
        """The equivalent torch DeviceMesh with dims ('pp', 'dp', 'tp')
        (for FSDP2, DTensor, DCP)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.pp_size, self.dp_size, self.tp_size),
                                mesh_dim_names=("pp", "dp", "tp"))


def default_device() -> torch.device:
    """The local GPU when CUDA is present (LOCAL_RANK picks which), else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    """NCCL for one rank per GPU, gloo otherwise (CPU, or several ranks sharing one GPU)."""
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world <= torch.cuda.device_count():
            return "nccl"
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"plait: {local_world} local ranks share {torch.cuda.device_count()} GPU(s): "
                  f"NCCL refuses that, so the ranks talk over gloo (CUDA tensors stay on the GPU)",
                  flush=True)
    return "gloo"
