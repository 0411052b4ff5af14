"""plait's planner: choose the layout of a training run, predict its step time and memory.

    layout, prediction = plan_for_world(cfg, world=8, cluster="dgx-h100")

The pieces: `shape` (the model's parameters per rank and FLOPs), `memory` (bytes per rank by
formula), `compute` (seconds per instruction from FLOPs, bytes and plait's collective formulas),
`pipesim` (plait's own pipeline programs timed with those costs), `search` (every layout the rules
allow, best first), `cluster` (the machines), `calibrate` (this machine measured), `validate`
(predictions against `plait train` runs here), `published` (against published large runs), `cli`
(`plait plan`). docs/planner.md has the formulas, the pruning rules and the measured errors.
"""

from __future__ import annotations

from plait.planner.cluster import Cluster, load_cluster
from plait.planner.layout import Layout
from plait.planner.search import Job, Planner, job_from_config

__all__ = ["Cluster", "Job", "Layout", "Planner", "detect_cluster", "job_from_config",
           "load_cluster", "plan_for_world"]

GPU_PROFILES = {"H200": "h200", "H100": "dgx-h100", "A100": "dgx-a100-80gb"}


def detect_cluster(gpus_per_node: int | None = None) -> Cluster:
    """The profile of this machine's GPU type (H200, H100, A100), else `local` (calibrated CPU).

    `gpus_per_node`: the devices per node the job uses (default: those visible)."""
    from dataclasses import replace

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, profile in GPU_PROFILES.items():
            if key in name:
                c = load_cluster(profile)
                return replace(c, gpus_per_node=gpus_per_node or torch.cuda.device_count())
    return load_cluster("local")


def plan_for_world(
    cfg, world: int, cluster: str | Cluster = "local", top: int = 1
) -> tuple[dict, dict]:
    """The fastest layout that fits `world` ranks for this config: (layout dict, prediction dict).

    The layout dict has dp, tp, pp, zero, micro_batch, schedule, virtual_stages,
    activation_checkpointing, sequence_parallel (apply it with plait.planner.layout.apply); the
    prediction has step_s, tokens_per_s, mfu, memory_bytes (largest rank) and the breakdowns.
    ConfigError when no layout fits. `cluster="auto"`: this machine's GPU profile, else `local`.
    """
    from plait.errors import ConfigError

    clus = detect_cluster() if cluster == "auto" else load_cluster(cluster)
    planner = Planner(job_from_config(cfg), clus, world)
    res = planner.search(top=top)
    if not res["layouts"]:
        raise ConfigError(
            f"plait plan: no layout of {world} ranks fits in "
            f"{planner.cluster.gpu_memory_gb} GiB per "
            f"device for this model and batch ({res['fitting']} fit): lower train.global_batch or "
            f"train.seq_len, or use more ranks"
        )
    best = res["layouts"][0]
    return {k: best[k] for k in Layout.__dataclass_fields__}, best
