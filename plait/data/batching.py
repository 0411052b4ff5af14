"""The global batch of a step and its split over data-parallel ranks, as pure functions.

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
    """Samples consumed by the first `steps` optimizer steps
    (the ramp's accounting, for plans and tests)."""
    s = 0
    for _ in range(steps):
        s += batch_at(s, target, micro, rampup_samples)
    return s
