"""`plait data prepare` and training on its output: formats, tokenizers, meta.json, the split,
every corruption check, interrupted runs, deterministic sampling of the memory-mapped shards."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from plait.config import DataConfig
from plait.data import ChunkSampler, load_corpus
from plait.data.encode import FAULT_ENV
from plait.data.prepare import add_arguments, main
from plait.data.shards import ShardedTokens
from plait.errors import ConfigError

tokenizers = pytest.importorskip("tokenizers")
try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the dev extra installs it; without it the parquet input is left out
    pa = pq = None

VAL = 0.2


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    return main(ap.parse_args([*argv, "--no-progress"]))


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """~300 documents: paragraphs of standard-library source, plus unicode and a document that
    holds the end-of-text token's text (it must come back as text, not as a separator)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = (root / "textwrap.py").read_text() + (root / "difflib.py").read_text()
    paras = [p for p in text.split("\n\n") if p.strip()][:290]
    return paras + ["héllo wörld ✓ 日本語 🙂", "a <|endoftext|> inside", "x" * 3000]


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, docs) -> tuple[list[str], list[str]]:
    """(input arguments, the documents they hold in input order) over every input format."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "txt" / "__pycache__").mkdir(parents=True)
    for i, doc in enumerate(docs[:40]):
        (d / "txt" / f"d{i:03d}.txt").write_text(doc)
    (d / "txt" / "empty.txt").write_text("")  # skipped: no document
    (d / "txt" / ".hidden.txt").write_text("never read")
    (d / "txt" / "__pycache__" / "x.pyc").write_bytes(b"\0\1")
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(docs[40:150])]
    (d / "a.jsonl").write_text("\n".join(lines[:50] + [""] + lines[50:]) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"text": t}) + "\n" for t in docs[150:220]))
    args, held = [str(d / "txt"), str(d / "a.jsonl"), str(d / "b.jsonl.gz")], docs[:220]
    if pq is not None:
        pq.write_table(pa.table({"n": list(range(len(docs) - 220)), "text": docs[220:]}),
                       d / "c.parquet", row_group_size=16)
        args, held = [*args, str(d / "c.parquet")], docs
    return args, held


def split_docs(out: Path, split: str, decode) -> list[str]:
    meta = json.loads((out / "meta.json").read_text())
    dtype = {"uint16": np.uint16, "uint32": np.uint32}[meta["dtype"]]
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=dtype)
                          for s in meta["splits"][split]["shards"]] or [np.zeros(0, dtype)])
    assert len(ids) == 0 or ids[-1] == meta["eos_id"]
    cuts = np.flatnonzero(ids == meta["eos_id"])
    return [decode(ids[a + 1 if k else 0: b]) for k, (a, b) in enumerate(zip([-1, *cuts], cuts))]


def byte_decode(ids) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8")


def check_split(out: Path, held: list[str], decode, norm=lambda d: d) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    train, val = split_docs(out, "train", decode), split_docs(out, "val", decode)
    # meta.json's rule, computed here independently
    expect_val = [d for d in held if int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8)
                                                    .digest(), "little") < VAL * 2**64]
    assert val == [norm(d) for d in expect_val]  # whole documents on both sides, in input order
    assert train == [norm(d) for d in held if d not in expect_val]
    assert 0.1 < len(val) / len(held) < 0.3
    for split, got in (("train", train), ("val", val)):
        assert meta["splits"][split]["documents"] == len(got)
        for s in meta["splits"][split]["shards"]:
            data = (out / s["file"]).read_bytes()
            assert s["bytes"] == len(data) == s["tokens"] * np.dtype(meta["dtype"]).itemsize
            assert s["sha256"] == hashlib.sha256(data).hexdigest()
    return meta


def test_byte_tokenizer_every_format_round_trips(tmp_path, inputs):
    args, held = inputs
    out = tmp_path / "out"
    assert run([*args, "--tokenizer", "byte", "--out", str(out), "--val-fraction", str(VAL),
                "--workers", "2", "--task-mb", "0.004", "--shard-mb", "0.02"]) == 0
    meta = check_split(out, held, byte_decode)
    assert (meta["format"], meta["version"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) \
        == ("plait.tokens", 1, 257, 256, "uint16")
    assert meta["tokenizer"]["name"] == "byte" and len(meta["splits"]["train"]["shards"]) > 1
    assert meta["inputs"]["tasks"] > 4 and "--tokenizer byte" in meta["command"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


@pytest.fixture(scope="session")
def bpe_out(tmp_path_factory, inputs) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "out"
    assert run([*inputs[0], "--tokenizer", "train:400", "--out", str(out), "--val-fraction",
                str(VAL), "--workers", "2", "--task-mb", "0.01"]) == 0
    return out


def test_trained_bpe_round_trips_and_is_deterministic(tmp_path, inputs, bpe_out):
    tok = tokenizers.Tokenizer.from_file(str(bpe_out / "tokenizer.json"))
    meta = check_split(bpe_out, inputs[1], lambda ids: tok.decode(ids.tolist()))
    assert meta["vocab_size"] == tok.get_vocab_size() == 400 and meta["eos_id"] == 0
    assert meta["tokenizer"]["eos_token"] == "<|endoftext|>" and meta["dtype"] == "uint16"
    # one worker, other task cuts: the same tokenizer and the same token stream
    again = tmp_path / "again"
    assert run([*inputs[0], "--tokenizer", "train:400", "--out", str(again), "--val-fraction",
                str(VAL), "--workers", "1"]) == 0
    assert (again / "tokenizer.json").read_bytes() == (bpe_out / "tokenizer.json").read_bytes()
    def stream(o: Path, split: str) -> bytes:
        shards = json.loads((o / "meta.json").read_text())["splits"][split]["shards"]
        return b"".join((o / s["file"]).read_bytes() for s in shards)

    for split in ("train", "val"):
        assert stream(again, split) == stream(bpe_out, split)


def test_given_tokenizer_file_or_folder_and_uint32(tmp_path, inputs):
    """A tokenizer.json whose vocabulary passes 65536 ids: uint32 shards."""
    from tokenizers import models, pre_tokenizers

    held = inputs[1]
    words = sorted({w for d in held for w in d.split()})
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000 - len(vocab))})
    vocab["</s>"] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "model").mkdir()
    tok.save(str(tmp_path / "model" / "tokenizer.json"))
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    out = tmp_path / "out"
    assert run([*inputs[0], "--tokenizer", str(tmp_path / "model"), "--out", str(out),
                "--val-fraction", str(VAL)]) == 0
    meta = check_split(out, held, lambda ids: tok.decode(ids.tolist()),
                       lambda d: " ".join(d.split()))
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint32", 70_001, 70_000)
    # the file itself, with --eos naming the separator (a bare tokenizer.json names none)
    (tmp_path / "model" / "tokenizer_config.json").unlink()
    assert run([inputs[0][0], "--tokenizer", str(tmp_path / "model" / "tokenizer.json"),
                "--out", str(tmp_path / "o2"), "--eos", "</s>"]) == 0
    assert run([inputs[0][0], "--tokenizer", str(tmp_path / "model" / "tokenizer.json"),
                "--out", str(tmp_path / "o3")]) == 2  # no end-of-text token found


def test_jsonl_pieces_read_every_line_once(tmp_path):
    """Cut anywhere (at a line start, one byte before or after it, mid-line), each line is read
    by exactly one piece."""
    from plait.data.sources import plan_tasks, read_documents

    texts = [f"line {i} " + "x" * (i * 7 % 23) for i in range(40)]
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for task_bytes in range(1, 80):
        tasks = plan_tasks([(f, "jsonl")], task_bytes)
        done = []
        got = [d for t in tasks for d in read_documents(t, "text", done.append)]
        assert got == texts and sum(done) == f.stat().st_size, task_bytes


def test_format_overrides_the_suffix(tmp_path):
    f = tmp_path / "notes.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert run([str(f), "--tokenizer", "byte", "--out", str(tmp_path / "o"), "--format", "text",
                "--val-fraction", "0"]) == 0
    assert split_docs(tmp_path / "o", "train", byte_decode) == [f.read_text()]  # one document


def test_bad_inputs_name_the_file_and_the_fix(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    bad, o = str(tmp_path / "bad.jsonl"), str(tmp_path / "o")
    assert run([bad, "--tokenizer", "byte", "--out", o]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2 has no field 'text'" in err and "--field" in err
    assert run([bad, "--tokenizer", "no/such/tokenizer.json", "--out", o]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    assert run([bad, "--tokenizer", "train:12", "--out", o]) == 2
    assert "VOCAB" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_a_prepared_or_busy_folder(tmp_path, inputs, capsys):
    src = inputs[0][0]
    (tmp_path / "empty").mkdir()
    assert run([src, "--tokenizer", "byte", "--out", str(tmp_path / "empty")]) == 0  # empty: fine
    assert run([src, "--tokenizer", "byte", "--out", str(tmp_path / "empty")]) == 2
    assert "already prepared" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert run([src, "--tokenizer", "byte", "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def _nothing_prepared(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if name in p.name] == []


def test_failures_mid_run_leave_nothing_prepared(tmp_path, inputs, monkeypatch, capsys):
    flags = ["--tokenizer", "byte", "--workers", "2", "--task-mb", "0.004"]
    monkeypatch.setenv(FAULT_ENV, "kill:3")  # SIGKILL a worker halfway through its task
    assert run([*inputs[0], *flags, "--out", str(tmp_path / "killed")]) == 1
    assert "worker process" in capsys.readouterr().err
    _nothing_prepared(tmp_path, "killed")
    monkeypatch.delenv(FAULT_ENV)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({"text": f"doc {i} " * 500}) + "\n" for i in range(40))
                      + "{not json\n")
    assert run([*inputs[0], str(broken), *flags, "--out", str(tmp_path / "raised")]) == 2
    assert "broken.jsonl line 41 is not JSON" in capsys.readouterr().err
    _nothing_prepared(tmp_path, "raised")


def _start_stalled(tmp_path: Path, inputs, out: Path) -> subprocess.Popen:
    """`plait data prepare` in a process group of its own, mid-way: task 2's worker sleeps."""
    code = ("import argparse, sys; from plait.data.prepare import add_arguments, main; "
            "ap = argparse.ArgumentParser(); add_arguments(ap); sys.exit(main(ap.parse_args()))")
    p = subprocess.Popen([sys.executable, "-c", code, *inputs[0], "--tokenizer", "byte", "--out",
                          str(out), "--task-mb", "0.004", "--no-progress"],
                         env={**os.environ, FAULT_ENV: "stall:2"}, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(f".{out.name}.tmp-*/part-*")) and time.time() < deadline:
        time.sleep(0.05)
    if p.poll() is not None or time.time() >= deadline:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the run never started writing")
    return p


