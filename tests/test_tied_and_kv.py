"""Weights held by several model-parallel ranks: an embedding tied to the head under a pipeline,
and key/value heads replicated over tensor-parallel ranks (tp > n_kv_heads). plait's GPT.

Parity: each layout trains the tiny GPT for 3 fp32 steps with clipping active on every step and
must equal plain PyTorch in one process (plait.parity.reference: the model, AdamW,
clip_grad_norm_, accumulation by hand), each step's loss and gradient norm and every final
parameter within 1e-5 relative. Layouts of one world size share one spawn (world 2, world 4).
The same runs with the sums of the shared gradients switched off must fail that comparison:
each copy then trains on a part of its gradient.

Checkpoints of a tied pipeline save the weight once, under the embedding's name; those of a
replicated key/value head save its range once and load it into every holder. Either split run
resumes exactly, its checkpoint continues the reference in one process, and a one-process
checkpoint continues it split (every copy and its optimizer state filled from it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from common import DEVICE, TOL, tiny_cfg

from plait import parity
from plait.config import from_dict
from plait.errors import ConfigError
from plait.parallel_spec import Layer
from plait.pipeline.tied import tie_ends
from plait.testing import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CLIP = 0.05  # below every step's gradient norm of these runs (asserted)
TIED = {"tie_embeddings": True}
# the tiny preset: 2 layers, 4 query heads of 8, 2 key/value heads ("kv2"), vocabulary 256
MODELS = {"tied": TIED, "tied4": {**TIED, "n_layers": 4}, "tied257": {**TIED, "vocab_size": 257},
          "kv1": {"n_kv_heads": 1}, "kv2": {}, "tied_kv1": {**TIED, "n_kv_heads": 1}}
# (name, model, parallel section); "nosum-" runs switch the shared-gradient sums off
LAYOUTS = [
    ("pp2-1f1b", "tied", {"pp": 2, "schedule": "1f1b"}),
    ("pp2-zb_h1", "tied", {"pp": 2, "schedule": "zb_h1"}),
    ("pp2-interleaved", "tied4", {"pp": 2, "schedule": "interleaved_1f1b", "virtual_stages": 2}),
    ("tp2", "kv1", {"tp": 2}),
    ("tp2-sp", "kv1", {"tp": 2, "sequence_parallel": True}),
    ("nosum-pp2", "tied", {"pp": 2}),
    ("nosum-tp2", "kv1", {"tp": 2}),
    # world 4
    ("pp2-tp2", "tied257", {"pp": 2, "tp": 2}),
    ("dp2-pp2-zero1", "tied", {"dp": 2, "pp": 2, "zero": 1}),
    ("dp2-pp2-zero3", "tied", {"dp": 2, "pp": 2, "zero": 3}),
    ("tp4", "kv2", {"tp": 4}),
    ("dp2-tp2-zero1", "kv1", {"dp": 2, "tp": 2, "zero": 1}),
    ("dp2-tp2-zero3", "kv1", {"dp": 2, "tp": 2, "zero": 3}),
    ("pp2-tp2-sp", "tied_kv1", {"pp": 2, "tp": 2, "sequence_parallel": True}),
    ("nosum-tp4", "kv2", {"tp": 4}),
]


def cfg_of(corpus_path: str, model: str, **parallel) -> dict:
    return tiny_cfg(corpus_path, model={"preset": "tiny", **MODELS[model]}, parallel=parallel,
                    train={"steps": 3, "val_samples": 0}, optim={"grad_clip": CLIP})


def _world(parallel: dict) -> int:
    return parallel.get("dp", 1) * parallel.get("tp", 1) * parallel.get("pp", 1)


def _run_cases(cases: list[tuple[str, dict]]) -> dict:
    """On every rank: each case (named model-layout), the shared-gradient sums off for the
    "nosum-" layouts."""
    from plait.shared_grads import SharedGrads

    out, summing = {}, SharedGrads.sum
    for name, cfg in cases:
        SharedGrads.sum = (lambda self: None) if "-nosum-" in name else summing
        try:
            out.update(parity.run_cases([(name, cfg)], DEVICE))
        finally:
            SharedGrads.sum = summing
    return out


class _Spawns:
    def __init__(self, corpus_path: str):
        self.corpus_path, self.results = corpus_path, {}

    def get(self, name: str, model: str, parallel: dict):
        key = f"{model}-{name}"
        if key not in self.results:
            world = _world(parallel)
            cases = [(f"{m}-{n}", cfg_of(self.corpus_path, m, **p))
                     for n, m, p in LAYOUTS if _world(p) == world]
            per_rank = run_ranks(_run_cases, world, args=(cases,), timeout=600)
            for case, _ in cases:
                failed = [r[case] for r in per_rank if isinstance(r[case], str)]
                self.results[case] = failed[0] if failed else [r[case] for r in per_rank]
        return self.results[key]


@pytest.fixture(scope="module")
def spawns(corpus_path):
    return _Spawns(corpus_path)


@pytest.fixture(scope="module")
def refs(corpus_path):
    return {m: parity.reference(cfg_of(corpus_path, m), DEVICE) for m in MODELS}


@pytest.mark.parametrize("name,model,parallel", LAYOUTS, ids=[f"{m}-{n}" for n, m, _ in LAYOUTS])
def test_parity(spawns, refs, name, model, parallel):
    ref, got = refs[model], spawns.get(name, model, parallel)
    assert not isinstance(got, str), f"the layout failed:\n{got}"
    assert all(n > CLIP for n in ref["norms"]), f"clipping must be active: {ref['norms']}"
    assert ref["losses"][-1] < ref["losses"][0]  # it trains: the comparison means something
    for rank, res in enumerate(got):
        e = parity.errors(ref, res)
        if name.startswith("nosum-"):  # each copy trained on a part of its gradient
            assert e["param"] > 1e-3 and e["norm"] > 1e-3, f"rank {rank}: {e}"
            continue
        for what in ("loss", "norm", "param"):
            assert e[what] <= TOL[what], (f"rank {rank}: {what} error {e[what]:.2e} (losses "
                                          f"{res['losses']} vs {ref['losses']}; {e})")


def _step_bytes(cases: list[tuple[str, dict]]) -> dict:
    """On every rank: one training step per case; its collectives' bytes by (op, group), by the
    formulas (plait.comm)."""
    from plait.mesh import Mesh
    from plait.shared_grads import SharedGrads
    from plait.train import Trainer

    out, summing = {}, SharedGrads.sum
    for name, d in cases:
        SharedGrads.sum = (lambda self: None) if name.startswith("nosum-") else summing
        try:
            cfg = from_dict(d)
            mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp)
            tr = Trainer(cfg, mesh)
            mesh.comm.stats.reset_step()
            tr.train_step()
            out[name] = dict(mesh.comm.stats.step_formula_by_key)
        finally:
            SharedGrads.sum = summing
    return out


def test_shared_gradient_sums_are_counted(corpus_path):
    """Every byte counted: the tied embedding's all-reduce over `emb` (V × D fp32 on 2 ranks:
    2·(2−1)/2 · 4VD bytes), and the kv sum over tp (k and v of every layer, one kv head of E rows
    × D, one group: 2·(2−1)/2 · 4 · 2LED bytes), against the same run without it."""
    kv = cfg_of(corpus_path, "kv1", tp=2)
    cases = [("tied", cfg_of(corpus_path, "tied", pp=2)), ("kv", kv), ("nosum-kv", kv)]
    V, D, L, E = 256, 32, 2, 8  # the tiny preset: 4 heads of 8
    for rank in run_ranks(_step_bytes, 2, args=(cases,), timeout=300):
        assert rank["tied"][("all_reduce", "emb")] == 4 * V * D
        extra = rank["kv"][("all_reduce", "tp")] - rank["nosum-kv"][("all_reduce", "tp")]
        assert extra == 4 * 2 * L * E * D
        assert ("all_reduce", "emb") not in rank["kv"]


def _load_hf_weights(cases: list[tuple[str, dict]]) -> dict:
    """On every rank: each (directory, parallel section) built from its weights file by
    parallelize() (each rank reads its own slices); the largest difference of any full tensor
    from the file's."""
    from safetensors.torch import load_file

    import plait
    from plait.config import ParallelConfig
    from plait.models import hf

    out = {}
    for d, par in cases:
        mesh = plait.Mesh.build(dp=1, tp=par.get("tp", 1), pp=par.get("pp", 1))
        model, init = hf.build_for_training(d, 0)
        pm, _ = plait.parallelize(model, lambda ps: torch.optim.AdamW(ps), mesh,
                                  plait.ParallelOptions(parallel=ParallelConfig(**par)),
                                  init_weights=init)
        full = pm.full_state_dict()
        saved = load_file(f"{d}/model.safetensors")
        if "transformer.wte.weight" in saved:  # GPT-2's tied head is not in the file
            saved["lm_head.weight"] = saved["transformer.wte.weight"]
        out[d] = max(float((full[f"lm.{k}"] - v).abs().max()) for k, v in saved.items())
    return out


