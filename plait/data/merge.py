"""The merge side of `plait data prepare`: finished part files, in task order, into shards.

A part that alone reaches the target size becomes a shard by renaming; smaller parts are copied
into the open shard, which is hashed as it grows. A part's loss mask (fine-tuning data) follows
its tokens the same way into `<shard>.mask.bin`, so a shard and its mask always hold the same
documents, one mask byte per token.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MB = 1 << 20


class _Appender:
    """One output file of the open shard, hashed as parts are copied in."""

    def __init__(self, path: Path):
        self.path, self.fh, self.sha, self.bytes = path, open(path, "wb"), hashlib.sha256(), 0

    def append(self, src: Path) -> None:
        with open(src, "rb") as fh:
            while chunk := fh.read(16 * MB):
                self.fh.write(chunk)
                self.sha.update(chunk)
                self.bytes += len(chunk)
        src.unlink()

    def close(self) -> dict:
        self.fh.close()
        return {"file": self.path.name, "bytes": self.bytes, "sha256": self.sha.hexdigest()}


def _mask_entry(info: dict) -> dict:
    return {"file": info["file"], "dtype": "uint8", "bytes": info["bytes"],
            "sha256": info["sha256"]}


class ShardWriter:
    """Finished parts of one split, in task order -> shards of about `target` bytes."""

    def __init__(self, folder: Path, split: str, target: int):
        self.folder, self.split, self.target = folder, split, target
        self.shards: list[dict] = []
        self.files: tuple[_Appender, _Appender | None] | None = None
        self.cur: dict = {}

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}.bin"

    def add(self, part: dict) -> None:
        src = Path(part.pop("path"))
        mask = part.pop("loss_mask", None)
        mask_src = Path(mask["path"]) if mask is not None else None
        if part["documents"] == 0:
            src.unlink(missing_ok=True)
            if mask_src is not None:
                mask_src.unlink(missing_ok=True)
            return
        if self.files is None and part["bytes"] >= self.target:
            name = self._name()
            os.replace(src, self.folder / name)
            shard = {"file": name, **part}
            if mask_src is not None:
                mask_name = name.replace(".bin", ".mask.bin")
                os.replace(mask_src, self.folder / mask_name)
                shard["loss_mask"] = _mask_entry({**mask, "file": mask_name})
            self.shards.append(shard)
            return
        if self.files is None:
            name = self._name()
            self.cur = {"file": name, "documents": 0, "tokens": 0, "max_id": -1}
            self.files = (_Appender(self.folder / name),
                          _Appender(self.folder / name.replace(".bin", ".mask.bin"))
                          if mask_src is not None else None)
        self.files[0].append(src)
        if mask_src is not None:
            self.files[1].append(mask_src)
        for k in ("documents", "tokens"):
            self.cur[k] += part[k]
        self.cur["max_id"] = max(self.cur["max_id"], part["max_id"])
        if self.files[0].bytes >= self.target:
            self.close()

    def close(self) -> None:
        if self.files is not None:
            ids, mask = self.files
            self.files = None
            info = ids.close()
            shard = {**self.cur, "bytes": info["bytes"], "sha256": info["sha256"]}
            if mask is not None:
                shard["loss_mask"] = _mask_entry(mask.close())
            self.shards.append(shard)

    def summary(self) -> dict:
        return {"documents": sum(s["documents"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}
