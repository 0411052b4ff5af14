"""Where tokens come from: the default corpus, the user's text files, pre-tokenized .bin memmaps, or
a folder made by `plait data prepare` (meta.json + token shards; see docs/data.md).

The default corpus is the Python standard library's source files of the running interpreter (every
machine with Python has them; nothing is downloaded), byte-tokenized and cached as a uint8 file.
Files are concatenated in a fixed shuffled order so the validation tail is a mix of modules.
A prepared folder keeps its own train / validation split (data.val_fraction does not apply) and
its own dtype (data.token_dtype does not apply); its shards are memory-mapped and checked
(plait.data.shards).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.config import DataConfig
from plait.data.sampler import ChunkSampler
from plait.data.shards import META, ShardedTokens, load_bin, load_prepared
from plait.data.tokenizer import ByteTokenizer
from plait.errors import ConfigError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".html", ".js", ".css",
                 ""}


@dataclass
class Corpus:
    train: np.ndarray | ShardedTokens  # 1-D token ids: len() and slices
    val: np.ndarray | ShardedTokens
    vocab_size: int
    source: str
    eos_id: int | None = None  # prepared data: the id between documents
    # fine-tuning data (`plait data prepare --format sft`): uint8 per token, 1 = trained target
    train_mask: np.ndarray | ShardedTokens | None = None
    val_mask: np.ndarray | ShardedTokens | None = None


    def sampler(self, split: str, seq_len: int, seed: int, *,
                document_masking: bool = False) -> ChunkSampler:
        """The sampler of `split` ("train": shuffled; "val": in order) with the split's loss mask;
        with `document_masking` its batches carry the documents' positions (x, y, positions)."""
        if document_masking and self.eos_id is None:
            raise ConfigError(f"data.document_masking = true needs documents that end with an "
                              f"end-of-text token, which only a folder made by `plait data "
                              f"prepare` has, not {self.source}: point data.path at one, or set "
                              f"data.document_masking=false")
        train = split == "train"
        return ChunkSampler(self.train if train else self.val, seq_len, seed, shuffle=train,
                            what="train" if train else "validation",
                            loss_mask=self.train_mask if train else self.val_mask,
                            eos_id=self.eos_id if document_masking else None)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ConfigError(f"data.path = {str(path)!r} holds no text files "
                          f"({', '.join(sorted(TEXT_SUFFIXES - {''}))}): point it at a folder of "
                          f"text, a .bin of token ids or a folder made by `plait data prepare`")
    return files


def _cache_dir(cfg: DataConfig) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plait"
    d = Path(cfg.cache_dir) if cfg.cache_dir else default
    d.mkdir(parents=True, exist_ok=True)
    return d


def _encode_files(files: list[Path], cache: Path) -> np.ndarray:
    """Concatenate files (in a seeded shuffle of their sorted order) into a cached uint8 file."""
    listing = "\n".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = hashlib.sha1(listing.encode()).hexdigest()[:16]
    out = cache / f"bytes-{key}.u8"
    if not out.exists():
        order = list(files)
        random.Random(0).shuffle(order)
        tok = ByteTokenizer()
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            for f in order:
                fh.write(tok.encode(f.read_bytes()).tobytes())
                fh.write(b"\n")
        os.replace(tmp, out)  # atomic: concurrent ranks may race to build the same cache
    return np.memmap(out, dtype=np.uint8, mode="r")


def load_corpus(cfg: DataConfig, vocab_size: int = 0) -> Corpus:
    """The corpus of data.path; every check of its files runs here, before any training collective.

    vocab_size is model.vocab_size (0: the data's vocabulary).
    """
    if not cfg.path:
        tokens = _encode_files(stdlib_files(), _cache_dir(cfg))
        source = f"python {sys.version.split()[0]} standard library"
        vocab = ByteTokenizer.vocab_size
    else:
        p = Path(cfg.path)
        if not p.exists():
            raise ConfigError(f"data.path = {cfg.path!r} does not exist")
        if p.is_dir() and (p / META).exists():
            meta, splits, masks = load_prepared(p, vocab_size, _cache_dir(cfg))
            vocab = int(meta["vocab_size"])
            tok = meta.get("tokenizer", {}).get("name", "?")
            source = f"{p} (prepared: {len(splits['train']):,} train tokens, tokenizer {tok})"
            return Corpus(train=splits["train"], val=splits["val"], vocab_size=vocab_size or vocab,
                          source=source, eos_id=int(meta["eos_id"]), train_mask=masks["train"],
                          val_mask=masks["val"])
        if p.suffix == ".bin":
            tokens, vocab = load_bin(p, cfg.token_dtype, vocab_size, _cache_dir(cfg))
            source = str(p)
        else:
            tokens = _encode_files(text_files(p), _cache_dir(cfg))
            vocab = ByteTokenizer.vocab_size
            source = str(p)
    if vocab_size and vocab_size < vocab and not (cfg.path and cfg.path.endswith(".bin")):
        raise ConfigError(f"model.vocab_size = {vocab_size} is smaller than the tokenizer's "
                          f"{vocab}")
    n_val = int(len(tokens) * cfg.val_fraction)
    split = len(tokens) - n_val
    return Corpus(train=tokens[:split], val=tokens[split:], vocab_size=vocab_size or vocab,
                  source=source)
