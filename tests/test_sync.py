"""Sync strategies (plait.sync) on real processes: exact bytes, the cases they reduce to, training
through the trainer, composition with tensor and pipeline parallelism, checkpointed outer state."""

import io
import math
import time

import pytest
import torch
from common import assert_parity, reference, tiny_cfg, train_run

from plait.config import SyncConfig, from_dict
from plait.errors import ConfigError
from plait.parity import errors as parity_errors
from plait.testing import run_ranks

N_REPLICAS = 4
RING = 2 * (N_REPLICAS - 1) / N_REPLICAS  # ring all-reduce: bytes sent per rank per byte reduced
B_PER_ELEM = {"none": 4.0, "fp16": 2.0, "int8": 1 + 4 / 256, "fp4": 0.5 + 4 / 64}  # scales included
BLOCK = {"none": 1, "fp16": 1, "int8": 256, "fp4": 64}


# -- exact bytes, 4 replicas, a loop of our own (no other traffic) -----------------------------
BYTE_CASES = {  # name: (sync settings, total_steps or None for an endless cadence then flush())
    "every_step": ({"strategy": "every_step"}, 8),
    "local_sgd": ({"strategy": "local_sgd", "every": 4}, 8),
    "diloco": ({"strategy": "diloco", "every": 4}, 8),
    "diloco_fp16": ({"strategy": "diloco", "every": 4, "quantize": "fp16"}, 8),
    "diloco_int8": ({"strategy": "diloco", "every": 4, "quantize": "int8"}, 8),
    "diloco_fp4": ({"strategy": "diloco", "every": 4, "quantize": "fp4"}, 8),
    "streaming": ({"strategy": "streaming_diloco", "every": 4, "fragments": 2, "delay": 1}, None),
    "streaming_int8_final": ({"strategy": "streaming_diloco", "every": 4, "fragments": 2,
                              "delay": 1, "quantize": "int8"}, 8),
    "delayed": ({"strategy": "delayed", "delay": 1}, 8),
}
STEPS = 8


def _bytes_worker(cases: dict, steps: int) -> dict:
    from plait.config import SyncConfig
    from plait.mesh import Mesh
    from plait.models.gpt import GPT, build_config
    from plait.parallelize import ParallelOptions, parallelize
    from plait.sync import average, make_codec

    mesh = Mesh.build(dp=N_REPLICAS)
    out = {}
    for name, (sync, total) in cases.items():
        torch.manual_seed(0)
        model = GPT(build_config("tiny", vocab_size=64))
        pm, opt = parallelize(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), mesh,
                              ParallelOptions(sync=SyncConfig(**sync), total_steps=total))
        gen = torch.Generator().manual_seed(100 + mesh.dp_index)
        mesh.comm.stats.reset_step()
        per_step, keys = [], set()
        for _ in range(steps):
            x = torch.randint(0, 64, (2, 17), generator=gen)
            (pm.loss(pm(x[:, :-1]), x[:, 1:], reduction="sum") / (2 * 16 * N_REPLICAS)).backward()
            opt.step()
            opt.zero_grad()
            st = mesh.comm.stats.reset_step()
            # the formulas; comm_bytes adds gloo's framing, 144 B a message (plait.comm)
            per_step.append(st["formula_bytes"])
            keys |= set(st["by_op"])
        if total is None:
            opt.sync.flush()
            per_step[-1] += mesh.comm.stats.reset_step()["formula_bytes"]
            opt.sync.close()
        flat = torch.cat([p.detach().reshape(-1) for p in pm.parameters()])
        out[name] = {"bytes": per_step, "numel": flat.numel(), "params": flat, "keys": keys}
    # the quantized averages themselves: close to the exact mean, identical on every replica
    g = torch.Generator().manual_seed(7 + mesh.rank)
    x = torch.randn(4096, generator=g) * torch.logspace(-3, 0, 4096)
    exact = x.clone()
    mesh.comm.all_reduce(exact, mesh.dp, op="avg")
    out["codecs"] = {q: average(x.clone(), mesh.dp, mesh.comm, make_codec(q))
                     for q in ("fp16", "int8", "fp4")}
    out["exact"] = exact
    return out


@pytest.fixture(scope="module")
def byte_runs():
    return run_ranks(_bytes_worker, N_REPLICAS, args=(BYTE_CASES, STEPS), timeout=240)


