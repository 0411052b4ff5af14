"""plait: distributed training of PyTorch models.

    mesh = plait.Mesh.from_env(dp=2, tp=2, pp=2)
    model, optimizer = plait.parallelize(model, optimizer, mesh, plait.ParallelOptions(
        parallel=plait.ParallelConfig(dp=2, tp=2, pp=2)))
"""

from plait.config import Config, ParallelConfig
from plait.errors import ConfigError, PlaitError
from plait.mesh import Mesh
from plait.parallelize import ParallelModel, ParallelOptimizer, ParallelOptions, parallelize

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Mesh", "ParallelConfig", "ParallelModel", "ParallelOptimizer",
           "ParallelOptions", "PlaitError", "parallelize"]
