"""Optimizers, learning-rate and batch schedules, and the gradient noise scale."""

from __future__ import annotations

from plait.optim.build import optimizer_factory, param_groups
from plait.optim.lamb import LAMB
from plait.optim.lars import LARS
from plait.optim.layerwise import GroupNormReducer, tensor_parallel_norm_reducer
from plait.optim.lr_schedule import batch_lr_scale, lr_factor
from plait.optim.noise_scale import NoiseScale, NoiseScaleMonitor, metric_value, two_batch_estimate

__all__ = ["LAMB", "LARS", "GroupNormReducer", "NoiseScale", "NoiseScaleMonitor", "batch_lr_scale",
           "lr_factor", "metric_value", "optimizer_factory", "param_groups",
           "tensor_parallel_norm_reducer", "two_batch_estimate"]
