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
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from plait.comm import Comm
from plait.config import CompressionConfig, ParallelConfig
from plait.data_parallel import GradReducer
from plait.errors import ConfigError
from plait.mesh import Mesh
from plait.models.gpt import lm_loss

OptimizerOrFactory = torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer]
StateGatherer = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class ParallelModel(nn.Module):
    """The parallelized model: forward as the original, plus what a training loop needs.

    - `no_sync()`: accumulate gradients without communicating (non-final micro-batches);
    - `loss(logits, targets, reduction)`: the language-model loss matching the output layout
      (a vocab-parallel cross-entropy when the head is split over tp);
    - `full_state_dict()`: every parameter at full, unsharded shape (gathered where sharded);
    - `pipeline`: the pipeline runner when pp > 1 (it then drives forward and backward), else None;
    - `autocast()`: the mixed-precision context of step 4 (forward enters it by itself; a pipeline
      runner or an evaluation loop that calls the layers directly enters it around them).
    """

    def __init__(self, module: nn.Module, mesh: Mesh, reducer: GradReducer | None,
                 loss_fn: Callable = lm_loss, pipeline=None, state_gatherers: list[StateGatherer] = (),
                 amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.amp_dtype = amp_dtype  # None: fp32; else the autocast dtype (parameters stay fp32)
        self.module = module
        self.mesh = mesh
        self.reducer = reducer
        self.loss_fn = loss_fn
        self.pipeline = pipeline
        # applied in order to this rank's local state dict: tp shards -> full tensors, then
        # pp stages -> the whole model (collectives: every rank of the mesh must call full_state_dict)
        self.state_gatherers = list(state_gatherers)

    def forward(self, *args, **kwargs):
        with self.autocast():
            return self.module(*args, **kwargs)

    def autocast(self):
        """A fresh autocast context for the configured dtype (bf16 / fp16), or a no-op under fp32."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.mesh.device.type, dtype=self.amp_dtype)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self.loss_fn(logits, targets, reduction=reduction)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for gather in self.state_gatherers:
            sd = gather(sd)
        return sd

    def no_sync(self):
        """Backward passes inside accumulate locally; the first one outside reduces everything."""
        return self.reducer.no_sync() if self.reducer is not None else nullcontext()


class ParallelOptimizer:
    """Wraps a torch optimizer: `step()` completes the gradient exchange, clips, then steps.

    `grad_norm()` returns the global gradient norm of the whole model: the squares of each rank's
    unique gradient pieces are summed over the model-parallel group, or the world when gradients are
    sharded over dp (ZeRO); a parameter replicated across tp ranks is counted on tp rank 0 only, so
    every rank computes the same norm. `step()` clips to `grad_clip` with it.

    fp16 (`scaler`, a plait.optim.loss_scale.LossScaler): the loss was multiplied by `loss_scale`
    before backward; `step()` divides the reduced gradients by it, agrees over mesh.world whether
    any rank saw inf / nan (one 4-byte all-reduce) and then skips the update on every rank.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], mesh: Mesh,
                 reducer: GradReducer | None, grad_clip: float = 0.0, sync=None, scaler=None):
        self.optimizer = optimizer
        self.params = params
        self.mesh = mesh
        self.reducer = reducer
        self.grad_clip = grad_clip
        self.sync = sync  # plait.sync strategy (step 6); None: step every time on the reduced gradient
        self.last_grad_norm: torch.Tensor | None = None
        self.scaler = scaler

    @property
    def loss_scale(self) -> float:
        """What to multiply the loss by before backward: the fp16 loss scale, else 1."""
        return self.scaler.scale if self.scaler is not None else 1.0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def comm(self) -> Comm:
        return self.mesh.comm

    def finish_grads(self) -> None:
        if self.reducer is not None:
            self.reducer.finish()

    def grad_norm(self) -> torch.Tensor:
        """The whole model's gradient 2-norm, as a tensor (no host sync)."""
        skip_replicated = self.mesh.tp_index != 0
        grads = [p.grad.detach() for p in self.params if p.grad is not None
                 and not (skip_replicated and getattr(p, "plait_tp_replicated", False))]
        sq = torch.zeros((), dtype=torch.float32, device=self.mesh.device)
        if grads:
            norms = torch._foreach_norm(grads)  # one fused pass instead of a kernel per parameter
            sq = torch.stack([n.float() for n in norms]).pow(2).sum()
        # ZeRO: each rank holds disjoint pieces of the gradients, so the sum runs over dp as well
        sharded = getattr(self.optimizer, "dp_sharded", False)
        self.comm.all_reduce(sq, self.mesh.world if sharded else self.mesh.mp)
        return sq.sqrt()

    def step(self) -> bool:
        """Finish the gradient exchange and update; False when an fp16 overflow skipped the update."""
        self.finish_grads()
        if self.scaler is not None:  # unscaled before clipping; an overflow on any rank skips on all
            if not self.scaler.unscale_and_check([p.grad for p in self.params if p.grad is not None], self.mesh):
                self.last_grad_norm = None  # no norm for a skipped step
                return False
        # the sync strategy decides when the inner step runs and on which gradient (plait.sync)
        if self.sync is not None:
            self.sync.step(self._inner_step)
        else:
            self._inner_step()
        return True

    def _inner_step(self) -> None:
        if self.grad_clip > 0:
            norm = self.grad_norm()
            self.last_grad_norm = norm  # a tensor: reading it (float) is left to the caller
            scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.reducer is not None:
            self.reducer.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        sd = self.optimizer.state_dict()
        # a sync strategy's state (DiLoCo's outer parameters and momentum) rides along under "sync"
        extra = self.sync.state_dict() if self.sync is not None else {}
        sd = {**sd, "sync": extra} if extra else sd
        return {**sd, "loss_scale": self.scaler.state_dict()} if self.scaler is not None else sd

    def load_state_dict(self, sd) -> None:
        sd = dict(sd)
        if "sync" in sd:
            self.sync.load_state_dict(sd.pop("sync"))
        if "loss_scale" in sd:
            scale = sd.pop("loss_scale")
            if self.scaler is not None:
                self.scaler.load_state_dict(scale)
        self.optimizer.load_state_dict(sd)


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
        return model, lm_loss, None
    from plait.tensor_parallel import apply_tensor_parallel, plan_for

    tp = apply_tensor_parallel(model, mesh, plan_for(model), sequence_parallel=cfg.sequence_parallel)
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
    from plait.pipeline import build_pipeline

    return build_pipeline(model, mesh, cfg, loss_fn)


