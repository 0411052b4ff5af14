"""The replicas × pp × dp × tp grid of ranks and its process groups.

    rank = ((replica · pp + pp_index) · dp + dp_index) · tp + tp_index

tp is innermost (neighbouring ranks, the same node, the chattiest dimension), then dp, then pp;
replicas (`parallel.replicas`, default 1) outermost: with several nodes, each replica is an
"island" of whole nodes, and only the replica dimension (`rep`) crosses the slow link between
them (docs/multinode.md, "Hierarchical layouts"). A `Mesh` is immutable and passed explicitly to
whatever needs a group; plait keeps no module-level process-group state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from plait.comm import Comm, Group, single
from plait.config.checks import check_layout, resolve_dp


def rank_of(dp_index: int, tp_index: int, pp_index: int, dp: int, tp: int,
            replica: int = 0, pp: int = 1) -> int:
    """The global rank at these coordinates (`pp` is needed only when `replica` > 0)."""
    return ((replica * pp + pp_index) * dp + dp_index) * tp + tp_index


def group_members(replicas: int, dp: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every group of each dimension as lists of global ranks, in the order every rank creates them
    (a pure function; replicas = 1 gives the plain dp × pp × tp mesh's groups in its order)."""
    R = range(replicas)

    def r(d: int, t: int, p: int, i: int) -> int:
        return rank_of(d, t, p, dp, tp, i, pp)

    size = dp * tp * pp  # ranks per replica
    return {
        "dp": [[r(d, t, p, i) for d in range(dp)] for i in R for p in range(pp) for t in range(tp)],
        "tp": [[r(d, t, p, i) for t in range(tp)] for i in R for p in range(pp) for d in range(dp)],
        "pp": [[r(d, t, p, i) for p in range(pp)] for i in R for d in range(dp) for t in range(tp)],
        "mp": [sorted(r(d, t, p, i) for p in range(pp) for t in range(tp))
               for i in R for d in range(dp)],
        "rep": [[r(d, t, p, i) for i in R]
                for p in range(pp) for d in range(dp) for t in range(tp)],
        "replica_world": [list(range(i * size, (i + 1) * size)) for i in R],
        # the first and the last pipeline stage (a tied embedding's two copies); one rank at pp = 1
        "emb": [sorted({r(d, t, 0, i), r(d, t, pp - 1, i)})
                for i in R for d in range(dp) for t in range(tp)],
    }