def test_hf_weights_load_into_replicated_kv_heads_and_tied_copies(tmp_path):
    """Each holder of a replicated kv head reads that head's rows of the file (Llama's k/v_proj,
    Phi-3's packed q | k | v), and the last stage's tied copy the embedding's (GPT-2)."""
    from plait.models.hf import build_causal_lm, tiny_config

    cases = []
    for family, over, par in (("llama", {"num_key_value_heads": 1}, {"tp": 2}),
                              ("phi3", {"num_key_value_heads": 1}, {"tp": 2}),
                              ("gpt2", {}, {"pp": 2})):
        torch.manual_seed(7)
        d = str(tmp_path / family)
        build_causal_lm(tiny_config(family, vocab_size=257, **over)).save_pretrained(d)
        cases.append((d, par))
    for rank in run_ranks(_load_hf_weights, 2, args=(cases,), timeout=300):
        assert rank == {d: 0.0 for d, _ in cases}


# -- no processes ----------------------------------------------------------------------------
def _layers(shared: nn.Parameter, where: list[int], n: int = 4) -> list[list[Layer]]:
    mods = [nn.Linear(2, 2, bias=False) for _ in range(n)]
    for s in where:
        mods[s].weight = shared
    return [[Layer((f"m{s}",), (mods[s],))] for s in range(n)]


