"""Checkpoints: sharded, atomic, resumable under any layout; consolidated export.

- `store`: folders, manifest (step, samples, layout, model, file sizes and sha256), atomic commit,
  pruning;
- `state`: the layout-independent key scheme (DTensor shards over tp, per-parameter optimizer
  state);
- `snapshot`: a run's state objects to a torch.distributed.checkpoint state dict and back;
- `manager`: `Checkpointer` (periodic / asynchronous saves, keep-k, planned stops, resume);
- `export`: one safetensors file + config JSON from any layout, loadable into any layout.
"""

from plait.checkpoint.export import export_safetensors, load_safetensors
from plait.checkpoint.manager import Checkpointer, root_of
from plait.checkpoint.store import (
    CheckpointError,
    check_model,
    complete,
    find,
    latest,
    read_manifest,
)

__all__ = ["CheckpointError", "Checkpointer", "check_model", "complete",
           "export_safetensors", "find", "latest", "load_safetensors", "read_manifest", "root_of"]