def _apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Step 3: recompute each block (`full`) or its attention core (`selective`) in backward.

    After the pipeline split, so only this rank's blocks are wrapped. Collectives inside a
    recomputed block (tensor parallelism) run again in backward on mesh.tp and are counted; see
    plait.activation_checkpointing for which and how many.
    """
    from plait.activation_checkpointing import apply_activation_checkpointing

    apply_activation_checkpointing(model, mode)
    return model


def _apply_mixed_precision(dtype: str, loss_scale=None) -> tuple[torch.dtype | None, object | None]:
    """Step 4: (autocast dtype or None, fp16 loss scaler or None).

    Parameters, gradients and optimizer state stay fp32 (master weights); the forward runs under
    autocast (matrix products in bf16 / fp16), so gradients reach the parameters, and the dp
    reducer's buckets, in fp32: gradient reduction is fp32 unless [compression] says otherwise.
    fp16 adds dynamic loss scaling (plait.optim.loss_scale): `loss_scale` is a LossScaler, or None
    for the defaults. No communication here; the scaler's agreement is one all-reduce per step.
    """
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.dtype = {dtype!r}: choose fp32, bf16 or fp16")
    if dtype == "fp32":
        return None, None
    if dtype == "bf16":
        return torch.bfloat16, None
    from plait.optim.loss_scale import LossScaler

    return torch.float16, loss_scale if loss_scale is not None else LossScaler()


def _apply_data_parallel(model: nn.Module, mesh: Mesh, cfg: ParallelConfig,
                         compression: CompressionConfig | None = None,
                         optimizer: OptimizerOrFactory | None = None) -> GradReducer | None:
    """The dp gradient path: buckets summed over mesh.dp, each exchanged by the configured compressor.

    An optimizer (or factory) exposing `dp_exchange` (1-bit Adam) exchanges gradients itself: its
    exchange becomes the reducer's compressor (dense during its warm-up, silent afterwards).
    """
    from plait.compression import build_compressor

    if cfg.zero:  # ZeRO-1/2: a reduce-scattering reducer; ZeRO-3: FSDP2 in the reducer's place
        from plait.data_parallel.zero import apply_zero

        return apply_zero(model, mesh, cfg, compression, optimizer)
    compressor = build_compressor(compression, getattr(optimizer, "dp_exchange", None))
    if mesh.dp_size == 1:
        return None
    return GradReducer(list(model.parameters()), mesh.dp, mesh.comm, bucket_bytes=int(cfg.bucket_mb * 2**20),
                       compressor=compressor)


def _uses_reducer(sync) -> bool:
    """Only every_step reduces gradients every step; the other strategies exchange over dp themselves."""
    from plait.sync import SyncStrategy

    if isinstance(sync, SyncStrategy):
        return sync.uses_reducer
    return sync is None or sync.strategy == "every_step"


def _apply_sync(model: nn.Module, mesh: Mesh, cfg: ParallelConfig, sync, total_steps: int | None,
                compression: CompressionConfig | None = None):
    """Step 6: the sync strategy over mesh.dp (plait.sync), from a SyncConfig, or a strategy as given.

    Strategies other than every_step keep replicas apart for a while (local SGD, DiLoCo, streaming
    DiLoCo) or step on stale gradients (delayed); they need every replica's whole optimizer state
    (no ZeRO). Those with background exchanges create a duplicate dp group here: a collective, so
    every rank must call parallelize with the same sync settings.
    """
    from plait.config import Config, check_sync
    from plait.sync import SyncStrategy, build_strategy

    if sync is None or isinstance(sync, SyncStrategy):
        return sync
    check_sync(Config(parallel=cfg, sync=sync, compression=compression or CompressionConfig()))
    return build_strategy(sync, list(model.parameters()), mesh, total_steps)


def _build_optimizer(optimizer: OptimizerOrFactory, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if held == {id(p) for p in params}:
        return optimizer
    if len(optimizer.param_groups) != 1 or optimizer.state:
        raise ConfigError("parallelize() changed the model's parameters, and the optimizer has several param "
                          "groups or state: pass a factory instead, e.g. lambda params: AdamW(params, ...)")
    return type(optimizer)(params, **optimizer.defaults)


def parallelize(model: nn.Module, optimizer: OptimizerOrFactory, mesh: Mesh, cfg: ParallelConfig | None = None,
                grad_clip: float = 0.0, compression: CompressionConfig | None = None, sync=None,
                total_steps: int | None = None, activation_checkpointing: str = "none", dtype: str = "fp32",
                loss_scale=None) -> tuple[ParallelModel, ParallelOptimizer]:
    """Make `model` parallel over `mesh` and return (model, optimizer) ready for a training loop.

    `optimizer` is a torch optimizer or a factory `params -> optimizer`; when the parallel
    transforms replace parameters (tensor / pipeline parallelism), a factory is needed unless the
    optimizer has one param group and no state (then it is rebuilt with the same class and defaults).

    Training loop contract: run each micro-batch's backward (all but the last inside
    `model.no_sync()`), then `optimizer.step()` and `optimizer.zero_grad()`. Every rank of the
    mesh must run the same number of steps and micro-batches.

    `compression` (a CompressionConfig) picks how dp gradient buckets are exchanged; None keeps
    the plain all-reduce.

    `sync` (a SyncConfig, or a plait.sync strategy) picks how replicas keep in step: every step
    (None, the default), local SGD, DiLoCo, streaming DiLoCo or delayed. `total_steps`, the run's
    length when known, lets the last `optimizer.step()` finish every exchange in flight; without
    it, call `optimizer.sync.flush()` after the loop.

    `activation_checkpointing`: none | full (recompute each block in backward) | selective (only the
    attention core). `dtype`: fp32 | bf16 | fp16: the forward's autocast dtype, parameters and
    gradients staying fp32; fp16 scales the loss dynamically (`loss_scale`, a LossScaler, or None
    for its defaults): multiply the loss by `optimizer.loss_scale` before backward, and
    `optimizer.step()` returns False when it skipped an overflowing step (on every rank).
    """
    cfg = cfg or ParallelConfig()
    model = model.to(mesh.device)
    model, loss_fn, tp_gather = _apply_tensor_parallel(model, mesh, cfg)  # 1. split layers over tp
    model, runner, pp_gather = _apply_pipeline(model, mesh, cfg, loss_fn)  # 2. keep this rank's stage
    model = _apply_activation_checkpointing(model, activation_checkpointing)  # 3. recompute blocks in backward
    amp_dtype, scaler = _apply_mixed_precision(dtype, loss_scale)  # 4. autocast, fp32 master weights, fp16 scaler
    # 5.+6. dp gradient path, compression; a sync strategy other than every_step exchanges over dp
    # itself (step 6), so it gets no per-step gradient reducer
    reducer = _apply_data_parallel(model, mesh, cfg, compression, optimizer) if _uses_reducer(sync) else None
    opt = _build_optimizer(optimizer, model)
    params = list(model.parameters())
    if cfg.zero and mesh.dp_size > 1:  # each dp rank steps only its shard; params: the pieces it clips
        from plait.data_parallel.zero import wrap_optimizer

        opt = wrap_optimizer(opt, reducer, mesh, cfg)
        params = opt.params
    zero_gather = getattr(reducer, "state_gatherer", None)  # ZeRO-3: dp shards -> full tensors, first
    gatherers = [g for g in (zero_gather, tp_gather, pp_gather) if g is not None]
    pmodel = ParallelModel(model, mesh, reducer, loss_fn, runner, gatherers, amp_dtype)
    strategy = _apply_sync(model, mesh, cfg, sync, total_steps, compression)  # 6. sync strategy over dp
    return pmodel, ParallelOptimizer(opt, params, mesh, reducer, grad_clip, sync=strategy, scaler=scaler)


@contextmanager
def maybe_no_sync(model: ParallelModel, last: bool):
    with (nullcontext() if last else model.no_sync()):
        yield
