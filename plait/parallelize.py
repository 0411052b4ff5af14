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
from plait.config import ParallelConfig
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
    - `pipeline`: the pipeline runner when pp > 1 (it then drives forward and backward), else None.
    """

    def __init__(self, module: nn.Module, mesh: Mesh, reducer: GradReducer | None,
                 loss_fn: Callable = lm_loss, pipeline=None, state_gatherers: list[StateGatherer] = ()):
        super().__init__()
        self.module = module
        self.mesh = mesh
        self.reducer = reducer
        self.loss_fn = loss_fn
        self.pipeline = pipeline
        # applied in order to this rank's local state dict: tp shards -> full tensors, then
        # pp stages -> the whole model (collectives: every rank of the mesh must call full_state_dict)
        self.state_gatherers = list(state_gatherers)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

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

    `clip_grad_norm(max_norm)` returns the global gradient norm of the whole model: the squares of
    each rank's unique parameters are summed over the model-parallel group (a parameter replicated
    across tp ranks is counted on tp rank 0 only), so every rank computes the same norm.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], mesh: Mesh,
                 reducer: GradReducer | None, grad_clip: float = 0.0):
        self.optimizer = optimizer
        self.params = params
        self.mesh = mesh
        self.reducer = reducer
        self.grad_clip = grad_clip
        self.last_grad_norm: float | None = None

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
        sq = torch.zeros((), dtype=torch.float32, device=self.mesh.device)
        for p in self.params:
            if p.grad is None:
                continue
            if getattr(p, "plait_tp_replicated", False) and self.mesh.tp_index != 0:
                continue
            sq += p.grad.detach().float().pow(2).sum()
        self.comm.all_reduce(sq, self.mesh.mp)
        return sq.sqrt()

    def step(self) -> None:
        self.finish_grads()
        if self.grad_clip > 0:
            norm = self.grad_norm()
            self.last_grad_norm = float(norm)
            scale = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.reducer is not None:
            self.reducer.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd) -> None:
        self.optimizer.load_state_dict(sd)


# -- the steps -------------------------------------------------------------------------------
def _apply_tensor_parallel(model: nn.Module, mesh: Mesh, cfg: ParallelConfig
                           ) -> tuple[nn.Module, Callable, StateGatherer | None]:
    """Returns (model with sharded layers, matching loss function, gatherer of full tensors)."""
    if mesh.tp_size == 1:
        return model, lm_loss, None
    raise ConfigError("parallel.tp > 1: tensor parallelism is not available in this build; set parallel.tp=1")


def _apply_pipeline(model: nn.Module, mesh: Mesh, cfg: ParallelConfig, loss_fn: Callable
                    ) -> tuple[nn.Module, object | None, StateGatherer | None]:
    """Returns (this rank's stage(s), the pipeline runner, gatherer of the whole model's state)."""
    if mesh.pp_size == 1:
        return model, None, None
    raise ConfigError("parallel.pp > 1: pipeline parallelism is not available in this build; set parallel.pp=1")


def _apply_data_parallel(model: nn.Module, mesh: Mesh, cfg: ParallelConfig) -> GradReducer | None:
    if cfg.zero:
        raise ConfigError(f"parallel.zero = {cfg.zero}: ZeRO is not available in this build; set parallel.zero=0")
    if mesh.dp_size == 1:
        return None
    return GradReducer(list(model.parameters()), mesh.dp, mesh.comm, bucket_bytes=int(cfg.bucket_mb * 2**20))


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
                grad_clip: float = 0.0) -> tuple[ParallelModel, ParallelOptimizer]:
    """Make `model` parallel over `mesh` and return (model, optimizer) ready for a training loop.

    `optimizer` is a torch optimizer or a factory `params -> optimizer`; when the parallel
    transforms replace parameters (tensor / pipeline parallelism), a factory is needed unless the
    optimizer has one param group and no state (then it is rebuilt with the same class and defaults).

    Training loop contract: run each micro-batch's backward (all but the last inside
    `model.no_sync()`), then `optimizer.step()` and `optimizer.zero_grad()`. Every rank of the
    mesh must run the same number of steps and micro-batches.
    """
    cfg = cfg or ParallelConfig()
    model = model.to(mesh.device)
    model, loss_fn, tp_gather = _apply_tensor_parallel(model, mesh, cfg)  # 1. split layers over tp
    model, runner, pp_gather = _apply_pipeline(model, mesh, cfg, loss_fn)  # 2. keep this rank's stage
    # 3. activation checkpointing and 4. mixed precision: configured in TrainConfig / the trainer
    reducer = _apply_data_parallel(model, mesh, cfg)  # 5. gradient path over dp
    opt = _build_optimizer(optimizer, model)
    gatherers = [g for g in (tp_gather, pp_gather) if g is not None]
    pmodel = ParallelModel(model, mesh, reducer, loss_fn, runner, gatherers)
    return pmodel, ParallelOptimizer(opt, list(model.parameters()), mesh, reducer, grad_clip)


@contextmanager
def maybe_no_sync(model: ParallelModel, last: bool):
    with (nullcontext() if last else model.no_sync()):
        yield
