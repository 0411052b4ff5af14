"""`parallelize()`: the one place where a plain model becomes a parallel one.

The steps run in a fixed order, each a small function of its own:

    1. tensor-parallel layer swap (from a plan table)      -> plait.tensor_parallel
    2. pipeline split into stages                          -> plait.pipeline
    3. activation checkpointing
    4. mixed precision
    5. data-parallel gradient path (plain / ZeRO)          -> plait.data_parallel
    6. compression / sync strategy

The order matters: tensor parallelism changes parameter shapes, the pipeline split decides which
parameters a rank keeps, and only then can gradient buckets be laid out over what is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from plait.activation_checkpointing import apply_activation_checkpointing
from plait.compression.build import build_compressor
from plait.config import CompressionConfig, Config, ParallelConfig, SyncConfig, check_options
from plait.data_parallel.reducer import GradReducer
from plait.data_parallel.replicas import grad_reducer
from plait.data_parallel.zero import apply_zero, wrap_optimizer
from plait.errors import ConfigError
from plait.materialize import materialize, on_meta
from plait.mesh import Mesh
from plait.optim.loss_scale import LossScaler
from plait.parallel_model import ParallelModel, ParallelOptimizer, StateGatherer
from plait.parallel_spec import spec_of
from plait.pipeline.build import build_pipeline
from plait.sync import SyncStrategy, build_strategy
from plait.tensor_parallel import apply_tensor_parallel, plan_for

OptimizerOrFactory = torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer]


@dataclass(frozen=True, kw_only=True)
class ParallelOptions:
    """Everything `parallelize()` needs besides the model, the optimizer and the mesh.

    - `parallel`: the layout (dp, tp, pp, ZeRO, schedule, ...);
    - `compression`: how dp gradient buckets are exchanged (None: the plain all-reduce);
    - `sync`: how replicas keep in step (a SyncConfig or a plait.sync strategy; None: every step);
    - `total_steps`: the run's length when known, so the last `optimizer.step()` finishes every
      exchange in flight (without it, call `optimizer.sync.flush()` after the loop);
    - `grad_clip`: clip to this global gradient norm (0: off);
    - `activation_checkpointing`: none | full (recompute each block) | selective (attention core);
    - `dtype`: fp32 | bf16 | fp16, the forward's autocast dtype (parameters and gradients stay
      fp32); fp16 scales the loss dynamically from `loss_scale_init`, doubling it after
      `loss_scale_growth_interval` good steps, never below `loss_scale_min`.

    Every value is checked where the config file's values are (plait.config.checks).
    """

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compression: CompressionConfig | None = None
    sync: SyncConfig | SyncStrategy | None = None
    total_steps: int | None = None
    grad_clip: float = 0.0
    activation_checkpointing: str = "none"
    dtype: str = "fp32"
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000
    loss_scale_min: float = 1.0

    @classmethod
    def from_config(cls, cfg: Config) -> ParallelOptions:
        t = cfg.train
        return cls(parallel=cfg.parallel, compression=cfg.compression, sync=cfg.sync,
                   total_steps=t.steps, grad_clip=cfg.optim.grad_clip,
                   activation_checkpointing=t.activation_checkpointing,
                   dtype=t.dtype, loss_scale_init=t.loss_scale_init,
                   loss_scale_growth_interval=t.loss_scale_growth_interval,
                   loss_scale_min=t.loss_scale_min)


# -- the steps -------------------------------------------------------------------------------
def _apply_tensor_parallel(model: nn.Module, mesh: Mesh, cfg: ParallelConfig
                           ) -> tuple[nn.Module, Callable, StateGatherer | None]:
    """Returns (model with sharded layers, matching loss function, gatherer of full tensors).

    The layers named by the model's plan (plait.tensor_parallel.plan_for) are split over mesh.tp;
    with cfg.sequence_parallel, norms run on 1/tp of the sequence and their weights' gradients are
    all-reduced over tp in backward by a hook (tp_comm.all_reduce_grad_hook). Parameters kept whole
    carry `plait_tp_replicated = True`. The loss is the vocab-parallel cross-entropy over the
    sharded logits; the gatherer all-gathers split tensors over mesh.tp (a collective).
    """
    if mesh.tp_size == 1:
        return model, spec_of(model).loss, None
    tp = apply_tensor_parallel(model, mesh, plan_for(model),
                               sequence_parallel=cfg.sequence_parallel)
    return tp.model, tp.loss_fn, tp.gather


def _apply_pipeline(model: nn.Module, mesh: Mesh, cfg: ParallelConfig, loss_fn: Callable
                    ) -> tuple[nn.Module, object | None, StateGatherer | None]:
    """Returns (this rank's stage(s), the pipeline runner, gatherer of the whole model's state).

    The model is split into mesh.pp_size · cfg.virtual_stages stages balanced by parameter count
    (plait.pipeline.partition); this rank keeps stages rank, rank + pp, ... as one module whose
    state-dict keys are the original names. The runner drives forward and backward (over mesh.pp
    p2p); the gatherer is a collective over mesh.pp returning the whole model's state dict.
    """
    if mesh.pp_size == 1:
        return model, None, None
    return build_pipeline(model, mesh, cfg, loss_fn)


def _apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Step 3: recompute each block (`full`) or its attention core (`selective`) in backward.

    After the pipeline split, so only this rank's blocks are wrapped. Collectives inside a
    recomputed block (tensor parallelism) run again in backward on mesh.tp and are counted; see
    plait.activation_checkpointing for which and how many.
    """
    apply_activation_checkpointing(model, mode)
    return model


