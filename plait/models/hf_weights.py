"""A transformers directory's weights read into plait's model: each rank reads only its slices.

The model is built on the meta device (nothing allocated), checked against the files' headers
(every key there, every shape right), split over tp and pp, and only then given storage; each
rank then reads its ranges of each tensor it holds through safetensors' lazy slices
(plait.checkpoint.slices, the loader of `plait export` files too). The files: `model.safetensors`,
or the shards named by `model.safetensors.index.json`, as transformers' `save_pretrained` writes
them.

Keys: the files hold the transformers model's own state-dict keys; plait's wrapper holds the model
under `lm.` (plait.models.hf.CausalLM), stripped here. A head tied to the embedding is one weight:
the files (transformers omits the tied key on save) and plait's checkpoints name it once, by the
embedding's key.

Buffers the model computes in its constructor (rotary `inv_freq`, Gemma's `embed_scale`) are not
in the files and are not computed on the meta device: after the storage is made each module
holding buffers is passed to the model's own `_init_weights` (transformers' way of initializing a
model built on the meta device), which recomputes them from the config; a buffer it leaves
unset is an error, not silent garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from plait.checkpoint.slices import SafetensorsFiles, load_entries
from plait.checkpoint.state import Shards
from plait.errors import ConfigError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ROOT = "lm."  # where plait.models.hf.CausalLM holds the transformers model


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of directory `path` (one, or the shards its index names); [] when it
    has none (a random initialization). ConfigError for a shard the index names that is missing,
    or for weights only in PyTorch's pickle format."""
    d = Path(path)
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    if (d / INDEX).is_file():
        try:
            names = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"model.hf = {str(path)!r}: {INDEX} is not a safetensors index "
                              f"({e}); write the weights again with save_pretrained") from e
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise ConfigError(f"model.hf = {str(path)!r}: {INDEX} names {missing[0]}, which is not "
                              "there: copy every shard the index names into the directory")
        return [d / n for n in names]
    if any(d.glob("pytorch_model*.bin")):
        raise ConfigError(f"model.hf = {str(path)!r}: weights in PyTorch's pickle format "
                          "(pytorch_model*.bin) are not read; save them as safetensors "
                          "(save_pretrained(dir, safe_serialization=True))")
    return []


def aliases(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Each parameter with its names in `model` (a tied weight has several), in module order."""
    out: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), (p, []))[1].append(name)
    return list(out.values())


def check_weights(lm: nn.Module, path: str | Path, files: list[Path]) -> None:
    """ConfigError when the files' keys or shapes do not match transformers model `lm` (built on
    the meta device: only shapes are read; headers only are read from the files)."""
    expected = {k: tuple(v.shape) for k, v in lm.state_dict(keep_vars=True).items()}
    # a tied weight's later names (the head) may be missing: the file names it once
    optional = {n for _, names in aliases(lm) for n in names[1:]}
    with SafetensorsFiles(files) as f:
        have = {k: f.shape(k) for k in f.keys()}
    missing = [k for k in expected if k not in have and k not in optional]
    unexpected = [k for k in have if k not in expected]
    shapes = [f"{k} is {list(have[k])} there, {list(expected[k])} in config.json's model"
              for k in expected if k in have and have[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ConfigError(f"model.hf = {str(path)!r}: the weights do not match config.json: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}"
                          + (f", shapes: {'; '.join(shapes[:3])}" if shapes else ""))


def recompute_buffers(lm: nn.Module, module: nn.Module) -> None:
    """The constructor-computed buffers of the modules of `module` (a part of `lm`'s model, given
    storage on the meta device's behalf), recomputed by the model's own `_init_weights`."""
    for m in module.modules():
        # the persistent ones are in the files
        bufs = {n: b for n, b in m._buffers.items()
                if b is not None and n in m._non_persistent_buffers_set}
        if not bufs:
            continue
        for b in bufs.values():
            if b.is_floating_point():
                b.fill_(float("nan"))
        lm._init_weights(m)
        unset = [n for n, b in m._buffers.items()
                 if n in bufs and b.is_floating_point() and torch.isnan(b).any()]
        if unset:
            raise ConfigError(f"{type(lm).__name__}: {type(m).__name__}.{unset[0]} is not "
                              "recomputed by the model's _init_weights after meta-device "
                              "construction; this model cannot be loaded that way yet")


def file_keys(module: nn.Module, have: set[str]) -> dict[str, str]:
    """plait name -> file key of each parameter of `module` (a CausalLM or a part of one): the
    name without `lm.`; for a tied weight the first of its names the files hold (a pipeline
    stage's copy of a tied embedding, marked `plait_tied`, by the embedding's name)."""
    out = {}
    for p, names in aliases(module):
        tied = getattr(p, "plait_tied", None)
        keys = [n.removeprefix(ROOT) for n in ([tied] if tied else []) + names]
        key = next((k for k in keys if k in have), keys[0])
        # the entry's name: its first name, or the tied weight's (plait.checkpoint.state)
        for name in ([tied] if tied else []) + names[:1]:
            out[name] = key
    for name, _ in module.named_buffers():
        out[name] = name.removeprefix(ROOT)
    return out


def weights_loader(lm: nn.Module, path: str | Path, files: list[Path]):
    """`init_weights(module, mesh)` for plait.parallelize: recompute `module`'s buffers, then read
    its slices of the files (collective: one all-reduce over mesh.world)."""

    def init_weights(module: nn.Module, mesh) -> None:
        recompute_buffers(lm, module)
        entries = Shards.local_entries(module, mesh)
        with SafetensorsFiles(files) as f:
            load_entries(entries, f, mesh, file_keys(module, f.keys()),
                         f"model.hf = {str(path)!r}", f"model.hf = {str(path)!r}: the weights do "
                         "not match config.json")

    return init_weights
