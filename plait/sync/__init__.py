"""How data-parallel replicas keep in step:
every step, local SGD, DiLoCo, streaming DiLoCo, delayed.

    # or parallelize(..., sync=cfg.sync)
    strategy = build_strategy(cfg.sync, params, mesh, total_steps)
    # from ParallelOptimizer.step()
    strategy.step(inner)

`cadence` holds the cadences as pure generators, `transport` the (quantized) averaging and the
background thread, `base` the interface and its executor, `strategies` the strategies.
"""

from plait.sync.base import EveryStep, ScheduledSync, SyncStrategy
from plait.sync.cadence import (
    Apply,
    InnerStep,
    Send,
    delayed_schedule,
    every_step_schedule,
    streaming_schedule,
)
from plait.sync.strategies import Delayed, DiLoCo, LocalSGD, StreamingDiLoCo, build_strategy
from plait.sync.transport import CODECS, average, exchange_bytes, make_codec

__all__ = [
    "CODECS", "Apply", "Delayed", "DiLoCo", "EveryStep", "InnerStep", "LocalSGD", "ScheduledSync",
    "Send", "StreamingDiLoCo", "SyncStrategy", "average", "build_strategy", "delayed_schedule",
    "every_step_schedule", "exchange_bytes", "make_codec", "streaming_schedule",
]
