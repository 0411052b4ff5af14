"""`ParallelModel` and `ParallelOptimizer`: what `parallelize()` hands a training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
import torch.nn as nn

from plait.comm import Comm
from plait.data_parallel.reducer import GradReducer
from plait.mesh import Mesh
from plait.optim.loss_scale import LossScaler
from plait.parallel_spec import next_token_loss
from plait.shared_grads import SharedGrads

StateGatherer = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class ParallelModel(nn.Module):
    """The parallelized model: forward as the original, plus what a training loop needs.

    - `train_step(batches, global_tokens)`: forward and backward of this rank's micro-batches
      `(x, y, *extras)`, whatever the layout (the pipeline schedule when pp > 1, else
      accumulation with the dp exchange started by the last backward); returns this rank's share
      of the mean loss;
    - `eval_step(batches)`: forward only; float64 [Σ token loss, tokens] of this rank's batches;
    - `no_sync()`: accumulate gradients without communicating (for a hand-written accumulation);
    - `loss(logits, targets, reduction)`: the language-model loss matching the output layout
      (a vocab-parallel cross-entropy when the head is split over tp);
    - `full_state_dict()`: every parameter at full, unsharded shape (gathered where sharded);
    - `pipeline`: the pipeline runner when pp > 1, else None;
    - `autocast()`: the mixed-precision context of step 4.
    """

    def __init__(self, module: nn.Module, mesh: Mesh, reducer: GradReducer | None, *,
                 loss_fn: Callable = next_token_loss,
                 pipeline=None, state_gatherers: Iterable[StateGatherer] = (),
                 amp_dtype: torch.dtype | None = None, scaler: LossScaler | None = None):
        super().__init__()
        self.amp_dtype = amp_dtype  # None: fp32; else the autocast dtype (parameters stay fp32)
        self.module = module
        self.mesh = mesh
        self.reducer = reducer
        self.loss_fn = loss_fn
        self.pipeline = pipeline
        self.scaler = scaler  # fp16: backward runs on loss × scale (a power of 2: exact)
        # applied in order to this rank's local state dict: tp shards -> full tensors, then
        # pp stages -> the whole model (collectives: every rank of the mesh
        # must call full_state_dict)
        self.state_gatherers = list(state_gatherers)

    def forward(self, *args, **kwargs):
        with self.autocast():
            return self.module(*args, **kwargs)

    def autocast(self):
        """A fresh autocast context for the configured dtype (bf16 / fp16),
        or a no-op under fp32."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.mesh.device.type, dtype=self.amp_dtype)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        return self.loss_fn(logits, targets, reduction=reduction)

    def train_step(self, batches: Iterable, global_tokens: int) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches `(x, y, *extras)`, each run as
        `model(x, *extras)` (extras: e.g. document positions); returns Σ token loss / global_tokens.

        `global_tokens`: the trained targets of the whole global batch (every dp rank's; targets of
        -100 are not trained and not counted), so that gradients summed over dp are the gradient of
        the global mean loss. The returned loss is a device tensor (reading it waits for the
        device); on every pp rank when pipelined.
        """
        scale = self.scaler.scale if self.scaler is not None else 1.0
        batches = list(batches)
        # the schedule runs every micro-batch; its loss is on every pp rank
        if self.pipeline is not None:
            loss = self.pipeline.train_step(batches, global_tokens / scale, self.autocast(),
                                            grad_sync=self.reducer)
            return loss / scale if scale != 1.0 else loss
        total = torch.zeros((), device=self.mesh.device)
        dev = self.mesh.device
        for k, (x, y, *extras) in enumerate(batches):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            extras = [e.to(dev, non_blocking=True) for e in extras]
            # every backward but the last accumulates locally; the last one starts the dp exchange
            with self.no_sync() if k < len(batches) - 1 else nullcontext():
                loss = self.loss(self(x, *extras), y, reduction="sum") / global_tokens
                (loss * scale if scale != 1.0 else loss).backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def eval_step(self, batches: Iterable) -> torch.Tensor:
        """Forward only over this rank's batches `(x, y, *extras)`;
        float64 [Σ token loss, tokens] (no dp reduction; targets of -100 are no tokens)."""
        was_training = self.training
        self.eval()
        try:
            if self.pipeline is not None:  # the sums come from the last stage, broadcast over pp
                return self.pipeline.evaluate(batches, self.autocast())
            acc = torch.zeros(2, device=self.mesh.device, dtype=torch.float64)
            for x, y, *extras in batches:
                x, y = x.to(self.mesh.device), y.to(self.mesh.device)
                extras = [e.to(self.mesh.device) for e in extras]
                acc[0] += self.loss(self(x, *extras), y, reduction="sum").double()
                acc[1] += (y != -100).sum()
            return acc
        finally:
            self.train(was_training)

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
    unique gradient pieces are summed over the model-parallel group, or over every rank of the
    replica (mesh.replica_world; the world when parallel.replicas = 1) when gradients are sharded
    over dp (ZeRO), so replicas are not counted twice; a parameter replicated across tp ranks is
    counted on tp rank 0 only, a tied embedding's copy on the last pipeline stage and kv heads
    replicated over tp ranks once (plait.shared_grads), so every rank computes the same norm.
    `step()` first sums those shared gradients over the ranks holding a copy, then clips to
    `grad_clip` with the norm.

    fp16 (`scaler`, a plait.optim.loss_scale.LossScaler): the loss was multiplied by `loss_scale`
    before backward; `step()` divides the reduced gradients by it, agrees over mesh.world whether
    any rank saw inf / nan (one 4-byte all-reduce) and then skips the update on every rank.

    `before_update`: a hook called after clipping and before each update of the wrapped optimizer
    (under a sync strategy: each inner step); returning False skips that update. A training loop
    hangs its per-step agreement there (plait.train.guard).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], mesh: Mesh,
                 reducer: GradReducer | None, *, grad_clip: float = 0.0, sync=None, scaler=None):
        self.optimizer = optimizer
        self.params = params
        self.mesh = mesh
        self.reducer = reducer
        self.grad_clip = grad_clip
        # plait.sync strategy (step 6); None: step every time on the reduced gradient
        self.sync = sync
        self.last_grad_norm: torch.Tensor | None = None
        self.scaler = scaler
        self.before_update: Callable[[], bool] | None = None
        # tied embeddings across the pipeline, kv heads replicated over tp
        self.shared = SharedGrads(params, optimizer, mesh)

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
        grads = self.shared.norm_grads()
        sq = torch.zeros((), dtype=torch.float32, device=self.mesh.device)
        if grads:
            norms = torch._foreach_norm(grads)  # one fused pass instead of a kernel per parameter
            sq = torch.stack([n.float() for n in norms]).pow(2).sum()
        # ZeRO: each rank holds disjoint pieces of the gradients, so the sum runs over dp as well
        # (within one replica: every replica holds the same summed gradient)
        sharded = getattr(self.optimizer, "dp_sharded", False)
        self.comm.all_reduce(sq, self.mesh.replica_world if sharded else self.mesh.mp)
        return sq.sqrt()

    def step(self) -> bool:
        """Finish the gradient exchange and update;
        False when an fp16 overflow skipped the update."""
        self.last_grad_norm = None  # set again by this step's clipping, if any
        self.finish_grads()
        self.shared.sum()  # copies of one weight held by several model-parallel ranks
        # unscaled before clipping; an overflow on any rank skips on all
        if self.scaler is not None:
            if not self.scaler.unscale_and_check(
                    [p.grad for p in self.params if p.grad is not None], self.mesh):
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
        if self.before_update is not None and not self.before_update():
            return
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
