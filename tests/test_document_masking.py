"""data.document_masking: attention stays within each document of a packed sequence and RoPE
positions restart at each one, in the plain model and in every layout.

- the plain GPT (no plait parallel code) on a packed sequence gives each document's tokens the
  losses that document gets when run alone (and without positions it does not: the check can
  fail);
- training with document masking at dp2, tp2 with sequence parallelism (also with selective
  activation checkpointing, which recomputes the masked attention core) and pp2 (1f1b) equals
  the single-process plain-PyTorch reference that builds the same masks; the reference without
  masking differs, so a layout that dropped the mask would fail.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, assert_parity, tiny_cfg

from plait import parity
from plait.config import DataConfig, from_dict
from plait.data import load_corpus
from plait.data.sampler import ChunkSampler, document_positions
from plait.errors import ConfigError
from plait.models import GPT, build_config
from plait.testing import run_ranks

EOS = 256  # the byte tokenizer's end-of-text id in prepared data


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(build_config("tiny", vocab_size=257, max_seq_len=64)).eval()


def _packed(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Documents of random bytes, each but the last ending with EOS, and their concatenation."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(0, 256, (n,), generator=g), torch.tensor([EOS])])
            for n in lengths]
    docs[-1] = docs[-1][:-1]
    return torch.cat(docs), docs


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")


def test_positions_restart_after_each_end_of_text():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 2, 3, 4, 5, 6, 7]])
    assert document_positions(x, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1],
                                                   [0, 0, 1, 2, 3, 4, 5, 6]]


@torch.no_grad()
def test_packed_documents_equal_each_document_alone():
    model = _model()
    seq, docs = _packed([9, 14, 1, 20])  # 47 tokens: the last one is only a target
    x, y = seq[None, :-1], seq[None, 1:]
    losses = _token_losses(model(x, document_positions(x, EOS)), y)
    plain = _token_losses(model(x), y)
    at, worst, unmasked_gap = 0, 0.0, 0.0
    for k, doc in enumerate(docs):
        n = len(doc) if k < len(docs) - 1 else len(doc) - 1  # tokens of doc k that are inputs
        alone_in = seq[None, at: at + n]
        alone = _token_losses(model(alone_in), seq[None, at + 1: at + n + 1])
        worst = max(worst, float((losses[at: at + n] - alone).abs().max()))
        if k:  # the first document has nothing before it: only later ones can see too much
            unmasked_gap = max(unmasked_gap, float((plain[at: at + n] - alone).abs().max()))
        at += n
    assert at == x.shape[1]
    assert worst <= 1e-5, f"packed vs alone: max |Δ per-token loss| = {worst:.3e}"
    # the check can fail: without positions attention crosses the boundaries and RoPE runs on
    assert unmasked_gap > 1e-3, f"without the mask the losses should differ, by {unmasked_gap}"


@torch.no_grad()
def test_batch_rows_keep_their_own_documents():
    model = _model()
    a, _ = _packed([5, 12, 14], seed=4)
    b, _ = _packed([33], seed=5)
    x = torch.stack([a[:-1], b[:-1]])
    both = model(x, document_positions(x, EOS))
    assert torch.allclose(both[1], model(x[1:])[0], atol=1e-5)  # one document: plain causal
    assert torch.allclose(both[0], model(x[:1], document_positions(x[:1], EOS))[0], atol=1e-5)


# -- training in every layout against the plain reference ----------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """Short documents (4-40 bytes), several per 32-token sequence, byte-tokenized."""
    from plait.data.prepare import add_arguments, main

    d = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    words = "the a of to plait pipeline tensor data token mask attention model".split()
    lines = [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, 7)))})
             for _ in range(2500)]
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    import argparse

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    out = d / "prepared"
    assert main(ap.parse_args([str(d / "docs.jsonl"), "--tokenizer", "byte", "--out", str(out),
                               "--val-fraction", "0.05", "--workers", "1", "--no-progress"])) == 0
    return str(out)


def _cfg(path: str, masking: bool = True, **parallel) -> dict:
    cfg = tiny_cfg(path, parallel=parallel)
    cfg["data"]["document_masking"] = masking
    return cfg


LAYOUTS = {
    "dp2": {"dp": 2},
    "tp2-sp": {"tp": 2, "sequence_parallel": True},
    "tp2-sp-selective": {"tp": 2, "sequence_parallel": True},
    "pp2-1f1b": {"pp": 2, "schedule": "1f1b"},
}


def test_documents_are_packed_several_per_sequence(prepared, tmp_path):
    c = load_corpus(DataConfig(path=prepared, cache_dir=str(tmp_path)))
    x, y, pos = c.sampler("train", 32, seed=1, document_masking=True).batch(0, 8)
    assert int((pos == 0).sum()) >= 2 * 8  # the mask has boundaries to keep
    assert pos.equal(document_positions(x, EOS)) and x[:, 1:].equal(y[:, :-1])
    assert len(ChunkSampler(c.train, 32, seed=1).batch(0, 8)) == 2  # without it: (x, y)


def test_training_in_every_layout_matches_the_plain_reference(prepared):
    ref = parity.reference(_cfg(prepared), DEVICE)
    unmasked = parity.reference(_cfg(prepared, masking=False), DEVICE)
    gap = max(abs(a - b) / b for a, b in zip(ref["losses"], unmasked["losses"]))
    assert gap > 1e-3, f"the mask must change the run for the comparison to mean anything: {gap}"
    cases = []
    for name, par in LAYOUTS.items():
        cfg = _cfg(prepared, **par)
        if name.endswith("selective"):
            cfg["train"]["activation_checkpointing"] = "selective"
        cases.append((name, cfg))
    per_rank = run_ranks(parity.run_cases, 2, args=(cases, DEVICE), timeout=600)
    for name, _ in cases:
        for rank, got in enumerate(r[name] for r in per_rank):
            assert not isinstance(got, str), f"{name} failed on rank {rank}:\n{got}"
            try:
                assert_parity(ref, got)
                assert abs(got["val"] - ref["val"]) / ref["val"] <= 1e-5
            except AssertionError as e:
                raise AssertionError(f"{name}, rank {rank}: {e}") from e


def test_document_masking_needs_prepared_data(corpus_path):
    with pytest.raises(ConfigError, match="data.document_masking"):
        from_dict(_cfg(corpus_path))


# -- transformers models (model.hf) --------------------------------------------------------------
HF_FAMILIES = ("llama", "gpt2", "gemma", "phi3")  # RoPE x3 (Gemma scaled), learned positions


@torch.no_grad()
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_packed_documents_equal_each_document_alone(family):
    """plait's wrapper gives a transformers model the documents' positions: each document's
    logits equal those of the document run alone by the model's plain forward; without positions
    they do not."""
    from plait.models.hf import CausalLM, build_causal_lm, tiny_config

    torch.manual_seed(0)
    model = CausalLM(build_causal_lm(tiny_config(family, vocab_size=257))).eval()
    seq, docs = _packed([9, 14, 1, 20])
    x = seq[None, :-1]
    packed, plain = model(x, document_positions(x, EOS)), model(x)
    at, worst, gap = 0, 0.0, 0.0
    for k, doc in enumerate(docs):
        n = len(doc) if k < len(docs) - 1 else len(doc) - 1
        alone = model.lm(input_ids=seq[None, at: at + n], use_cache=False).logits[0]
        worst = max(worst, float((packed[0, at: at + n] - alone).abs().max()))
        if k:
            gap = max(gap, float((plain[0, at: at + n] - alone).abs().max()))
        at += n
    assert worst <= 1e-5, f"{family}: packed vs alone, max |Δ logit| = {worst:.3e}"
    assert gap > 1e-3, f"{family}: without positions the logits should differ ({gap})"


HF_LAYOUTS = {  # name: (family, parallel); GPT-2 refuses sequence parallelism
    "llama-dp2": ("llama", {"dp": 2}),
    "llama-tp2-sp": ("llama", {"tp": 2, "sequence_parallel": True}),
    "llama-pp2-1f1b": ("llama", {"pp": 2, "schedule": "1f1b"}),
    "gpt2-tp2": ("gpt2", {"tp": 2}),
    "gpt2-pp2-1f1b": ("gpt2", {"pp": 2, "schedule": "1f1b"}),
}


def test_transformers_models_train_with_document_masking_in_every_layout(prepared, tmp_path):
    """model.hf with data.document_masking at dp2, tp2 (+ sequence parallelism), pp2 against the
    plain reference of tests/test_hf_models.py given explicit block-diagonal masks: each step's
    loss and gradient norm and every final parameter within 1e-5 (pp2 builds the stage's mask
    itself, plait.models.hf_spec; the others pass positions to the model's own forward)."""
    from test_hf_models import _check, base_cfg, reference, step_batches

    from plait.models.hf import tiny_config

    dirs, refs, cases = {}, {}, []
    for family in ("llama", "gpt2"):
        dirs[family] = str(tmp_path / family)
        tiny_config(family, vocab_size=257).save_pretrained(dirs[family])
        cfg = base_cfg(prepared, dirs[family])
        cfg["data"] = {"path": prepared, "document_masking": True}
        steps = step_batches(cfg)
        assert len(steps[0][0]) == 3 and int((steps[0][0][2] == 0).sum()) >= 4
        refs[family] = reference(dirs[family], steps, from_dict(cfg).train.seed)
        cfg_off = {**cfg, "data": {"path": prepared}}
        off = reference(dirs[family], step_batches(cfg_off), from_dict(cfg).train.seed)
        gap = max(abs(a - b) / b for a, b in zip(refs[family]["losses"], off["losses"]))
        assert gap > 1e-3, f"{family}: the mask must change the run ({gap})"
    for name, (family, par) in HF_LAYOUTS.items():
        cfg = base_cfg(prepared, dirs[family], **par)
        cfg["data"] = {"path": prepared, "document_masking": True}
        cases.append((name, cfg))
    per_rank = run_ranks(parity.run_cases, 2, args=(cases, DEVICE), timeout=600)
    for name, _ in cases:
        got = [r[name] for r in per_rank]
        _check(refs[HF_LAYOUTS[name][0]], next((g for g in got if isinstance(g, str)), got), name)
