"""Consolidated export: a checkpoint of any layout -> one safetensors file + config JSON, and back.

    # out/model.safetensors, config.json
    plait export runs/x/checkpoints/step-00000080 --format safetensors out/
    # any layout loads it
    plait train checkpoint.init_from=out/ ...

The export reads the sharded checkpoint in one process (no process group): DCP assembles each
tensor at its full, unpadded shape from the saved chunks. Loading reads, on each rank, only the
slice of each tensor that rank holds (safetensors' lazy slices), so no rank materializes the
whole model; no communication besides one all-reduce to agree that everything fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from plait.checkpoint import store
from plait.checkpoint.slices import SafetensorsFiles, load_entries
from plait.checkpoint.snapshot import read_index
from plait.checkpoint.state import DIVERGENT, Entry, Shards, _scatter_dp, named_params
from plait.checkpoint.store import CheckpointError

FORMAT = "plait-safetensors/1"


def _paths(out: str | Path) -> tuple[Path, Path]:
    """(tensor file, config file): OUT.safetensors + OUT.json,
    or a folder with model.safetensors + config.json."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out, out.with_suffix(".json")
    return out / "model.safetensors", out / "config.json"


def is_safetensors(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".safetensors" or (p / "model.safetensors").is_file()


def read_checkpoint_model(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every model tensor of a checkpoint folder at full shape, in one process; and its manifest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    manifest = store.read_manifest(path)
    for entry in manifest.get("files", []):
        problem = store.check_file(path, entry)
        if problem is not None:
            raise CheckpointError(f"checkpoint file {str(path / entry['name'])!r} {problem}")
    prefix = "replica0/model/" if manifest["layout"]["sync"] in DIVERGENT else "model/"
    index = read_index(path)
    full = {k: torch.empty(md.size, dtype=md.properties.dtype)
            for k, md in index.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    dcp.load(full, checkpoint_id=str(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in full.items()}, manifest


def export_safetensors(checkpoint: str | Path, out: str | Path) -> list[Path]:
    """Write the model of `checkpoint` (a checkpoint, checkpoints or run folder) as safetensors +
    config JSON."""
    from safetensors.torch import save_file

    path = store.find(checkpoint)
    tensor_file, config_file = _paths(out)
    existing = [str(p) for p in (tensor_file, config_file) if p.exists()]
    if existing:
        raise CheckpointError(f"{existing[0]!r} exists already: choose another output (nothing is "
                              "overwritten)")
    tensors, manifest = read_checkpoint_model(path)
    tensor_file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "plait": FORMAT, "step": str(manifest["step"])}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_file), metadata=meta)
    config = {"format": FORMAT, "model": manifest["model"], "step": manifest["step"],
              "samples": manifest["samples"], "source": str(path),
              "tensors": {k: list(v.shape) for k, v in tensors.items()},
              "dtype": (str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors
                        else None)}
    config_file.write_text(json.dumps(config, indent=1) + "\n")
    return [tensor_file, config_file]


def load_safetensors(model, path: str | Path, mesh, model_cfg=None) -> None:
    """Load an export into a parallel model of any layout, in place:
    each rank reads only its slices.

    `model`: a ParallelModel (its `module` keeps the original parameter names, also as a pipeline
    stage). Collective: one all-reduce over mesh.world to agree that every tensor fits.
    """
    tensor_file, config_file = _paths(path)
    if not tensor_file.is_file():
        raise CheckpointError(f"safetensors file {str(tensor_file)!r} does not exist: give the "
                              f"output of `plait export` (a .safetensors file or its folder)")
    if model_cfg is not None and config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())["model"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"config file {str(config_file)!r} is not a plait export config "
                                  f"({e})") from e
        store.check_model(saved, model_cfg, config_file)
    entries: list[Entry] = Shards.local_entries(model.module, mesh)
    with SafetensorsFiles([tensor_file]) as files:
        load_entries(entries, files, mesh, {}, str(tensor_file),
                     "safetensors file does not fit this model")
    params = named_params(model.module)  # a tied copy under the embedding's name
    for e in entries:
        if e.name in params:
            _scatter_dp(params[e.name], e.tensor, mesh)
