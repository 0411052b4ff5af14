"""Data parallelism: each dp rank trains on its own slice of the batch; gradients are summed."""

from plait.data_parallel.reducer import GradReducer

__all__ = ["GradReducer"]