def _padded(numel: int, fragments: int, quantize: str) -> int:
    """Elements per fragment: equal fragments, each a multiple of replicas × codec block."""
    unit = fragments * (N_REPLICAS * BLOCK[quantize] if quantize != "none" else 1)
    return math.ceil(numel / unit) * unit // fragments


def test_sync_bytes_match_the_formulas(byte_runs):
    r0 = byte_runs[0]
    N = r0["every_step"]["numel"]
    full = RING * 4 * N  # one fp32 all-reduce of every parameter
    H = 4
    assert r0["every_step"]["bytes"] == [full] * STEPS
    for name in ("local_sgd", "diloco"):
        assert r0[name]["bytes"] == [0, 0, 0, full] * 2, name
        assert sum(r0[name]["bytes"]) / STEPS == full / H
    for q in ("fp16", "int8", "fp4"):
        got = r0[f"diloco_{q}"]["bytes"]
        sync_q = RING * _padded(N, 1, q) * B_PER_ELEM[q]
        assert got == [0, 0, 0, sync_q] * 2, q
        # padding only
        assert sum(got) / STEPS == pytest.approx(full / H * B_PER_ELEM[q] / 4, rel=0.04)
    # streaming, P = 2, H = 4, τ = 1: fragments sent at 2, 4, 6, 8
    # and counted when applied a step later
    frag = RING * 4 * _padded(N, 2, "none")
    assert 2 * frag == full  # each fragment's peak is 1/P of the full sync
    # the last one by flush()
    assert r0["streaming"]["bytes"] == [0, 0, frag, 0, frag, 0, frag, frag]
    assert sum(r0["streaming"]["bytes"]) / STEPS == full / H
    # with a known run length the last step also syncs the fragment not in flight (consensus)
    frag_q = RING * _padded(N, 2, "int8") * B_PER_ELEM["int8"]
    assert r0["streaming_int8_final"]["bytes"] == [0, 0, frag_q, 0, frag_q, 0, frag_q, 2 * frag_q]
    # delayed: one full all-reduce per step, each counted in the step that applies it
    assert r0["delayed"]["bytes"] == [0] + [full] * 6 + [2 * full]
    # background traffic runs on the strategy's own group
    assert r0["streaming"]["keys"] == {"all_reduce/dp_bg"}
    assert r0["streaming_int8_final"]["keys"] == {"all_to_all/dp_bg", "all_gather/dp_bg"}
    assert r0["diloco"]["keys"] == {"all_reduce/dp"}
    for r in byte_runs[1:]:  # every rank sends the same
        assert all(r[k]["bytes"] == r0[k]["bytes"] for k in BYTE_CASES)


def test_replicas_end_equal_and_quantized_means_are_close(byte_runs):
    for name, (_, total) in BYTE_CASES.items():
        if total is not None:
            for r in byte_runs[1:]:
                torch.testing.assert_close(r[name]["params"], byte_runs[0][name]["params"],
                                           rtol=0, atol=0)
    exact = byte_runs[0]["exact"]
    for q, tol in (("fp16", 1e-3), ("int8", 2e-2), ("fp4", 0.25)):
        got = byte_runs[0]["codecs"][q]
        for r in byte_runs[1:]:
            assert torch.equal(r["codecs"][q], got), q  # the same bits on every replica
        assert float((got - exact).norm() / exact.norm()) < tol, q


# -- reductions to known cases and training through the trainer, 2 replicas -----------------
def _cases_worker(cases: list) -> list:
    from plait.mesh import Mesh
    from plait.train import Trainer

    out = []
    for kind, cfg in cases:
        if kind == "steps":
            out.append(train_run(cfg))
            continue
        c = from_dict(cfg)
        tr = Trainer(c, Mesh.build(c.parallel.dp, c.parallel.tp, c.parallel.pp, device="cpu"))
        first = tr.evaluate()
        tr.mesh.comm.stats.reset_step(0)
        out.append({"first_val": first, **tr.run(None), "state": tr.full_state()})
    return out


def _cfg(corpus_path, sync, steps=6, optim=None, parallel=None, train=None):
    return tiny_cfg(corpus_path, parallel={"dp": 2, **(parallel or {})},
                    train={"steps": steps, "micro_batch": 2, **(train or {})}, optim=optim or {},
                    sync=sync)


