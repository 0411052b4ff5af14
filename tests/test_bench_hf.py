"""`plait bench hf` at a tiny size (1 repetition of 1 step): the output's structure, both sides'
losses against a single-process reference, and the collectives each side issues."""

from __future__ import annotations

import json

import pytest
import torch

TINY = {"hidden": 64, "ffn": 128, "layers": 2, "vocab": 512, "seq_len": 32, "batch": 2}


def test_bench_hf_tiny(tmp_path):
    pytest.importorskip("transformers", reason="optional dependency transformers (plait's hf "
                                               "extra) is not installed")
    pytest.importorskip("accelerate", reason="optional dependency accelerate (plait's hf extra; "
                                             "transformers' tensor-parallel from_pretrained needs "
                                             "it) is not installed")
    from transformers import AutoModelForCausalLM

    from plait.bench import run_bench

    out, model_dir = tmp_path / "hf.json", tmp_path / "llama"
    argv = ["--ranks", "2", "--reps", "1", "--steps", "1", "--phase-steps", "1", "--profile", "5",
            "--model-dir", str(model_dir), "--json", str(out)]
    for k, v in TINY.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert run_bench("hf", argv) == 0
    [r] = json.loads(out.read_text())

    assert r["tp"] == 2 and len(r["plait_times"]) == len(r["hf_times"]) == 1
    assert r["ratio"] == pytest.approx(r["plait_step_s"] / r["hf_step_s"])
    phases = {f"{p}{c}" for p in ("forward", "loss", "backward", "optimizer") for c in ("", "_cpu")}
    assert set(r["phases_median_s"]["plait"]) == set(r["phases_median_s"]["hf"]) == phases
    assert r["cpu_ratio"] == pytest.approx(r["plait_cpu_s"] / r["hf_cpu_s"])
    assert all(len(p["top"]) == 5 and p["events"] > 0 for p in r["profile"].values())

    # the first step against the model alone in this process, on the worker's batch
    g = torch.Generator().manual_seed(100)
    data = torch.randint(0, TINY["vocab"], (TINY["batch"], TINY["seq_len"] + 1), generator=g)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                              attn_implementation="sdpa")
    with torch.no_grad():
        logits = lm(input_ids=data[:, :-1], use_cache=False).logits
    ref = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten()))
    for side in ("plait", "hf", "hf_sharded"):
        assert r["first_loss"][side] == pytest.approx(ref, rel=1e-5), side
    # every step alike on every side (same weights, batch and AdamW): warm-up, counted, timed,
    # phases, profiled
    for side in ("hf", "hf_sharded"):
        assert len(r["losses"]["plait"]) == len(r["losses"][side]) == 5
        for a, b in zip(r["losses"]["plait"], r["losses"][side]):
            assert a == pytest.approx(b, rel=1e-5), side
    assert r["losses"]["plait"][-1] < r["losses"]["plait"][0]

    c, layers = r["counted"], TINY["layers"]
    # the counter agrees with plait's own accounting on plait's step, byte for byte
    own = c["plait"]["own_accounting"]
    assert c["plait"]["formula_bytes"] == pytest.approx(own["formula_bytes"])
    assert c["plait"]["wire_bytes"] == pytest.approx(own["comm_bytes"])
    assert r["plait_bytes_per_step"] == own["formula_bytes"] > 0
    assert "all_gather" not in c["plait"]["collectives"] and c["plait"]["dtensor_ops"] == 0
    # transformers: the logits gathered once, (n−1)/n of B·T·V fp32; all-reduces: per layer 2 in
    # forward (o, down) and 5 input gradients in backward (q, k, v, gate, up), plus the
    # embedding's forward and the head's input gradient
    hf = c["hf"]
    tokens = TINY["batch"] * TINY["seq_len"]
    assert hf["collectives"] == {"all_reduce": 7 * layers + 2, "all_gather": 1}
    assert hf["formula_bytes_by_op"]["all_gather"] == 0.5 * 4 * tokens * TINY["vocab"]
    assert hf["formula_bytes_by_op"]["all_reduce"] == (7 * layers + 2) * 4 * tokens * TINY[
        "hidden"]
    assert r["hf_bytes_per_step"] == hf["formula_bytes"] and hf["dtensor_ops"] > 0
    # with the head's logits left sharded (loss_parallel) nothing is gathered
    assert "all_gather" not in c["hf_sharded"]["collectives"]
    assert r["hf_sharded"]["bytes_per_step"] == c["hf_sharded"]["formula_bytes"]


def test_missing_accelerate_is_named(monkeypatch):
    import importlib.util

    from plait.bench import hf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(SystemExit, match="accelerate is not installed"):
        hf.main(None)


def _count_collectives() -> dict:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from plait.bench.hf_worker import CountOps
    from plait.mesh import Mesh

    mesh = Mesh.build(dp=1, tp=2, device="cpu")
    dmesh = mesh.to_device_mesh()["tp"]
    x = torch.ones(6, 10)
    mesh.comm.stats.reset_step()
    with CountOps(2) as plait_ops:
        mesh.comm.all_reduce(x.clone(), mesh.tp)
        mesh.comm.all_gather(torch.empty(12, 10), x, mesh.tp)
        mesh.comm.reduce_scatter(torch.empty(3, 10), x.clone(), mesh.tp)
        mesh.comm.all_to_all(torch.empty(6, 10), x, mesh.tp)
    own = mesh.comm.stats.reset_step()
    with CountOps(2) as dtensor_ops:
        DTensor.from_local(x, dmesh, [Partial()]).redistribute(dmesh, [Replicate()]).to_local()
        DTensor.from_local(x, dmesh, [Shard(0)]).redistribute(dmesh, [Replicate()]).to_local()
        DTensor.from_local(x, dmesh, [Partial()]).redistribute(dmesh, [Shard(0)]).to_local()
    return {"own": own, "plait": plait_ops.result(), "dtensor": dtensor_ops.result()}


def test_counter_matches_plait_accounting_and_formulas():
    """The collective counter on plait.comm's four collectives against plait's own accounting,
    and on DTensor's redistributions against the ring formulas (6×10 fp32 = 240 B per rank)."""
    pytest.importorskip("torch.distributed.tensor")
    from plait.testing import run_ranks

    r = run_ranks(_count_collectives, 2, timeout=120)[0]
    own, mine = r["own"], r["plait"]
    assert mine["formula_bytes"] == pytest.approx(own["formula_bytes"]) and own["formula_bytes"] > 0
    assert mine["wire_bytes"] == pytest.approx(own["comm_bytes"])
    by_op = {k.split("/")[0]: v for k, v in own["formula_by_op"].items()}
    assert mine["formula_bytes_by_op"] == pytest.approx(by_op)
    d = r["dtensor"]
    # all-reduce of 240 B: 2(n−1)/n·240; all-gather into 480 B: (n−1)/n·480; reduce-scatter of
    # 240 B: (n−1)/n·240
    assert d["formula_bytes_by_op"] == pytest.approx(
        {"all_reduce": 240.0, "all_gather": 240.0, "reduce_scatter": 120.0})
    assert d["collectives"] == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1}