def _apply_mixed_precision(opts: ParallelOptions) -> tuple[torch.dtype | None, LossScaler | None]:
    """Step 4: (autocast dtype or None, fp16 loss scaler or None).

    Parameters, gradients and optimizer state stay fp32 (master weights); the forward runs under
    autocast (matrix products in bf16 / fp16), so gradients reach the parameters, and the dp
    reducer's buckets, in fp32: gradient reduction is fp32 unless [compression] says otherwise.
    fp16 adds dynamic loss scaling (plait.optim.loss_scale). No communication here; the scaler's
    agreement is one all-reduce per step.
    """
    if opts.dtype == "fp32":
        return None, None
    if opts.dtype == "bf16":
        return torch.bfloat16, None
    return torch.float16, LossScaler(opts.loss_scale_init,
                                     growth_interval=opts.loss_scale_growth_interval,
                                     min_scale=opts.loss_scale_min)


def _apply_data_parallel(model: nn.Module, mesh: Mesh, cfg: ParallelConfig,
                         compression: CompressionConfig | None = None,
                         optimizer: OptimizerOrFactory | None = None,
                         across_replicas: bool = True) -> GradReducer | None:
    """The dp gradient path: buckets summed over mesh.dp,
    each exchanged by the configured compressor.

    parallel.replicas > 1 (plait.data_parallel.replicas): the dp sum stays dense inside the
    replica and the configured compressor acts on the exchange over mesh.rep that follows; ZeRO
    shards over dp and sums each shard over rep. `across_replicas` False: a sync strategy owns the
    replica exchange, so only the dense dp sum inside the replica is built.
    An optimizer (or factory) exposing `dp_exchange` (1-bit Adam) exchanges gradients itself: its
    exchange becomes the reducer's compressor (dense during its warm-up, silent afterwards).
    With pp > 1 each pipeline chunk's parameters get buckets of their own (`segments`), so the
    runner can start a chunk's exchange from its last backward of the step (plait.pipeline.runtime).
    """
    segments = _chunk_segments(model)
    rep = mesh.rep if across_replicas and mesh.replicas > 1 else None
    if cfg.zero:  # ZeRO-1/2: a reduce-scattering reducer; ZeRO-3: FSDP2 in the reducer's place
        reducer = apply_zero(model, mesh, cfg, compression, optimizer, segments, rep)
        if reducer is not None or rep is None:  # dp = 1 with replicas: the plain path over rep
            return reducer
    compressor = build_compressor(compression, getattr(optimizer, "dp_exchange", None))
    return grad_reducer(list(model.parameters()), mesh, bucket_bytes=int(cfg.bucket_mb * 2**20),
                        compressor=compressor, segments=segments,
                        across_replicas=across_replicas)


def _chunk_segments(model: nn.Module) -> list[list[nn.Parameter]] | None:
    """A pipeline stage's parameters chunk by chunk (plait.pipeline.PipelineStage), else None.

    A weight tied across the pipeline (plait.pipeline.tied) is a segment of its own, so it has a
    gradient bucket of its own: both ends then shard it alike over dp (ZeRO-1/2), and summing
    their pieces over mesh.emb sums the same elements (plait.shared_grads)."""
    if not hasattr(model, "chunk_parameters"):
        return None
    out = []
    for c in range(model.num_chunks):
        seg: list[nn.Parameter] = []
        for p in model.chunk_parameters(c):
            if getattr(p, "plait_tied", None) is None:
                seg.append(p)
                continue
            out += [s for s in (seg, [p]) if s]
            seg = []
        if seg:
            out.append(seg)
    return out


def _uses_reducer(sync) -> bool:
    """Only every_step reduces gradients every step; the other strategies exchange over their
    replicas themselves (mesh.dp, or mesh.rep with parallel.replicas > 1)."""
    if isinstance(sync, SyncStrategy):
        return sync.uses_reducer
    return sync is None or sync.strategy == "every_step"