SGD = {"name": "sgd", "momentum": 0.0, "grad_clip": 0.0}
SGD_M = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
STRATEGIES = {
    "every_step": {"strategy": "every_step"},
    "local_sgd": {"strategy": "local_sgd", "every": 3},
    "diloco": {"strategy": "diloco", "every": 3},
    "streaming_diloco": {"strategy": "streaming_diloco", "every": 4, "fragments": 2, "delay": 1,
                         "quantize": "int8"},
    "delayed": {"strategy": "delayed"},
}


@pytest.fixture(scope="module")
def dp_runs(corpus_path):
    cases = [
        ("steps", _cfg(corpus_path, {"strategy": "local_sgd", "every": 1}, optim=SGD)),
        ("steps", _cfg(corpus_path, {"strategy": "local_sgd", "every": 2})),
        ("steps", _cfg(corpus_path, {"strategy": "diloco", "every": 2, "outer_lr": 1.0,
                                     "outer_momentum": 0.0})),
        ("steps", _cfg(corpus_path, {"strategy": "diloco", "every": 2})),
        ("steps", _cfg(corpus_path, {"strategy": "delayed"})),
        ("steps", _cfg(corpus_path, {"strategy": "diloco", "every": 2}, optim=SGD_M)),
    ] + [("run", _cfg(corpus_path, s, steps=12, train={"val_samples": 16}))
         for s in STRATEGIES.values()]
    got = run_ranks(_cases_worker, 2, args=(cases,), timeout=300)
    names = ["local1", "local2", "diloco_avg", "diloco", "delayed", "diloco_sgd",
             *(f"run_{n}" for n in STRATEGIES)]
    return dict(zip(names, zip(*got)))  # name -> (rank 0's result, rank 1's result)


def test_local_sgd_h1_with_sgd_is_plain_data_parallelism(corpus_path, dp_runs):
    # SGD without momentum, averaging after every step: the single-process run of the global batch
    ref = reference(_cfg(corpus_path, {"strategy": "every_step"}, optim=SGD))
    for r in dp_runs["local1"]:
        assert_parity(ref, r)


def test_diloco_outer_lr1_no_momentum_is_parameter_averaging(dp_runs):
    # θ_g − lr·mean(θ_g − θ_local) with lr 1 is mean(θ_local): local SGD,
    # whatever the inner optimizer (AdamW)
    for a, b in zip(dp_runs["diloco_avg"], dp_runs["local2"]):
        assert_parity(b, a)
    # the Nesterov outer step is something else
    d = (dp_runs["diloco"][0]["state"]["lm_head.weight"]
         - dp_runs["local2"][0]["state"]["lm_head.weight"])
    assert float(d.norm()) > 1e-4


def test_delayed_matches_plain_pytorch_with_stale_gradients(corpus_path, dp_runs):
    # every replica steps on the same summed (one-step-old) gradient: plain PyTorch that keeps
    # each step's gradient and applies it one step later (plait.parity.plain_reference), and
    # the same single process updating on fresh gradients differs (the check can fail)
    ref = reference(_cfg(corpus_path, {"strategy": "delayed"}))
    fresh = reference(_cfg(corpus_path, {"strategy": "every_step"}))
    assert parity_errors(ref, fresh)["param"] > 1e-3
    # between agreements (every sync.every steps) each replica logs its own loss:
    # their mean is the run's
    mean = [sum(x) / len(x) for x in zip(*(r["losses"] for r in dp_runs["delayed"]))]
    for r in dp_runs["delayed"]:
        assert_parity(ref, {**r, "losses": mean})


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_trains_through_the_trainer(dp_runs, name):
    s0, s1 = dp_runs[f"run_{name}"]
    assert s0["final_val_loss"] < s0["first_val"] - 0.5, s0  # loss falls, no hang
    assert s0["state"].keys() == s1["state"].keys()
    for k, v in s0["state"].items():  # replicas end equal: every parameter, bit for bit
        assert torch.equal(v, s1["state"][k]), k
    assert s0["steps"] == 12 and s0["comm_bytes_per_step"] > 0
    if name in ("local_sgd", "diloco", "streaming_diloco"):
        assert s0["comm_bytes_per_step"] < dp_runs["run_every_step"][0]["comm_bytes_per_step"] / 2


