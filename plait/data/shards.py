"""Reading prepared token shards and bare .bin files, memory-mapped and checked before training.

Checks (each failure is one ConfigError naming the file and the fix):
- always, from `stat` alone: the file exists, its size is the one meta.json records, and it is
  a whole number of tokens of the dtype;
- once per file version: its sha256 (prepared shards) and its largest token id. One pass reads
  the file; the verdict is cached in data.cache_dir under (path, size, mtime), so a start-up
  after the first costs a stat per shard. Ranks that share a cache folder take a file lock per
  shard: one of them hashes, the others read its verdict;
- every load: the largest id is below the model's vocabulary (model.vocab_size when set, else
  meta.json's).
A shard's loss mask (`plait data prepare --format sft`) gets the same size and sha256 checks, is
one byte per token of its shard and holds only 0 and 1.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from plait.errors import ConfigError

META = "meta.json"
FORMAT = "plait.tokens"
VERSION = 1  # bumped only when a field changes meaning; new optional keys keep it
# loss masks change what is trained: a folder holding them is version 2, so a reader that knows
# only version 1 refuses it rather than training on the prompts too
MASKED_VERSION = 2
VERSIONS = (VERSION, MASKED_VERSION)
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MASK_DTYPE = np.dtype("u1")  # loss masks (fine-tuning data): 1 where the token is a trained target
_READ = 16 << 20  # a multiple of every dtype's size


class ShardedTokens:
    """Several 1-D token arrays read as one: len() and slices, nothing loaded into memory.

    Slices within one part are views of its memmap; a slice across parts is a fresh array.
    """

    def __init__(self, parts: list[np.ndarray]):
        # plain ndarray views of the memmaps: slicing a memmap subclass costs several times more
        self.parts = [np.asarray(p) for p in parts if len(p)]
        self.dtype = parts[0].dtype if parts else np.dtype("<u2")
        # starts[i]: index of part i's first token; starts[-1]: the length
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            if hi <= lo:
                return np.empty(0, self.dtype)
            i = bisect.bisect_right(self.starts, lo) - 1
            if hi <= self.starts[i + 1]:
                return self.parts[i][lo - self.starts[i]: hi - self.starts[i]]
            out, at = [], lo
            while at < hi:
                j = bisect.bisect_right(self.starts, at) - 1
                end = min(hi, self.starts[j + 1])
                out.append(self.parts[j][at - self.starts[j]: end - self.starts[j]])
                at = end
            return np.concatenate(out)
        k = int(key) + n if int(key) < 0 else int(key)
        if not 0 <= k < n:
            raise IndexError(f"index {key} out of range for {n} tokens")
        j = bisect.bisect_right(self.starts, k) - 1
        return self.parts[j][k - self.starts[j]]


def _scan(path: Path, dtype: np.dtype, want_sha: bool) -> dict:
    sha = hashlib.sha256() if want_sha else None
    top = -1
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ):
            if sha is not None:
                sha.update(chunk)
            if chunk:
                top = max(top, int(np.frombuffer(chunk, dtype=dtype).max()))
    return {"sha256": sha.hexdigest() if sha is not None else None, "max_id": top}


def verified(path: Path, dtype: np.dtype, cache: Path, want_sha: bool = True) -> dict:
    """{sha256, max_id} of `path`, computed once per (path, size, mtime, dtype) and cached."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype.str}|{int(want_sha)}"
    key = hashlib.sha1(ident.encode()).hexdigest()
    folder = cache / "verified"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{key}.json"

    def cached():
        try:
            got = json.loads(entry.read_text())
            return got if got.get("ident") == ident else None
        except (OSError, ValueError):
            return None

    if (got := cached()) is not None:
        return got
    try:
        import fcntl
    except ImportError:  # no POSIX locks: two ranks may both hash; the result is the same
        fcntl = None
    with open(folder / f"{key}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank hashes; the rest wait for its verdict
        if (got := cached()) is not None:
            return got
        got = {"ident": ident, **_scan(path, dtype, want_sha)}
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(got))
        os.replace(tmp, entry)
    return got


def _whole_tokens(path: Path, size: int, dtype: np.dtype, what: str) -> None:
    if size % dtype.itemsize:
        raise ConfigError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens "
                          f"({dtype.itemsize} bytes each): {what}")


def read_meta(folder: Path) -> dict:
    f = folder / META
    redo = f"run `plait data prepare ... --out {folder}` again into an empty folder"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f} is not readable JSON ({e}): {redo}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{f} is not a plait prepared-data file (format {FORMAT!r} expected): "
                          f"point data.path at a folder made by `plait data prepare`")
    if meta.get("version") not in VERSIONS:
        raise ConfigError(f"{f} has format version {meta.get('version')!r}; this plait reads "
                          f"versions {', '.join(map(str, VERSIONS))}: {redo}, or use the plait "
                          "that wrote it")
    for k in ("vocab_size", "eos_id", "dtype", "splits"):
        if k not in meta:
            raise ConfigError(f"{f} lacks {k!r}: {redo}")
    if meta["dtype"] not in DTYPES:
        raise ConfigError(f"{f}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}: {redo}")
    if not 0 < int(meta["vocab_size"]) <= 2 ** (8 * DTYPES[meta["dtype"]].itemsize):
        raise ConfigError(f"{f}: vocab_size {meta['vocab_size']} does not fit dtype "
                          f"{meta['dtype']}: {redo}")
    return meta


