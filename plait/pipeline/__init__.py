"""Pipeline parallelism: the model split into stages over `mesh.pp`, micro-batches flowing through.

- `partition`: the layer protocol (GPT, nn.Sequential, or `pipeline_layers()`), the balanced split
  into p·v stages, and `PipelineStage`, the module a rank keeps;
- `schedules`: GPipe, 1F1B, interleaved 1F1B and ZB-H1 as pure instruction generators;
  `simulate` checks them with no processes;
- `runtime`: `PipelineRunner`, the executor of one rank's program over batched p2p;
- `timeline`: the Chrome trace and Gantt chart of what each rank did when.

`build_pipeline` is what `parallelize()` calls for pp > 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from plait.config import ParallelConfig
from plait.mesh import Mesh
from plait.pipeline.p2p import StageStateGatherer
from plait.pipeline.partition import (
    Layer,
    PipelineSpec,
    PipelineStage,
    SequenceSharded,
    measured_costs,
    param_costs,
    partition,
    pipeline_spec,
    stage_keys,
)
from plait.pipeline.runtime import PipelineRunner
from plait.pipeline.schedules import SCHEDULES, ScheduleError, build, forward_only, theoretical_bubble
from plait.pipeline.simulate import simulate


def build_pipeline(model: nn.Module, mesh: Mesh, cfg: ParallelConfig, loss_fn: Callable,
                   costs: list[float] | None = None, measure_memory: bool = False
                   ) -> tuple[PipelineStage, PipelineRunner, StageStateGatherer]:
    """Split `model` (already on mesh.device) into mesh.pp_size · cfg.virtual_stages stages; keep this rank's.

    Every rank computes the same split from the same model (no communication). `costs` per layer
    overrides the parameter-count balance (e.g. `measured_costs`, averaged over ranks first so
    that all agree). Returns (this rank's stage, its runner, the gatherer of the whole model's
    state dict).
    """
    p, v = mesh.pp_size, cfg.virtual_stages
    spec = pipeline_spec(model)
    stages = partition(spec, p, v, costs)
    stage = PipelineStage([stages[c * p + mesh.pp_index] for c in range(v)], spec.shared, mesh.pp_index, p)
    hidden = SequenceSharded(spec.hidden, mesh.tp_size) if cfg.sequence_parallel and mesh.tp_size > 1 else spec.hidden
    runner = PipelineRunner(stage, mesh, cfg.schedule, v, loss_fn, hidden, cfg.microbatches, measure_memory)
    gatherer = StageStateGatherer(mesh.comm, mesh.pp, stage_keys(spec, stages, p), spec.keys, mesh.device)
    return stage, runner, gatherer


__all__ = ["SCHEDULES", "Layer", "PipelineRunner", "PipelineSpec", "PipelineStage", "ScheduleError",
           "StageStateGatherer", "build", "build_pipeline", "forward_only", "measured_costs", "param_costs",
           "partition", "pipeline_spec", "simulate", "theoretical_bubble"]