# -- composed with tensor and pipeline parallelism: dp 2 × tp 2 and dp 2 × pp 2 ----------------
@pytest.mark.parametrize("inner", ["tp", "pp"])
def test_diloco_and_delayed_compose_with_model_parallelism(corpus_path, dp_runs, inner):
    cases = [("steps", _cfg(corpus_path, {"strategy": "diloco", "every": 2}, optim=SGD_M,
                            parallel={inner: 2})),
             ("steps", _cfg(corpus_path, {"strategy": "delayed"}, parallel={inner: 2}))]
    got = run_ranks(_cases_worker, 4, args=(cases,), timeout=300)
    # the same run as dp 2 alone (the parameters gathered back to full shape), replica by replica
    for rank in got:
        assert_parity(dp_runs["diloco_sgd"][rank[0]["dp_index"]], rank[0])
        assert_parity(dp_runs["delayed"][rank[1]["dp_index"]], rank[1])


# -- single process: checkpointed outer state, straggler option, config errors ---------------
@pytest.mark.parametrize("sync", [{"strategy": "diloco", "every": 2},
                                  {"strategy": "streaming_diloco", "every": 2, "fragments": 2,
                                   "delay": 1}])
def test_outer_state_round_trips_through_a_checkpoint(corpus_path, sync):
    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = from_dict(_cfg(corpus_path, sync, steps=6, parallel={"dp": 1}))
    torch.set_num_threads(1)
    whole = Trainer(cfg, Mesh.single())
    for _ in range(6):
        whole.train_step()
    first = Trainer(cfg, Mesh.single())
    for _ in range(3):  # step 3: a fragment of the streaming run is in flight
        first.train_step()
    buf = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "opt": first.optimizer.state_dict()}, buf)
    first.optimizer.sync.close()
    assert "theta_global" in first.optimizer.state_dict()["sync"]
    second = Trainer(cfg, Mesh.single())
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    second.model.load_state_dict(ck["model"])
    second.optimizer.load_state_dict(ck["opt"])
    second.state.step, second.state.samples = 3, 3 * cfg.train.global_batch
    for _ in range(3):
        second.train_step()
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_flush_applies_in_flight_exchanges_and_training_goes_on():
    from plait.mesh import Mesh
    from plait.parallelize import ParallelOptions, parallelize

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    sync = SyncConfig(strategy="streaming_diloco", every=2, fragments=2, delay=1)
    pm, opt = parallelize(model, lambda ps: torch.optim.SGD(ps, lr=0.1), Mesh.single(),
                          ParallelOptions(sync=sync))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for t in range(1, 8):
        pm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        # fragment 0 sends at 1, 3, ...; fragment 1 at 2 (applied at 3): only (0, 3) is in flight
        if t == 3:
            assert list(opt.sync.pending) == [(0, 3)]
            opt.sync.flush()
            assert not opt.sync.pending and opt.sync.flushed == {(0, 3)}
    assert not opt.sync.flushed  # step 4's Apply of (0, 3) was skipped: it was done by flush()
    opt.sync.flush()
    opt.sync.close()


def test_slow_rank_option_stretches_its_steps():
    from plait.sync import build_strategy

    s = build_strategy(SyncConfig(slow_rank=0, slow_factor=3.0), [],
                       __import__("plait").Mesh.single())
    s.step(lambda: None)
    time.sleep(0.05)  # "compute" between two optimizer steps
    t0 = time.perf_counter()
    s.step(lambda: None)
    assert time.perf_counter() - t0 >= 0.1  # (3 − 1) × 0.05 s


@pytest.mark.parametrize("sync,extra,match", [
    ({"strategy": "ring"}, {}, "sync.strategy = 'ring': choose one of"),
    ({"strategy": "streaming_diloco", "every": 2, "fragments": 4}, {},
     "sync.every = 2 < sync.fragments = 4"),
    ({"strategy": "streaming_diloco", "every": 4, "fragments": 2, "delay": 4}, {},
     "sync.delay = 4"),
    ({"strategy": "local_sgd", "quantize": "int8"}, {},
     "sync.quantize = 'int8' applies to outer gradients"),
    ({"strategy": "diloco", "outer_momentum": 1.0}, {}, "sync.outer_momentum"),
    ({"strategy": "diloco"}, {"parallel": {"zero": 1}}, "set parallel.zero=0"),
    ({"strategy": "delayed"}, {"compression": {"name": "int8"}}, "set compression.name=none"),
    ({"strategy": "delayed", "delay": 0}, {}, "sync.delay = 0 with sync.strategy = delayed"),
    ({"strategy": "diloco"}, {"train": {"batch_rampup_samples": 64}},
     "set train.batch_rampup_samples=0"),
])
def test_bad_sync_settings_name_the_field(sync, extra, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"sync": sync, **extra})