def load_prepared(folder: Path, model_vocab: int, cache: Path
                  ) -> tuple[dict, dict[str, object], dict[str, object]]:
    """(meta, {"train": tokens, "val": tokens}, {"train": loss mask or None, "val": ...}) of a
    prepared folder, every shard and loss-mask file checked."""
    meta = read_meta(folder)
    dtype = DTYPES[meta["dtype"]]
    vocab = int(meta["vocab_size"])
    if model_vocab and model_vocab < vocab:
        raise ConfigError(f"model.vocab_size = {model_vocab} is smaller than the vocabulary of "
                          f"the prepared data ({vocab}, {folder / META}): set model.vocab_size = 0 "
                          f"(the data's) or at least {vocab}")
    limit = model_vocab or vocab
    splits, masks = {}, {}
    for name in ("train", "val"):
        shards = meta["splits"].get(name, {}).get("shards", [])
        parts = []
        for shard in shards:
            path = folder / shard["file"]
            got = _checked(folder, shard, shard["tokens"], dtype, cache)
            if got["max_id"] >= limit:
                whose = "model.vocab_size" if model_vocab else f"vocab_size in {META}"
                raise ConfigError(f"{path} holds token id {got['max_id']}, not below the "
                                  f"vocabulary {limit} ({whose}): prepare the data again (its "
                                  f"vocab_size is wrong)")
            if shard["bytes"]:
                parts.append(np.memmap(path, dtype=dtype, mode="r"))
        # one shard: a plain ndarray view of its memmap (slicing it is cheaper than the memmap's)
        splits[name] = np.asarray(parts[0]) if len(parts) == 1 else ShardedTokens(parts)
        masks[name] = _loss_mask(folder, shards, cache)
    return meta, splits, masks


def _checked(folder: Path, entry: dict, tokens: int, dtype: np.dtype, cache: Path) -> dict:
    """{sha256, max_id} of the file `entry` of meta.json describes, after its size and hash
    checks (ConfigError naming the file and the fix)."""
    redo = "the folder changed after `plait data prepare`: copy it again whole or prepare it again"
    path = folder / entry["file"]
    if not path.is_file():
        raise ConfigError(f"{path} is missing ({folder / META} lists it): {redo}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ConfigError(f"{path} is {size} bytes, {folder / META} says {entry['bytes']}: {redo}")
    _whole_tokens(path, size, dtype, redo)
    if tokens * dtype.itemsize != size:
        raise ConfigError(f"{path}: {tokens} tokens of {dtype.name} are not {size} bytes: "
                          f"{folder / META} names the wrong dtype; prepare the data again")
    got = verified(path, dtype, cache)
    if got["sha256"] != entry["sha256"]:
        raise ConfigError(f"{path}: sha256 {got['sha256'][:16]}... differs from "
                          f"{entry['sha256'][:16]}... in {folder / META}: {redo}")
    return got


def _loss_mask(folder: Path, shards: list[dict], cache: Path):
    """The split's loss mask (uint8 per token, 1 = trained target) when its shards have one."""
    with_mask = [s for s in shards if "loss_mask" in s]
    if not with_mask:
        return None
    if len(with_mask) != len(shards):
        raise ConfigError(f"{folder / META}: some shards have a loss mask and some do not: "
                          f"prepare the data again")
    parts = []
    for shard in shards:
        entry = shard["loss_mask"]
        got = _checked(folder, entry, shard["tokens"], MASK_DTYPE, cache)
        if got["max_id"] > 1:
            raise ConfigError(f"{folder / entry['file']} holds the value {got['max_id']}; a loss "
                              f"mask holds 0 and 1 only: prepare the data again")
        if entry["bytes"]:
            parts.append(np.memmap(folder / entry["file"], dtype=MASK_DTYPE, mode="r"))
    return np.asarray(parts[0]) if len(parts) == 1 else ShardedTokens(parts)


def load_bin(path: Path, dtype_name: str, model_vocab: int, cache: Path) -> tuple[np.ndarray, int]:
    """(memmap, vocabulary) of a bare token file; vocabulary = model_vocab or its largest id + 1."""
    dtype = np.dtype(dtype_name)
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"data.path = {str(path)!r} is empty")
    _whole_tokens(path, size, dtype, "check data.token_dtype (uint16 or uint32) or the file")
    top = verified(path, dtype, cache, want_sha=False)["max_id"]
    if model_vocab and top >= model_vocab:
        raise ConfigError(f"{path} holds token id {top}, not below model.vocab_size = "
                          f"{model_vocab}: set model.vocab_size to at least {top + 1} (or 0: the "
                          f"data's), or check data.token_dtype = {dtype_name}")
    return np.asarray(np.memmap(path, dtype=dtype, mode="r")), model_vocab or top + 1