def _apply_sync(model: nn.Module, mesh: Mesh, sync, total_steps: int | None):
    """Step 6: the sync strategy over the replicas (plait.sync: mesh.dp, or mesh.rep when
    parallel.replicas > 1), from a SyncConfig, or a strategy as given.

    Strategies other than every_step keep replicas apart for a while (local SGD, DiLoCo, streaming
    DiLoCo) or step on stale gradients (delayed); they need every replica's whole optimizer state
    (no ZeRO). Those with background exchanges create a duplicate dp group here: a collective, so
    every rank must call parallelize with the same sync settings.
    """
    if sync is None or isinstance(sync, SyncStrategy):
        return sync
    return build_strategy(sync, list(model.parameters()), mesh, total_steps)


def _build_optimizer(optimizer: OptimizerOrFactory, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if held == {id(p) for p in params}:
        return optimizer
    if len(optimizer.param_groups) != 1 or optimizer.state:
        raise ConfigError("parallelize() changed the model's parameters, and the optimizer has "
                          "several param groups or state: pass a factory instead, e.g. lambda "
                          "params: AdamW(params, ...)")
    return type(optimizer)(params, **optimizer.defaults)


def parallelize(model: nn.Module, optimizer: OptimizerOrFactory, mesh: Mesh,
                options: ParallelOptions | None = None, *,
                init_weights: Callable[[nn.Module, Mesh], None] | None = None,
                ) -> tuple[ParallelModel, ParallelOptimizer]:
    """Make `model` parallel over `mesh` and return (model, optimizer) ready for a training loop.

    `optimizer` is a torch optimizer or a factory `params -> optimizer`; when the parallel
    transforms replace parameters (tensor / pipeline parallelism), a factory is needed unless the
    optimizer has one param group and no state (then it is rebuilt with the same class and
    defaults). `options` (ParallelOptions): the layout, compression, sync strategy, clipping,
    recomputation and precision; checked before anything changes.

    A model built on the meta device (no storage) is split as it is; then this rank's part gets
    storage on mesh.device (plait.materialize) and `init_weights(part, mesh)` fills it (e.g.
    reads this rank's slices of a weights file), before the data-parallel step: no rank ever
    allocates more than its own part.

    Training loop contract, every step: `model.train_step(micro_batches, global_tokens)`, then
    `optimizer.step()` (False: an fp16 overflow skipped the update on every rank) and
    `optimizer.zero_grad()`. Every rank of the mesh must run the same steps and micro-batches.
    """
    opts = options if options is not None else ParallelOptions()
    check_options(opts.parallel, opts.compression,
                  opts.sync if isinstance(opts.sync, SyncConfig) else None,
                  dtype=opts.dtype, activation_checkpointing=opts.activation_checkpointing,
                  onebit=hasattr(optimizer, "dp_exchange"))
    cfg = opts.parallel
    meta = on_meta(model)
    if meta and init_weights is None:
        raise ConfigError("parallelize(): the model is on the meta device (no storage); pass "
                          "init_weights=(module, mesh) -> None to fill this rank's part")
    model = model if meta else model.to(mesh.device)
    model, loss_fn, tp_gather = _apply_tensor_parallel(model, mesh, cfg)  # 1. split layers over tp
    # 2. keep this rank's stage
    model, runner, pp_gather = _apply_pipeline(model, mesh, cfg, loss_fn)
    if meta:  # 2b. storage for this rank's part only, then its values
        materialize(model, mesh.device)
        init_weights(model, mesh)
    # 3. recompute in backward
    model = _apply_activation_checkpointing(model, opts.activation_checkpointing)
    # 4. autocast, fp32 master weights, fp16 scaler
    amp_dtype, scaler = _apply_mixed_precision(opts)
    # 5.+6. dp gradient path, compression; a sync strategy other than every_step exchanges over
    # the replicas itself (step 6), so it gets no per-step gradient reducer, except the dense dp
    # sum inside each replica when parallel.replicas > 1
    every_step = _uses_reducer(opts.sync)
    reducer = (_apply_data_parallel(model, mesh, cfg, opts.compression, optimizer,
                                    across_replicas=every_step)
               if every_step or mesh.replicas > 1 else None)
    opt = _build_optimizer(optimizer, model)
    params = list(model.parameters())
    # each dp rank steps only its shard; params: the pieces it clips
    if cfg.zero and mesh.dp_size > 1:
        opt = wrap_optimizer(opt, reducer, mesh, cfg)
        params = opt.params
    # ZeRO-3: dp shards -> full tensors, first
    zero_gather = getattr(reducer, "state_gatherer", None)
    gatherers = [g for g in (zero_gather, tp_gather, pp_gather) if g is not None]
    pmodel = ParallelModel(model, mesh, reducer, loss_fn=loss_fn, pipeline=runner,
                           state_gatherers=gatherers, amp_dtype=amp_dtype, scaler=scaler)
    strategy = _apply_sync(model, mesh, opts.sync, opts.total_steps)  # 6. sync strategy over dp
    return pmodel, ParallelOptimizer(opt, params, mesh, reducer, grad_clip=opts.grad_clip,
                                     sync=strategy, scaler=scaler)
