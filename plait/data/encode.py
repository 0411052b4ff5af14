"""The worker side of `plait data prepare`: one task's documents -> token part files.

Each worker process loads the tokenizer once, then for each task reads its documents, decides
each document's split, encodes documents in blocks of about a megabyte and appends
`ids..., eos_id` per document to the task's train and val part files. The main process merges
the parts, in task order, into the shards (plait.data.prepare).

The split is a pure function of a document's text: a document goes to validation when the first
8 bytes of its blake2b hash, read as a number in [0, 1), fall below val_fraction. It does not
depend on file order, task cutting or workers, and duplicate documents share a split.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np

from plait.data.sources import Task, read_documents
from plait.data.tokenizer import ByteTokenizer, load_tokenizer

BLOCK_BYTES = 1 << 20  # text per encode call: large enough to amortize it, small enough for memory
BLOCK_DOCS = 4096
# tests: after writing part of task K, its worker kills itself ("kill:K") or sleeps ("stall:K")
FAULT_ENV = "PLAIT_DATA_FAULT"

_W: dict = {}  # this worker process's state, set once by init_worker


def init_worker(spec: dict, counters) -> None:
    """Runs once in each worker: load the tokenizer; progress counters are shared with the main."""
    # one thread per worker: the workers already fill the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole process group: the main process stops the workers and cleans up
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    byte = spec["tokenizer"] == "byte"
    tok = ByteTokenizer() if byte else load_tokenizer(spec["tokenizer"], spec["eos"])
    _W.update(spec, tok=tok, counters=counters, eos=spec["eos_id"], dtype=np.dtype(spec["dtype"]),
              threshold=int(spec["val_fraction"] * 2**64))


def is_val(data: bytes, threshold: int) -> bool:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") < threshold


def as_bytes_and_text(doc: str | bytes) -> tuple[bytes, str | None]:
    """The document's UTF-8 bytes (hashed for the split) and its text (None for raw file bytes)."""
    if isinstance(doc, bytes):
        return doc, None
    try:
        return doc.encode("utf-8"), doc
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: no tokenizer takes them
        data = doc.encode("utf-8", "replace")
        return data, data.decode("utf-8")


class _Part:
    """One split's output of one task: a file of `ids..., eos` per document, hashed as written."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None
        self.sha = hashlib.sha256()
        self.documents = self.tokens = 0
        self.max_id = -1

    def write(self, ids: np.ndarray, documents: int) -> None:
        if self.fh is None:
            self.fh = open(self.path, "wb")
        self.fh.write(memoryview(ids))
        self.sha.update(memoryview(ids))
        self.documents += documents
        self.tokens += len(ids)
        self.max_id = max(self.max_id, int(ids.max()))

    def close(self) -> dict:
        if self.fh is not None:
            self.fh.close()
        return {"path": str(self.path), "documents": self.documents, "tokens": self.tokens,
                "bytes": self.tokens * _W["dtype"].itemsize, "sha256": self.sha.hexdigest(),
                "max_id": self.max_id}


def _pack(seqs: list, eos: int, dtype: np.dtype) -> np.ndarray:
    """Documents' ids, each followed by eos, as one array."""
    out = np.empty(sum(len(s) for s in seqs) + len(seqs), dtype=dtype)
    at = 0
    for s in seqs:
        out[at: at + len(s)] = s
        at += len(s)
        out[at] = eos
        at += 1
    return out


def _encode(docs: list[str | bytes]) -> tuple[list, list[bool]]:
    tok, threshold = _W["tok"], _W["threshold"]
    pairs = [as_bytes_and_text(d) for d in docs]
    val = [is_val(b, threshold) for b, _ in pairs]
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(b, dtype=np.uint8) for b, _ in pairs], val
    texts = [t if t is not None else b.decode("utf-8", "replace") for b, t in pairs]
    return tok.encode_batch(texts), val


def _flush(docs: list, parts: dict[str, _Part]) -> None:
    seqs, val = _encode(docs)
    tokens = 0
    for name, want in (("train", False), ("val", True)):
        chosen = [s for s, v in zip(seqs, val) if v == want]
        if chosen:
            ids = _pack(chosen, _W["eos"], _W["dtype"])
            parts[name].write(ids, len(chosen))
            tokens += len(ids)
    with _W["counters"][1].get_lock():
        _W["counters"][1].value += tokens


def _fault(index: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"kill:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"stall:{index}":
        time.sleep(600)


def run_task(task: Task) -> dict:
    """Encode one task into DIR/part-<index>-{train,val}.bin; returns both parts' statistics."""
    tmp = Path(_W["tmp"])
    parts = {name: _Part(tmp / f"part-{task.index:06d}-{name}.bin") for name in ("train", "val")}
    counter = _W["counters"][0]

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    block: list = []
    size = 0
    for doc in read_documents(task, _W["field"], progress):
        block.append(doc)
        size += len(doc)
        if size >= BLOCK_BYTES or len(block) >= BLOCK_DOCS:
            _flush(block, parts)
            block, size = [], 0
            _fault(task.index)
    if block:
        _flush(block, parts)
    _fault(task.index)
    return {"index": task.index, "train": parts["train"].close(), "val": parts["val"].close()}
