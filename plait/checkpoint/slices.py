"""Reading a rank's slices of safetensors files: the loader of `plait export` files
(`checkpoint.init_from`) and of a transformers directory's weights (`model.hf`).

    with SafetensorsFiles([path, ...]) as files:                  # headers only
        load_entries(Shards.local_entries(module, mesh), files, mesh, keys, where, what)

Each rank reads, for each tensor it holds (plait.checkpoint.state.Entry), only the ranges of the
full tensor that are its own (`Entry.pieces`: its chunk of a tensor-parallel split, or its 1/tp
of each packed block), through safetensors' lazy slices; no rank reads a tensor it does not hold
(another pipeline stage's) or another tp rank's part of one. One all-reduce over mesh.world agrees
that every tensor is there with its shape before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch

from plait.checkpoint.state import Entry, raise_agreed
from plait.checkpoint.store import CheckpointError


class SafetensorsFiles:
    """Several safetensors files as one table of lazily read tensors (headers read on open)."""

    def __init__(self, files: Iterable[str | Path]):
        from safetensors import safe_open

        self._stack = ExitStack()
        self.where: dict[str, object] = {}
        self.file_of: dict[str, Path] = {}
        for f in files:
            try:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:  # noqa: BLE001 - a damaged header fails in several ways
                self._stack.close()
                raise CheckpointError(f"safetensors file {str(f)!r} cannot be read ({e}): it is "
                                      "damaged or not a safetensors file") from e
            for key in handle.keys():
                self.where[key] = handle
                self.file_of[key] = Path(f)

    def __enter__(self) -> SafetensorsFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The part `index` of tensor `key` (a scalar: the whole tensor), read lazily."""
        if not index:
            return self.where[key].get_tensor(key)
        return self.where[key].get_slice(key)[index]


def problems(entries: list[Entry], files: SafetensorsFiles, keys: dict[str, str],
             where: str) -> list[str]:
    """What does not match between this rank's tensors and the files: missing keys, shapes."""
    have = files.keys()
    out = []
    for e in entries:
        key = keys.get(e.name, e.name)
        if key not in have:
            out.append(f"{where} has no tensor {key!r} (this model has one of shape "
                       f"{list(e.global_shape)})")
        elif files.shape(key) != e.global_shape:
            out.append(f"{where}: {key} has shape {list(files.shape(key))} there, "
                       f"{list(e.global_shape)} in this model")
    return out


def load_entries(entries: list[Entry], files: SafetensorsFiles, mesh, keys: dict[str, str],
                 where: str, what: str) -> None:
    """Copy into each entry's tensor its ranges of the file tensor `keys[name]` (default: the
    entry's name), in place. Collective: one all-reduce over mesh.world; a mismatch on any rank
    raises CheckpointError(`what`: ...) on every rank before anything is written."""
    raise_agreed(problems(entries, files, keys, where), mesh, what)
    with torch.no_grad():
        for e in entries:
            key, dst = keys.get(e.name, e.name), e.tensor
            if e.split is None:
                dst.copy_(files.read(key, tuple(slice(None) for _ in range(dst.dim()))))
                continue
            dim = e.split[0]
            for at_local, at_full, n in e.pieces(mesh.tp_index, mesh.tp_size):
                index = [slice(None)] * dst.dim()
                index[dim] = slice(at_full, at_full + n)
                dst.narrow(dim, at_local, n).copy_(files.read(key, tuple(index)))