def test_interrupted_main_process_leaves_nothing_prepared(tmp_path, inputs):
    out = tmp_path / "data"
    proc = _start_stalled(tmp_path, inputs, out)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the workers are stopped, the folder removed
    assert proc.wait(timeout=60) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    proc = _start_stalled(tmp_path, inputs, out)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: a hidden folder stays
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".data.tmp-*"))
    assert run([inputs[0][0], "--tokenizer", "byte", "--out", str(out)]) == 0  # cleans the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_load_corpus_samples_prepared_shards_deterministically(tmp_path, inputs):
    out = tmp_path / "out"
    assert run([*inputs[0], "--tokenizer", "byte", "--out", str(out), "--val-fraction", str(VAL),
                "--shard-mb", "0.02", "--task-mb", "0.004"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    cfg = DataConfig(path=str(out), cache_dir=str(tmp_path / "cache"))
    c = load_corpus(cfg)
    assert (c.vocab_size, c.eos_id) == (257, 256) and isinstance(c.train, ShardedTokens)
    plain = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16)
                            for s in meta["splits"]["train"]["shards"]])
    assert len(c.train) == len(plain) == meta["splits"]["train"]["tokens"]
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, len(plain), size=(200, 2)):
        assert np.array_equal(c.train[min(a, b): max(a, b) + 1], plain[min(a, b): max(a, b) + 1])
    assert c.train[-1] == plain[-1] == 256 and len(c.val) == meta["splits"]["val"]["tokens"]
    x1, y1 = ChunkSampler(c.train, 64, seed=7).batch(10, 16)
    x2, _ = ChunkSampler(load_corpus(cfg).train, 64, seed=7).batch(10, 16)
    ref, _ = ChunkSampler(plain, 64, seed=7).batch(10, 16)  # the sampler over one plain array
    assert x1.equal(x2) and x1.equal(ref) and x1[:, 1:].equal(y1[:, :-1])
    assert not x1.equal(ChunkSampler(c.train, 64, seed=8).batch(10, 16)[0])
    assert load_corpus(cfg, vocab_size=320).vocab_size == 320
    with pytest.raises(ConfigError, match="model.vocab_size = 256 is smaller"):
        load_corpus(cfg, vocab_size=256)