def test_tie_ends_marks_the_first_and_last_stage():
    w = nn.Parameter(torch.zeros(2, 2))
    stages = _layers(w, [0, 3])  # 4 global stages: pp 2 × v 2, stage 3 on pp rank 1
    assert tie_ends(stages, 2, 0) == [w] and w.plait_tied == "m0.weight"
    assert not w.plait_tied_copy
    w2 = nn.Parameter(torch.zeros(2, 2))
    assert tie_ends(_layers(w2, [0, 3]), 2, 1) == [w2] and w2.plait_tied_copy
    assert w2.plait_tied == "m0.weight"  # the checkpoint name: the first stage's
    with pytest.raises(ConfigError, match=r"stages \[0, 2\]"):
        tie_ends(_layers(nn.Parameter(torch.zeros(2, 2)), [0, 2]), 2, 0)


def _planner(model: dict):
    from plait.planner import Planner, job_from_config, load_cluster

    cfg = from_dict({"model": {"preset": "124m", "vocab_size": 50304, **model},
                     "train": {"global_batch": 16, "seq_len": 256}})
    return Planner(job_from_config(cfg), load_cluster("dgx-a100-80gb"), 8)


def test_planner_counts_the_tied_copy_and_its_sum():
    from plait.planner import Layout

    tied, untied = _planner({"tie_embeddings": True}), _planner({})
    L, one = Layout(dp=4, pp=2, micro_batch=2), Layout(dp=8, micro_batch=2)
    assert not tied.violations(L) and any(c.pp > 1 for c, _ in tied.candidates())
    # under a pipeline the last stage holds the head's copy: as much as an untied head
    for r in (0, 1):
        assert tied.memory(L)[r]["psi"] == untied.memory(L)[r]["psi"]
    # without one the head is the embedding's matrix
    assert untied.memory(one)[0]["psi"] - tied.memory(one)[0]["psi"] == 50304 * 768
    assert tied.evaluate(L)["time"]["shared_grads_s"] > 0
    assert untied.evaluate(L)["time"]["shared_grads_s"] == 0
    assert tied.evaluate(one)["time"]["shared_grads_s"] == 0


