"""Schedules as pure functions: the learning rate of a step, the global batch of a data position.

- `lr_factor`: linear warm-up, then constant / cosine / linear decay, as a function of the step.
- `batch_lr_scale`: the linear scaling rule (Goyal et al. 2017): lr × global_batch / reference_batch.
- `batch_at`: a global-batch ramp-up as a function of the samples consumed so far (the data
  position the sampler and checkpoints already use). Step n reads samples [s, s + batch_at(s))
  with s the samples consumed before it, so the data order is that of a run without ramp-up,
  only grouped into smaller batches at first; resuming from a checkpoint's sample count
  reproduces the same batches.
- `rank_share`: which of a step's micro-batches a data-parallel rank runs.

The ramp depends only on the config (train.global_batch, train.micro_batch,
train.batch_rampup_samples), not on the layout, so every layout runs the same batches and the
parity contract holds during the ramp too.
"""

from __future__ import annotations

import math

from plait.errors import ConfigError


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"optim.schedule = {schedule!r}: choose constant, cosine or linear")


def batch_lr_scale(global_batch: int, reference_batch: int, enabled: bool) -> float:
    """The linear scaling rule's multiplier: global_batch / reference_batch when enabled, else 1.

    During a batch ramp-up `global_batch` is the current step's batch, so the learning rate ramps
    with it (a smaller batch at the start gets the proportionally smaller rate).
    """
    if not enabled:
        return 1.0
    if reference_batch <= 0:
        raise ConfigError("optim.scale_lr_with_batch = true needs optim.reference_batch > 0: set it to the global "
                          "batch (in samples) at which optim.lr was tuned")
    return global_batch / reference_batch


def batch_at(samples: int, target: int, micro: int, rampup_samples: int) -> int:
    """Global batch of the step that starts at data position `samples` (global samples consumed).

    Without ramp-up (rampup_samples = 0) always `target`. With it, the batch grows linearly in the
    samples consumed from one micro-batch (`micro`) to `target` over the first `rampup_samples`
    samples, rounded down to a whole number of micro-batches: B(s) = micro + (target − micro)·s/N.
    Pure and monotone, so a resumed run recomputes the same batches from its sample count.
    """
    if rampup_samples <= 0 or samples >= rampup_samples or target <= micro:
        return target
    grown = micro + (target - micro) * samples // rampup_samples
    return max(micro, min(target, grown // micro * micro))


def rank_share(start: int, batch: int, micro: int, dp: int, dp_index: int) -> tuple[int, int]:
    """(first sample, count) of rank dp_index's part of the global batch [start, start + batch).

    The batch's batch/micro micro-batches are dealt out contiguously, as evenly as whole
    micro-batches allow: rank r runs micro-batches [n·r // dp, n·(r+1) // dp). When dp divides
    the count this is the plain 1/dp split; during a ramp-up a rank may run one micro-batch more
    than another, or none (the trainer's loss normalization by the step's global token count keeps
    the gradient exact either way).
    """
    if batch % micro:
        raise ValueError(f"global batch {batch} is not a multiple of the micro-batch {micro}")
    n = batch // micro
    lo, hi = n * dp_index // dp, n * (dp_index + 1) // dp
    return start + lo * micro, (hi - lo) * micro


def samples_after(steps: int, target: int, micro: int, rampup_samples: int) -> int:
    """Samples consumed by the first `steps` optimizer steps (the ramp's accounting, for plans and tests)."""
    s = 0
    for _ in range(steps):
        s += batch_at(s, target, micro, rampup_samples)
    return s