@dataclass(frozen=True)
class Mesh:
    """This rank's view of the replicas × pp × dp × tp grid.

    Groups, all but the last two inside one replica: `dp` (same replica, pp and tp index: gradient
    reduction, ZeRO sharding), `tp` (same replica, pp and dp: tensor-parallel collectives), `pp`
    (same replica, dp and tp: stage-to-stage p2p), `mp` (same replica and dp index: every
    model-parallel rank holding one copy of the model, for norms that span the whole model),
    `replica_world` (every rank of this replica: the whole model once, e.g. the gradient norm
    when ZeRO shards gradients over dp; the world itself when replicas = 1), `rep` (same pp, dp
    and tp index across the replicas: the exchange that crosses nodes), `emb` (same replica, dp
    and tp index, the first and the last pipeline stage: the gradient sum of an embedding tied to
    the output head, plait.pipeline.tied; this rank alone when pp = 1 or it holds neither end),
    `world` (every rank: the training loop's per-step agreement).

    Data: each (replica, dp index) reads its own share of the global batch: `data_size` =
    replicas · dp ranks, this one at `data_index` = replica · dp + dp_index.
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
    replicas: int = 1
    rep: Group | None = None  # None: the group of this rank alone (replicas = 1)
    replica_world: Group | None = None  # None: `world` (replicas = 1)
    emb: Group | None = None  # None: this rank alone (pp = 1, or a middle pipeline stage)

    def __post_init__(self):
        if self.rep is None:
            object.__setattr__(self, "rep", single("rep", self.rank))
        if self.emb is None:
            object.__setattr__(self, "emb", single("emb", self.rank))
        if self.replica_world is None:
            object.__setattr__(self, "replica_world", self.world)

    @property
    def world_size(self) -> int:
        return self.replicas * self.dp_size * self.tp_size * self.pp_size

    @property
    def replica_index(self) -> int:
        return self.rep.rank

    @property
    def data_size(self) -> int:
        """Ranks that read distinct data: replicas · dp."""
        return self.replicas * self.dp_size

    @property
    def data_index(self) -> int:
        """This rank's share of the global batch: replica · dp + dp_index."""
        return self.replica_index * self.dp_size + self.dp_index

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
        rep = (f"replicas={self.replicas}, " if self.replicas > 1 else "")
        where = (f"replica {self.replica_index}, " if self.replicas > 1 else "")
        return (f"Mesh({rep}dp={self.dp_size}, tp={self.tp_size}, pp={self.pp_size}, "
                f"rank={self.rank}, coords=({where}dp {self.dp_index}, tp {self.tp_index}, "
                f"pp {self.pp_index}), device={self.device})")

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def single(device: torch.device | str = "cpu") -> Mesh:
        """The 1 × 1 × 1 mesh of a single process; no process group needed."""
        g = {n: single(n) for n in ("dp", "tp", "pp", "mp", "world")}
        return Mesh(1, 1, 1, 0, g["dp"], g["tp"], g["pp"], g["mp"], g["world"],
                    torch.device(device), Comm(0))

    @staticmethod
    def build(dp: int = 0, tp: int = 1, pp: int = 1,
              device: torch.device | str | None = None, replicas: int = 1) -> Mesh:
        """Build the mesh over the initialized default process group
        (collective: every rank calls it)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        dp = resolve_dp(world, dp, tp, pp, replicas)
        check_layout(world, dp, tp, pp, replicas)
        device = torch.device(device) if device is not None else default_device()
        if world == 1:
            return Mesh.single(device)

        def make(name: str, members: list[list[int]], everyone: bool = True) -> Group | None:
            mine = None
            for ranks in members:  # every rank creates every group, in the same order
                pg = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    mine = Group(name, tuple(ranks), ranks.index(rank), pg)
            assert mine is not None or not everyone
            return mine

        groups = group_members(replicas, dp, tp, pp)
        dp_g, tp_g, pp_g, mp_g, rep_g = (make(n, groups[n])
                                         for n in ("dp", "tp", "pp", "mp", "rep"))
        world_g = Group("world", tuple(range(world)), rank, dist.group.WORLD)
        rw_g = make("replica_world", groups["replica_world"]) if replicas > 1 else world_g
        # made last, so the groups above keep their creation order; a middle stage is in none
        emb_g = make("emb", groups["emb"], everyone=False) if pp > 1 else None
        return Mesh(dp, tp, pp, rank, dp_g, tp_g, pp_g, mp_g, world_g, device, Comm(rank),
                    replicas, rep_g, rw_g, emb_g)

    @staticmethod
    def from_env(dp: int = 0, tp: int = 1, pp: int = 1, backend: str | None = None,
                 timeout_s: float = 600.0, device: torch.device | str | None = None,
                 replicas: int = 1) -> Mesh:
        """Initialize torch.distributed from the launcher's environment (torchrun) and build the
        mesh.

        The layout is checked against WORLD_SIZE before the process group is created, so a wrong
        layout fails on every rank with the same message and no rank waits for a collective.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dp = resolve_dp(world, dp, tp, pp, replicas)
        check_layout(world, dp, tp, pp, replicas)
        if device is None:
            device = default_device()
        if world > 1 and not dist.is_initialized():
            backend = backend or default_backend(torch.device(device))
            kwargs = {}
            if torch.device(device).type == "cuda" and backend == "nccl":
                kwargs["device_id"] = torch.device(device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    **kwargs)
        return Mesh.build(dp, tp, pp, device, replicas)

    def destroy(self) -> None:
        """Destroy the process groups (every rank, at the end of a run; a one-rank mesh has
        none)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def to_device_mesh(self):
        """The equivalent torch DeviceMesh with dims ('pp', 'dp', 'tp'), and 'rep' outermost
        when replicas > 1 (for FSDP2, DTensor, DCP)."""
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = (self.pp_size, self.dp_size, self.tp_size), ("pp", "dp", "tp")
        if self.replicas > 1:
            shape, names = (self.replicas, *shape), ("rep", *names)
        return init_device_mesh(self.device.type, shape, mesh_dim_names=names)


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