@pytest.fixture
def prepared(tmp_path, inputs):
    out = tmp_path / "out"
    assert run([inputs[0][0], "--tokenizer", "byte", "--out", str(out), "--shard-mb", "0.01",
                "--task-mb", "0.004"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    return out, meta, DataConfig(path=str(out), cache_dir=str(tmp_path / "cache"))


def _rewrite(out: Path, meta: dict) -> None:
    (out / "meta.json").write_text(json.dumps(meta))


def test_corrupt_shards_are_clear_errors(prepared):
    out, meta, cfg = prepared
    first = out / meta["splits"]["train"]["shards"][0]["file"]
    at = re.escape(str(first))
    data = first.read_bytes()
    first.write_bytes(data + b"\0\0")
    with pytest.raises(ConfigError, match=f"{at}.* is {len(data) + 2} bytes.*says {len(data)}"):
        load_corpus(cfg)
    first.write_bytes(data[:2] + bytes([data[2] ^ 1]) + data[3:])  # same size, one bit flipped
    with pytest.raises(ConfigError, match=f"{at}: sha256 .* differs"):
        load_corpus(cfg)
    first.write_bytes(data[:-1])  # an odd length, recorded as such
    meta["splits"]["train"]["shards"][0]["bytes"] = len(data) - 1
    _rewrite(out, meta)
    with pytest.raises(ConfigError, match=f"{at}: {len(data) - 1} bytes is not a whole number"):
        load_corpus(cfg)
    first.write_bytes(data)
    meta["splits"]["train"]["shards"][0]["bytes"] = len(data)
    meta["dtype"] = "uint32"  # wrong dtype: the token count no longer matches the size
    _rewrite(out, meta)
    with pytest.raises(ConfigError, match=f"{at}: .* names the wrong dtype"):
        load_corpus(cfg)
    meta["dtype"], meta["vocab_size"] = "uint16", 256  # the end-of-text id 256 is outside it
    _rewrite(out, meta)
    with pytest.raises(ConfigError, match=f"{at} holds token id 256, not below the vocabulary 256"):
        load_corpus(cfg)
    meta["version"] = 99
    _rewrite(out, meta)
    with pytest.raises(ConfigError, match="format version 99"):
        load_corpus(cfg)


def test_hashes_are_checked_once_per_file_version(prepared, monkeypatch):
    from plait.data import shards

    out, meta, cfg = prepared
    calls = []
    scan = shards._scan
    monkeypatch.setattr(shards, "_scan", lambda *a: calls.append(a[0]) or scan(*a))
    load_corpus(cfg)
    n = len(meta["splits"]["train"]["shards"]) + len(meta["splits"]["val"]["shards"])
    assert len(calls) == n > 1
    load_corpus(cfg)
    assert len(calls) == n  # the cached verdicts: a stat per shard
    first = out / meta["splits"]["train"]["shards"][0]["file"]
    data = first.read_bytes()
    first.write_bytes(data[:-2] + bytes([data[-2] ^ 1, data[-1]]))  # same size, new mtime
    with pytest.raises(ConfigError, match="sha256"):
        load_corpus(cfg)
    assert calls[-1] == first


def test_bare_bin_checks(tmp_path, monkeypatch):
    from plait.data import shards

    f = tmp_path / "tok.bin"
    (np.arange(3001) % 1000).astype(np.uint16).tofile(f)
    cfg = DataConfig(path=str(f), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    at = re.escape(str(f))
    assert load_corpus(cfg).vocab_size == 1000  # max id + 1, scanned once
    monkeypatch.setattr(shards, "_scan", lambda *a: pytest.fail("scanned again"))
    assert load_corpus(cfg, vocab_size=1000).vocab_size == 1000
    with pytest.raises(ConfigError, match=f"{at} holds token id 999, not below model.vocab_size"):
        load_corpus(cfg, vocab_size=999)
    with open(f, "ab") as fh:
        fh.write(b"\1")
    with pytest.raises(ConfigError, match=f"{at}: 6003 bytes is not a whole number of uint16"):
        load_corpus(cfg)