def test_planner_replicates_kv_heads_above_tp():
    from plait.planner import Layout

    pl = _planner({"n_kv_heads": 2})  # 12 heads of 64
    L = Layout(dp=1, tp=4, pp=2, micro_batch=2)
    assert not pl.violations(L)
    assert pl.shape.block_shapes(4)[2] == (64, 768)  # one whole kv head on every rank
    assert pl.evaluate(L)["time"]["shared_grads_s"] > 0
    assert pl.evaluate(Layout(dp=4, tp=2, micro_batch=2))["time"]["shared_grads_s"] == 0
    odd = _planner({"n_heads": 12, "n_kv_heads": 3})
    # tp = 2 neither divides 3 kv heads nor is a multiple of them
    assert odd.violations(Layout(dp=2, tp=2, pp=2, micro_batch=2))


# -- checkpoints of weights several ranks hold ----------------------------------------------------
def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run) / "metrics.jsonl").read_text().splitlines()
            if x.strip()]


def _with(d: dict, **sections) -> dict:
    out = json.loads(json.dumps(d))
    for sec, body in sections.items():
        out.setdefault(sec, {}).update(body)
    return out


def _checkpoint_worker(cfg: dict, root: str, from_one: str) -> dict:
    import torch.distributed as dist

    from plait.train import train

    train(from_dict(cfg), f"{root}/whole")
    train(from_dict(_with(cfg, train={"exit_after_steps": 3})), f"{root}/split")
    dist.barrier()
    if dist.get_rank() == 0:  # the split checkpoint of step 3, for the one-process run
        shutil.copytree(f"{root}/split/checkpoints", f"{root}/split_ckpt")
    dist.barrier()
    train(from_dict(cfg), f"{root}/split")
    train(from_dict(_with(cfg, checkpoint={"dir": from_one})), f"{root}/from_one")
    dist.barrier()
    return {k: _losses(f"{root}/{k}") for k in ("whole", "split", "from_one")}


@pytest.mark.parametrize("model,parallel", [("tied", {"pp": 2}), ("kv1", {"tp": 2}),
                                            ("kv1", {"dp": 2, "tp": 2, "zero": 3})],
                         ids=["tied-pp2", "kv1-tp2", "kv1-dp2-tp2-zero3"])
def test_checkpoints_of_shared_weights_resume_and_reshard(corpus_path, tmp_path, model, parallel):
    """tied-pp2: the embedding and the last stage's copy are saved once, under the embedding's
    name. kv1-tp2: the one key/value head, replicated on both tp ranks, is one range of the full
    tensor that both offer (written once) and both read back. Either way: the split run resumes
    exactly, its step-3 checkpoint continues the reference in one process, and a one-process
    checkpoint continues it in the split layout (every holder filled, optimizer state too).
    Under ZeRO-3 the kv weights are also split over dp (gathered to save, scattered on load)."""
    from plait.train import train

    torch.set_num_threads(1)
    base = _with(cfg_of(corpus_path, model), train={"steps": 6})
    one = _with(base, parallel={"dp": 1, "tp": 1, "pp": 1, "zero": 0})
    train(from_dict(_with(one, train={"exit_after_steps": 3})), str(tmp_path / "one"))
    got = run_ranks(_checkpoint_worker, _world(parallel),
                    args=(_with(base, parallel=parallel), str(tmp_path),
                          str(tmp_path / "one" / "checkpoints")), timeout=600)
    train(from_dict(_with(one, checkpoint={"dir": str(tmp_path / "split_ckpt")})),
          str(tmp_path / "to_one"))
    ref = parity.reference(base, DEVICE)["losses"]
    for r in got:
        assert r["split"] == r["whole"], "the resumed split run differs"
        assert len(r["whole"]) == 6 and len(r["from_one"]) == 3
    for name, losses in (("one -> split", got[0]["from_one"]),
                         ("split -> one", _losses(tmp_path / "to_one"))):
        assert len(losses) == 3, (name, losses)
        for step, (a, b) in enumerate(zip(losses, ref[3:]), start=4):
            assert abs(a - b) / abs(b) <= TOL["loss"], f"{name}, step {step}: {a} vs {b}"
    for a, b in zip(got[0]["whole"], ref):
        assert abs(a - b) / abs(b) <= TOL["loss"], (got[0]["whole"], ref)
