"""`build_pipeline`: what `parallelize()` calls for pp > 1
(split, keep this rank's stages, runner)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from plait.config import ParallelConfig
from plait.mesh import Mesh
from plait.parallel_spec import spec_of
from plait.pipeline.p2p import StageStateGatherer
from plait.pipeline.partition import (
    PipelineStage,
    SequenceSharded,
    partition,
    pipeline_spec,
    stage_keys,
)
from plait.pipeline.runtime import PipelineRunner
from plait.pipeline.tied import tie_ends


def build_pipeline(model: nn.Module, mesh: Mesh, cfg: ParallelConfig, loss_fn: Callable,
                   costs: list[float] | None = None, measure_memory: bool = False
                   ) -> tuple[PipelineStage, PipelineRunner, StageStateGatherer]:
    """Split `model` (already on mesh.device) into mesh.pp_size · cfg.virtual_stages stages;
    keep this rank's.

    Every rank computes the same split from the same model (no communication). `costs` per layer
    overrides the parameter-count balance (e.g. `measured_costs`, averaged over ranks first so
    that all agree). Returns (this rank's stage, its runner, the gatherer of the whole model's
    state dict). With tp > 1 and no sequence parallelism the runner sends 1/tp of each hidden
    state and all-gathers it over tp on receipt (plait.pipeline.p2p.HiddenWire). A weight the
    first and the last stage share (a tied embedding and head) is kept on both and marked for the
    gradient sum over mesh.emb (plait.pipeline.tied).
    """
    p, v = mesh.pp_size, cfg.virtual_stages
    spec = pipeline_spec(model)
    stages = partition(spec, p, v, costs)
    tie_ends(stages, p, mesh.pp_index)
    mine = [stages[c * p + mesh.pp_index] for c in range(v)]
    # the stage answers spec_of() with the model's spec: later steps find the blocks through it
    stage = PipelineStage(mine, spec.shared, mesh.pp_index, p, model_spec=spec_of(model))
    sp = cfg.sequence_parallel and mesh.tp_size > 1
    hidden = SequenceSharded(spec.hidden, mesh.tp_size) if sp else spec.hidden
    # tp ranks hold the same hidden state unless its sequence is split: each sends 1/tp of it
    runner = PipelineRunner(stage, mesh, schedule=cfg.schedule, virtual=v, loss_fn=loss_fn,
                            hidden=hidden, measure_memory=measure_memory,
                            scatter_tp=mesh.tp_size > 1 and not sp)
    gatherer = StageStateGatherer(mesh.comm, mesh.pp, stage_keys(spec, stages, p), spec.keys,
                                  mesh.device)
    return stage, runner, gatherer
