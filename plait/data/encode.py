"""The worker side of `plait data prepare`: one task's documents -> token part files.

Each worker process loads the tokenizer once, then for each task reads its documents, decides
each document's split, encodes documents in blocks of about a megabyte and appends
`ids..., eos_id` per document to the task's train and val part files. The main process merges
the parts, in task order, into the shards (plait.data.prepare).

The split is a pure function of a document's text: a document goes to validation when the first
8 bytes of its blake2b hash, read as a number in [0, 1), fall below val_fraction. It does not
depend on file order, task cutting or workers, and duplicate documents share a split.

Fine-tuning records (`--format sft`, plait.data.sft): a document is a record's rendered segments;
beside each part file a loss-mask part (uint8, one per token, 1 = trained target) is written and
hashed the same way. A record's text, as rendered, decides its split.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np

from plait.data import sft
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
    template = spec.get("chat_template")
    if template and not byte:  # a template's special tokens (<|im_start|> ...) are tokens
        tok.tok.encode_special_tokens = False
    parse = sft.parse_record(template) if spec.get("sft") else None
    _W.update(spec, tok=tok, counters=counters, eos=spec["eos_id"], dtype=np.dtype(spec["dtype"]),
              threshold=int(spec["val_fraction"] * 2**64), parse=parse)


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


class _File:
    """A file written in pieces and hashed as written (opened at the first write)."""

    def __init__(self, path: Path):
        self.path, self.fh, self.sha, self.bytes = path, None, hashlib.sha256(), 0

    def write(self, data: np.ndarray) -> None:
        if self.fh is None:
            self.fh = open(self.path, "wb")
        self.fh.write(memoryview(data))
        self.sha.update(memoryview(data))
        self.bytes += data.nbytes

    def close(self) -> dict:
        if self.fh is not None:
            self.fh.close()
        return {"path": str(self.path), "bytes": self.bytes, "sha256": self.sha.hexdigest()}


class _Part:
    """One split's output of one task: a file of `ids..., eos` per document, and for fine-tuning
    records the loss mask beside it (`<part>.mask`, one uint8 per token)."""

    def __init__(self, path: Path, with_mask: bool):
        self.ids = _File(path)
        self.mask = _File(path.with_suffix(".mask")) if with_mask else None
        self.documents = self.tokens = 0
        self.max_id = -1

    def write(self, ids: np.ndarray, documents: int, mask: np.ndarray | None = None) -> None:
        self.ids.write(ids)
        if self.mask is not None:
            self.mask.write(mask)
        self.documents += documents
        self.tokens += len(ids)
        self.max_id = max(self.max_id, int(ids.max()))

    def close(self) -> dict:
        out = {**self.ids.close(), "documents": self.documents, "tokens": self.tokens,
               "max_id": self.max_id}
        if self.mask is not None:
            out["loss_mask"] = self.mask.close()
        return out


def _pack(seqs: list, eos: int, dtype: np.dtype, ends: list | None = None) -> np.ndarray:
    """Documents' ids, each followed by eos (or by its own `ends[i]`), as one array."""
    out = np.empty(sum(len(s) for s in seqs) + len(seqs), dtype=dtype)
    at = 0
    for i, s in enumerate(seqs):
        out[at: at + len(s)] = s
        at += len(s)
        out[at] = eos if ends is None else ends[i]
        at += 1
    return out


def _encode_records(records: list) -> tuple[list, list[bool], list]:
    """Fine-tuning records (segments) -> (ids per record, split, loss mask per record)."""
    tok, threshold = _W["tok"], _W["threshold"]
    texts = [sft.text_of(r) for r in records]
    val = [is_val(as_bytes_and_text(t)[0], threshold) for t in texts]
    if isinstance(tok, ByteTokenizer):
        pairs = [sft.byte_ids_and_mask(r) for r in records]
        return [p[0] for p in pairs], val, [p[1] for p in pairs]
    encs = tok.tok.encode_batch(texts, add_special_tokens=False)  # with offsets
    masks = [sft.token_mask(e.offsets, sft.char_mask(r)) for e, r in zip(encs, records)]
    return [e.ids for e in encs], val, masks


def _encode(docs: list[str | bytes]) -> tuple[list, list[bool]]:
    tok, threshold = _W["tok"], _W["threshold"]
    pairs = [as_bytes_and_text(d) for d in docs]
    val = [is_val(b, threshold) for b, _ in pairs]
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(b, dtype=np.uint8) for b, _ in pairs], val
    texts = [t if t is not None else b.decode("utf-8", "replace") for b, t in pairs]
    return tok.encode_batch(texts), val


def _flush(docs: list, parts: dict[str, _Part]) -> None:
    if _W["parse"] is not None:
        seqs, val, masks = _encode_records(docs)
    else:
        (seqs, val), masks = _encode(docs), None
    tokens = 0
    for name, want in (("train", False), ("val", True)):
        chosen = [i for i, v in enumerate(val) if v == want]
        if chosen:
            ids = _pack([seqs[i] for i in chosen], _W["eos"], _W["dtype"])
            # a record's end-of-text is trained when its last token is
            mask = None if masks is None else _pack(
                [masks[i] for i in chosen], 0, np.dtype(np.uint8),
                ends=[bool(len(masks[i]) and masks[i][-1]) for i in chosen])
            parts[name].write(ids, len(chosen), mask)
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
    parts = {name: _Part(tmp / f"part-{task.index:06d}-{name}.bin", _W["parse"] is not None)
             for name in ("train", "val")}
    counter = _W["counters"][0]

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    block: list = []
    size = 0
    for doc in read_documents(task, _W["field"], progress, _W["parse"]):
        block.append(doc)
        size += len(doc) if _W["parse"] is None else sum(len(t) for t, _ in doc)
        if size >= BLOCK_BYTES or len(block) >= BLOCK_DOCS:
            _flush(block, parts)
            block, size = [], 0
            _fault(task.index)
    if block:
        _flush(block, parts)
    _fault(task.index)
    return {"index": task.index, "train": parts["train"].close(), "val": parts["val"].close()}
