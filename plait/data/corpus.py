"""Where tokens come from: the default corpus, the user's text files, or pre-tokenized .bin memmaps.

The default corpus is the Python standard library's source files of the running interpreter (every
machine with Python has them; nothing is downloaded), byte-tokenized and cached as a uint8 file.
Files are concatenated in a fixed shuffled order so the validation tail is a mix of modules.
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
from plait.data.tokenizer import ByteTokenizer
from plait.errors import ConfigError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".html", ".js", ".css", ""}


@dataclass
class Corpus:
    train: np.ndarray  # 1-D token ids
    val: np.ndarray
    vocab_size: int
    source: str


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ConfigError(f"data.path = {str(path)!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))}): "
                          f"point it at a folder of text or a .bin of token ids")
    return files


def _cache_dir(cfg: DataConfig) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plait"
    d = Path(cfg.cache_dir) if cfg.cache_dir else default
    d.mkdir(parents=True, exist_ok=True)
    return d


def _encode_files(files: list[Path], cache: Path) -> np.ndarray:
    """Concatenate files (in a seeded shuffle of their sorted order) into a cached uint8 token file."""
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
    if not cfg.path:
        tokens = _encode_files(stdlib_files(), _cache_dir(cfg))
        source = f"python {sys.version.split()[0]} standard library"
        vocab = ByteTokenizer.vocab_size
    else:
        p = Path(cfg.path)
        if not p.exists():
            raise ConfigError(f"data.path = {cfg.path!r} does not exist")
        if p.suffix == ".bin":
            tokens = np.memmap(p, dtype=np.dtype(cfg.token_dtype), mode="r")
            if len(tokens) == 0:
                raise ConfigError(f"data.path = {cfg.path!r} is empty")
            vocab = vocab_size or int(tokens.max()) + 1
            source = str(p)
        else:
            tokens = _encode_files(text_files(p), _cache_dir(cfg))
            vocab = ByteTokenizer.vocab_size
            source = str(p)
    if vocab_size and vocab_size < vocab and not (cfg.path and cfg.path.endswith(".bin")):
        raise ConfigError(f"model.vocab_size = {vocab_size} is smaller than the tokenizer's {vocab}")
    n_val = int(len(tokens) * cfg.val_fraction)
    split = len(tokens) - n_val
    return Corpus(train=tokens[:split], val=tokens[split:], vocab_size=vocab_size or vocab, source=source)
