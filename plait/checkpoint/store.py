"""The on-disk side of checkpoints: folder names, the manifest, checksums, atomic commit, pruning.

    CKPT_ROOT/
      step-00000040/          a complete checkpoint: visible only once fully written
        .metadata             torch.distributed.checkpoint's index (keys, shapes, chunks)
        __0_0.distcp ...      one data file per rank that wrote something
        manifest.json         written last: step, samples, layout, model, file sizes and sha256
      .tmp-step-00000060/     a save in progress (or one killed midway):
                              never read, removed by the next save

Atomicity: every rank writes into the temporary folder; rank 0 then writes the manifest (to a
temporary name, fsync, rename) and renames the folder to its final name (fsync of the parent).
A kill at any moment leaves either no `step-*` folder for that step or a complete one, and the
earlier checkpoints untouched. Nothing here uses torch.distributed: it is plain file handling,
done by one rank (or by every rank for reading).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from plait.errors import ConfigError

FORMAT = "plait-checkpoint/1"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-step-"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or from another model."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{TMP_PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint folder `path`;
    CheckpointError naming the file when it is unusable."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: {MANIFEST} is missing, so the checkpoint "
                              "is incomplete (a save that did not finish) or this is not a plait "
                              "checkpoint folder")
    try:
        m = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(f)!r} is not valid JSON ({e}): the manifest "
                              "is corrupted") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {str(f)!r}: format "
                              f"{m.get('format') if isinstance(m, dict) else m!r}, expected "
                              f"{FORMAT!r}")
    return m


def complete(root: Path | None) -> list[Path]:
    """The complete checkpoints under `root` (a readable manifest), oldest first."""
    if root is None or not Path(root).is_dir():
        return []
    found = []
    for d in Path(root).iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir():
            try:
                read_manifest(d)
            except CheckpointError:
                continue
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest(root: Path | None) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = complete(root)
    return found[-1] if found else None


def find(path: str | Path) -> Path:
    """A checkpoint folder from what a user gives:
    the folder itself, or a run / checkpoints folder (its latest)."""
    p = Path(path)
    if (p / MANIFEST).exists() or (p / ".metadata").exists():
        return p
    for root in (p, p / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist: give a checkpoint folder "
                              f"(step-NNNNNNNN), a checkpoints folder or a run folder")
    raise CheckpointError(f"{str(p)!r} holds no complete checkpoint (no step-NNNNNNNN folder with "
                          f"a {MANIFEST})")


def digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


def data_files(path: Path) -> list[str]:
    """Every file of a checkpoint folder but the manifest, sorted."""
    return sorted(f.name for f in Path(path).iterdir() if f.is_file() and f.name != MANIFEST)


def check_file(path: Path, entry: dict) -> str | None:
    """None when the file matches its manifest entry, else what is wrong with it."""
    f = Path(path) / entry["name"]
    if not f.is_file():
        return "is missing"
    size = f.stat().st_size
    if size != entry["bytes"]:
        return f"is {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
    _, sha = digest(f)
    if sha != entry["sha256"]:
        return f"has sha256 {sha[:16]}..., the manifest says {entry['sha256'][:16]}... (corrupted)"
    return None


def commit(tmp: Path, final: Path, manifest: dict) -> Path:
    """Checksum the files of `tmp`, write the manifest last,
    then rename `tmp` to `final` (rank 0 only)."""
    manifest = dict(manifest, format=FORMAT, files=[
        {"name": name, "bytes": size, "sha256": sha}
        for name in data_files(tmp) for size, sha in [digest(tmp / name)]])
    part = tmp / (MANIFEST + ".part")
    with open(part, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    part.replace(tmp / MANIFEST)
    _fsync_dir(tmp)
    # the same step saved before (e.g. a resumed run stopping again at once): keep that one
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def remove_stale(root: Path) -> None:
    """Delete temporary folders of saves that never finished (killed runs).
    Rank 0, before a save."""
    if not Path(root).is_dir():
        return
    for d in Path(root).iterdir():
        if d.is_dir() and d.name.startswith(TMP_PREFIX):
            shutil.rmtree(d, ignore_errors=True)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep` (0: keep all).
    Returns what went."""
    if keep <= 0:
        return []
    old = complete(root)[:-keep]
    for d in old:
        # rename first so that a kill midway never leaves a half-deleted folder under a
        # complete name
        doomed = d.with_name(f"{TMP_PREFIX}deleted-{d.name}")
        d.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return old


# model fields that decide tensor shapes -> the config key that sets them
SHAPE_FIELDS = {"vocab_size": "model.vocab_size", "n_layers": "model.n_layers",
                "d_model": "model.d_model", "n_heads": "model.n_heads",
                "kv_heads": "model.n_kv_heads", "ffn": "model.ffn_hidden",
                "tie_embeddings": "model.tie_embeddings"}


def model_record(model_cfg) -> dict:
    return {**asdict(model_cfg), "kv_heads": model_cfg.kv_heads, "ffn": model_cfg.ffn}


def check_model(saved: dict, model_cfg, source: Path) -> None:
    """CheckpointError naming `source` and every shape-deciding field that differs from this run's
    model."""
    diffs = [(f, key, saved.get(f), getattr(model_cfg, f)) for f, key in SHAPE_FIELDS.items()
             if saved.get(f) != getattr(model_cfg, f)]
    if diffs:
        what = ", ".join(f"{f} = {a} there, {b} here" for f, _, a, b in diffs)
        fix = " ".join(f"{key}={str(a).lower() if isinstance(a, bool) else a}"
                       for _, key, a, _ in diffs)
        raise CheckpointError(f"checkpoint {str(source)!r} holds another model shape ({what}): run "
                              f"with the saved model's settings ({fix}), or use another run folder "
                              "/ checkpoint.dir")


def fault_once(root: Path, kind: str) -> bool:
    """True the first time a debug fault fires for this checkpoint folder
    (a marker file makes it once)."""
    marker = Path(root) / f".fault-{kind}-done"
    if marker.exists():
        return False
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as f:
        f.write("fired\n")
        f.flush()
        os.fsync(f.fileno())
    return True
