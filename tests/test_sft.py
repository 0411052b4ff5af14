"""Fine-tuning data: `plait data prepare --format sft` (records -> tokens + loss mask) and training
on it, where only the trained targets count: each layout's loss is the sum over trained targets
divided by the global batch's count of them, equal to the plain single-process reference."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from common import DEVICE, assert_parity, tiny_cfg

from plait import parity
from plait.config import DataConfig
from plait.data import load_corpus
from plait.data.prepare import add_arguments, main
from plait.data.sampler import ChunkSampler
from plait.errors import ConfigError
from plait.testing import run_ranks

EOS = 256  # the byte tokenizer's end-of-text id


def prepare(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    return main(ap.parse_args([*argv, "--no-progress"]))


RECORDS = [
    {"prompt": "Q: what is 2+2?\nA:", "response": " 4"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                  {"role": "assistant", "content": "see you"}]},
    {"prompt": "héllo ", "response": "wörld ✓"},
    {"messages": [{"role": "user", "content": "only a question"}]},
]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _read(out: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    meta = json.loads((out / "meta.json").read_text())
    shards = meta["splits"]["train"]["shards"]
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in shards])
    mask = np.concatenate([np.fromfile(out / s["loss_mask"]["file"], dtype=np.uint8)
                           for s in shards])
    return meta, ids, mask


def test_byte_records_prompt_response_and_messages(tmp_path):
    out = tmp_path / "out"
    assert prepare([str(_write(tmp_path / "r.jsonl", RECORDS)), "--tokenizer", "byte", "--out",
                    str(out), "--format", "sft", "--val-fraction", "0"]) == 0
    meta, ids, mask = _read(out)
    assert meta["input_format"] == "sft" and meta["sft"]["rendering"].startswith("plain")
    assert meta["version"] == 2  # a reader of version 1 only would train on the prompts: it refuses
    assert len(ids) == len(mask) == meta["splits"]["train"]["tokens"]
    for s in meta["splits"]["train"]["shards"]:
        m = s["loss_mask"]
        data = (out / m["file"]).read_bytes()
        assert (m["dtype"], m["bytes"], m["sha256"]) == \
            ("uint8", s["tokens"], hashlib.sha256(data).hexdigest())
    ends = np.flatnonzero(ids == EOS)
    assert len(ends) == len(RECORDS) == meta["splits"]["train"]["documents"]
    text, trained, start = [], [], 0
    for end in ends:
        rec = ids[start:end].astype(np.uint8).tobytes().decode()
        text.append(rec)
        trained.append(bytes(int(i) for i, m in zip(ids[start:end], mask[start:end]) if m)
                       .decode())
        start = end + 1
    assert text == ["Q: what is 2+2?\nA: 4",
                    "system: be brief\nuser: hi\nassistant: hello\nuser: bye\nassistant: see you\n",
                    "héllo wörld ✓", "user: only a question\n"]
    assert trained == [" 4", "hello\nsee you\n", "wörld ✓", ""]
    # a record's end-of-text is trained when its last token is: not after a user turn
    assert mask[ends].tolist() == [1, 1, 1, 0]


def _chat_tokenizer(tmp_path: Path) -> Path:
    """A BPE trained here, with ChatML special tokens and a chat template beside it."""
    tokenizers = pytest.importorskip("tokenizers")
    from plait.data.tokenizer import train_bpe

    words = "the a of to plait data token mask model hello see you brief".split()
    rng = random.Random(1)
    texts = [" ".join(rng.choices(words, k=8)) for _ in range(300)]
    folder = tmp_path / "chat-tok"
    folder.mkdir()
    train_bpe(iter(texts), 300, folder / "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|endoftext|>"}))
    return folder


def test_chat_template_renders_messages_and_masks_assistant_turns(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    folder = _chat_tokenizer(tmp_path)
    out = tmp_path / "out"
    assert prepare([str(_write(tmp_path / "r.jsonl", RECORDS[1:2])), "--tokenizer", str(folder),
                    "--out", str(out), "--format", "sft", "--val-fraction", "0"]) == 0
    meta, ids, mask = _read(out)
    assert meta["sft"]["rendering"] == "the chat template of tokenizer_config.json"
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert list(ids).count(start) == 5 and list(ids).count(end) == 5  # special tokens are tokens
    assert ids[-1] == meta["eos_id"] and len(ids) == len(mask)

    def decode(sel):
        return tok.decode([int(i) for i in sel], skip_special_tokens=False)

    assert decode(ids[:-1]) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi"
                                "<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                                "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nsee you"
                                "<|im_end|>\n")
    assert decode(ids[mask == 1]) == "hello<|im_end|>\nsee you<|im_end|>\n<|endoftext|>"


def test_bad_records_name_the_line_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert prepare([str(bad), "--tokenizer", "byte", "--out", str(tmp_path / "o"), "--format",
                    "sft"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2" in err and "prompt and response, or messages" in err
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert prepare([str(bad), "--tokenizer", "byte", "--out", str(tmp_path / "o"), "--format",
                    "sft"]) == 2
    assert "messages[0]" in capsys.readouterr().err and not (tmp_path / "o").exists()


# -- sampling and training ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    """Question / answer records, about one per 32-token sequence, a third of the tokens trained."""
    d = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    words = "the a of to plait pipeline tensor data token mask attention model".split()
    recs = [{"prompt": "Q: " + " ".join(rng.choices(words, k=rng.randint(2, 5))) + "?\nA:",
             "response": " " + " ".join(rng.choices(words, k=rng.randint(1, 3)))}
            for _ in range(1500)]
    out = d / "prepared"
    assert prepare([str(_write(d / "qa.jsonl", recs)), "--tokenizer", "byte", "--out", str(out),
                    "--format", "sft", "--val-fraction", "0.05", "--workers", "1"]) == 0
    return str(out)


def test_masked_targets_are_ignored_and_counted(sft_data, tmp_path):
    c = load_corpus(DataConfig(path=sft_data, cache_dir=str(tmp_path)))
    assert c.train_mask is not None and len(c.train_mask) == len(c.train)
    s = c.sampler("train", 32, seed=3)
    x, y = s.batch(5, 8)
    plain_x, plain_y = ChunkSampler(c.train, 32, seed=3).batch(5, 8)
    masked = y == -100
    assert x.equal(plain_x) and y[~masked].equal(plain_y[~masked])
    mask = ChunkSampler(c.train_mask, 32, seed=3).batch(5, 8)[1]  # the same windows of the mask
    assert masked.equal(mask == 0)
    assert s.target_count(5, 8) == int((~masked).sum())
    assert 0.1 < s.target_count(0, 64) / (64 * 32) < 0.7  # masking matters for the divisor
    none = ChunkSampler(c.train, 32, seed=3, loss_mask=np.zeros(len(c.train), np.uint8))
    with pytest.raises(ConfigError, match="no trained target"):
        none.global_targets(0, 8)


LAYOUTS = {"dp2": {"dp": 2}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}


def test_training_in_every_layout_matches_the_plain_reference(sft_data):
    ref = parity.reference(tiny_cfg(sft_data), DEVICE)
    cases = [(name, tiny_cfg(sft_data, parallel=par)) for name, par in LAYOUTS.items()]
    per_rank = run_ranks(parity.run_cases, 2, args=(cases, DEVICE), timeout=600)
    for name, _ in cases:
        for rank, got in enumerate(r[name] for r in per_rank):
            assert not isinstance(got, str), f"{name} failed on rank {rank}:\n{got}"
            try:
                assert_parity(ref, got)
                assert abs(got["val"] - ref["val"]) / ref["val"] <= 1e-5
            except AssertionError as e:
                raise AssertionError(f"{name}, rank {rank}: {e}") from e


def test_dividing_by_every_token_fails_the_comparison(sft_data, monkeypatch):
    """The check can fail: the same run with the divisor of all tokens, not the trained ones."""
    cfg = tiny_cfg(sft_data)
    ref = parity.reference(cfg, DEVICE)
    assert_parity(ref, parity.single_process(cfg, DEVICE))
    monkeypatch.setattr(ChunkSampler, "global_targets", lambda self, start, n: n * self.seq_len)
    with pytest.raises(AssertionError, match="relative error"):
        assert_parity(ref, parity.single_process(cfg, DEVICE))
