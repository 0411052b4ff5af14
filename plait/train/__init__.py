"""The run: the training loop over small state objects, the step guard, metrics and the run folder.

- `loop`: `Trainer` (one rank's model, data and optimizer; `train_step`, `run`) and `train()`;
- `state`: `TrainState` (step, samples, skipped steps), saved by checkpoints;
- `guard`: `StepGuard`, the one per-step agreement (skip non-finite steps,
  time-based saves / stops);
- `metrics`: `Metrics` (when to log, each record, the summary), metrics.jsonl, TensorBoard, plots.
"""

from plait.train.loop import Trainer, train
from plait.train.model_setup import model_config
from plait.train.state import TrainState

__all__ = ["TrainState", "Trainer", "model_config", "train"]
