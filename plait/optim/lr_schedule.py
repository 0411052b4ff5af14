"""The learning rate as a pure function of the step and the step's batch.

- `lr_factor`: linear warm-up, then constant / cosine / linear decay, as a function of the step.
- `batch_lr_scale`: the linear scaling rule (Goyal et al. 2017):
  lr × global_batch / reference_batch.

The global batch of a step (ramp-up) and its split over dp ranks: plait.data.batching.
"""

from __future__ import annotations

import math


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
    return global_batch / reference_batch  # reference_batch > 0: plait.config.checks
