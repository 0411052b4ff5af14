"""Pipeline parallelism equals the single-process run; its pieces, checked in one process.

The multi-process cases share spawned worker groups: one 2-rank group runs pp = 2 under every
schedule and a short run writing the trace and Gantt chart; one 4-rank group runs pp = 4 under
every schedule, pp × dp = 2 × 2 and pp × tp = 2 × 2 (with and without sequence parallelism). Each
case's failure is reported on its own.
"""

import json
import traceback

import pytest
import torch
import torch.nn as nn
from common import DEVICE, TOL, assert_parity, reference, tiny_cfg

from plait.config import from_dict, validate_layout
from plait.errors import ConfigError
from plait.mesh import Mesh
from plait.models.gpt import GPT, build_config, lm_loss
from plait.pipeline.partition import (
    PipelineStage,
    balanced_split,
    measured_costs,
    param_costs,
    partition,
    pipeline_spec,
    stage_keys,
)
from plait.pipeline.runtime import PipelineRunner
from plait.pipeline.split_backward import backward_input, backward_weight
from plait.testing import run_ranks

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1)]


def _case_cfg(corpus, layers, **parallel):
    return tiny_cfg(corpus, model={"n_layers": layers}, parallel=parallel)


def _train(cfg_dict, run_dir=None):
    from plait.train import Trainer

    cfg = from_dict(cfg_dict)
    mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device=DEVICE)
    tr = Trainer(cfg, mesh)
    if run_dir is not None:
        return tr.run(run_dir if mesh.rank == 0 else None)
    outs = [tr.train_step() for _ in range(cfg.train.steps)]
    losses = [float(o["loss"]) for o in outs]
    norms = [None if o["grad_norm"] is None else float(o["grad_norm"]) for o in outs]
    state = {k: v.cpu() for k, v in tr.full_state().items()}
    return {"losses": losses, "norms": norms, "state": state, "val": tr.evaluate(),
            "pipeline": tr.model.pipeline.summary()}


def _cases_worker(cases):
    out = {}
    for name, cfg, run_dir in cases:
        try:
            out[name] = _train(cfg, run_dir)
        except Exception:  # noqa: BLE001 - reported by the test of this case
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def refs(corpus_path):
    return {layers: reference(_case_cfg(corpus_path, layers)) for layers in (2, 4, 8)}


@pytest.fixture(scope="module")
def two_ranks(corpus_path, tmp_path_factory):
    cases = [(f"pp2-{s}", _case_cfg(corpus_path, 4, pp=2, schedule=s, virtual_stages=v), None)
             for s, v in SCHEDULES]
    run_dir = tmp_path_factory.mktemp("pp_run") / "run"
    run_dir.mkdir()
    short = _case_cfg(corpus_path, 4, pp=2, schedule="1f1b")
    short["train"].update(steps=2)
    cases.append(("run", short, run_dir))
    return run_ranks(_cases_worker, 2, args=(cases,), timeout=240), run_dir


@pytest.fixture(scope="module")
def four_ranks(corpus_path):
    cases = [(f"pp4-{s}", _case_cfg(corpus_path, 8, pp=4, schedule=s, virtual_stages=v), None)
             for s, v in SCHEDULES]
    cases.append(("pp2xdp2", _case_cfg(corpus_path, 4, pp=2, dp=2, schedule="zb_h1"), None))
    # tp: the tiny model's own depth (2 blocks), the one the tensor-parallel parity tests use
    cases.append(("pp2xtp2", _case_cfg(corpus_path, 2, pp=2, tp=2, schedule="1f1b"), None))
    cases.append(("pp2xtp2-sp",
                  _case_cfg(corpus_path, 2, pp=2, tp=2, schedule="zb_h1", sequence_parallel=True),
                  None))
    return run_ranks(_cases_worker, 4, args=(cases,), timeout=300)


def _check(results, name, ref):
    for rank, res in enumerate(results):
        got = res[name]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        assert_parity(ref, got)
        assert abs(got["val"] - ref["val"]) / ref["val"] <= TOL["loss"]  # forward-only schedule
    return results[0][name]["pipeline"]


@pytest.mark.parametrize("schedule", [s for s, _ in SCHEDULES])
def test_pp2_parity(two_ranks, refs, schedule):
    summary = _check(two_ranks[0], f"pp2-{schedule}", refs[4])
    # activations in flight, counted by the runtime: GPipe holds all m = 4, 1F1B at most p = 2
    peaks = summary["peak_in_flight_per_rank"]
    expected = {"gpipe": [4, 4], "1f1b": [2, 1], "zb_h1": [2, 2]}
    if schedule in expected:
        assert peaks == expected[schedule]
    assert (len(summary["bubble_per_rank"]) == 2
            and all(0 <= b < 1 for b in summary["bubble_per_rank"]))


@pytest.mark.parametrize("schedule", [s for s, _ in SCHEDULES])
def test_pp4_parity(four_ranks, refs, schedule):
    summary = _check(four_ranks, f"pp4-{schedule}", refs[8])
    if schedule == "1f1b":
        assert summary["peak_in_flight_per_rank"] == [4, 3, 2, 1]


def test_pp_dp_parity(four_ranks, refs):
    _check(four_ranks, "pp2xdp2", refs[4])


@pytest.mark.parametrize("case", ["pp2xtp2", "pp2xtp2-sp"])
def test_pp_tp_parity(four_ranks, refs, case):
    # -sp: sequence parallelism, hidden state (B, T/tp, D) between stages
    _check(four_ranks, case, refs[2])


def test_run_writes_trace_gantt_and_bubble(two_ranks):
    results, run_dir = two_ranks
    for r in results:
        assert not isinstance(r["run"], str), r["run"]
    trace = json.loads((run_dir / "pipeline_trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        names = {e["name"] for e in spans if e["tid"] == rank}
        assert {f"F{i}" for i in range(4)} <= names and {f"B{i}" for i in range(4)} <= names
    assert (run_dir / "pipeline_gantt.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["pipeline"]["bubble_per_rank"]) == 2
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["bubble"]) == 2 for r in recs)


# -- one process ---------------------------------------------------------------------------------
def _gpt(layers=4, **kw):
    torch.manual_seed(0)
    return GPT(build_config("tiny", vocab_size=64, n_layers=layers, **kw))


def test_partition_keeps_names_and_balances():
    model = _gpt(4)
    spec = pipeline_spec(model)
    stages = partition(spec, 2)
    names = [[n for layer in s for n in layer.names] for s in stages]
    assert names[0][0] == "tok_emb" and names[-1][-2:] == ["norm", "lm_head"]
    assert sum(len(s) for s in stages) == len(spec.layers)
    costs = param_costs(spec)
    assert costs[0] == 0  # the embedding is a lookup
    sums = [sum(costs[spec.layers.index(layer)] for layer in s) for s in stages]
    # no better contiguous split exists by more than a layer
    assert max(sums) <= sum(costs) / 2 + max(costs)
    keys = stage_keys(spec, stages, 2)
    assert [k for rank in keys for k, _, _ in rank] == [k for k in model.state_dict()]
    stage = PipelineStage([stages[1]], spec.shared, 1, 2)
    assert set(stage.state_dict()) == {k for k, _, _ in keys[1]}
    assert balanced_split([1, 1, 1, 1, 4], 2) == [0, 4, 5]
    assert len(measured_costs(spec, torch.randint(0, 64, (2, 8)), repeats=1)) == len(spec.layers)


def test_partition_errors_are_clear():
    with pytest.raises(ConfigError, match="every stage needs at least one"):
        partition(pipeline_spec(_gpt(2)), 4)
    with pytest.raises(ConfigError, match="cannot be split into pipeline stages"):
        pipeline_spec(nn.Linear(3, 3))

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def pipeline_layers(self):
            return [("a", self.a)]  # b left out

    with pytest.raises(ConfigError, match="outside every layer"):
        pipeline_spec(Bad())


def test_config_micro_batch_rule():
    def cfg(**parallel):
        return from_dict({"parallel": parallel, "train": {"global_batch": 8, "micro_batch": 2}})

    assert validate_layout(cfg(pp=2), 2) == 1  # m = 4
    with pytest.raises(ConfigError, match="parallel.microbatches = 3"):
        validate_layout(cfg(pp=2, microbatches=3), 2)
    validate_layout(cfg(pp=2, microbatches=4), 2)
    with pytest.raises(ConfigError, match="needs m >= p"):
        validate_layout(cfg(pp=4, dp=2), 8)  # m = 2 < 4
    with pytest.raises(ConfigError, match="interleaved_1f1b"):
        validate_layout(cfg(pp=2, virtual_stages=2), 2)
    with pytest.raises(ConfigError, match="to be a multiple of p = 3"):
        validate_layout(cfg(pp=3, schedule="interleaved_1f1b", virtual_stages=2), 3)  # m = 4


def test_split_backward_matches_full_backward():
    model = _gpt(2)
    spec = pipeline_spec(model)
    stage = PipelineStage([partition(spec, 2)[1]], spec.shared, 1, 2)
    x = torch.randn(2, 8, 32, requires_grad=True)
    g = torch.randn(2, 8, 64)
    torch.autograd.backward(stage(x), g)
    ref = {n: p.grad.clone() for n, p in stage.named_parameters()}
    stage.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_()
    work = backward_input(stage(x2), g, x2)
    assert all(p.grad is None for p in stage.parameters())  # B computed no weight gradient
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)
    backward_weight(work, stage.chunk_parameters(0))
    for n, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-6, atol=1e-7)

    # a weight used twice in the stage: W falls back to recomputing from the output, still exact
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    torch.autograd.backward(lin(lin(x)), torch.ones(3, 4))
    want = lin.weight.grad.clone()
    lin.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_()
    work = backward_input(lin(lin(x2)), torch.ones(3, 4), x2)
    backward_weight(work, list(lin.parameters()))
    torch.testing.assert_close(lin.weight.grad, want)


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_runner_single_rank_equals_plain_backward(schedule):
    """p = 1: the runner's loss and gradients equal a plain loop's; memory counters work."""
    from plait.config import ParallelConfig
    from plait.pipeline.build import build_pipeline

    model = _gpt(2)
    batches = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))) for _ in range(3)]
    plain = _gpt(2)
    total = 0.0
    for x, y in batches:
        loss = nn.functional.cross_entropy(plain(x).flatten(0, 1), y.flatten(),
                                           reduction="sum") / 48
        loss.backward()
        total += float(loss.detach())
    mesh = Mesh.single()
    stage, runner, gather = build_pipeline(model, mesh, ParallelConfig(schedule=schedule), lm_loss,
                                           measure_memory=True)
    stepped = []
    loss = runner.train_step(batches, divisor=48, step_fn=lambda: stepped.append(True))
    assert abs(float(loss) - total) < 1e-5 and stepped == [True]
    for (n, p), q in zip(stage.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    s = runner.stats[0]
    assert s["peak_in_flight"] == 1 and s["peak_saved_bytes"] > 0 and 0 <= s["bubble"] < 1
    assert set(gather(stage.state_dict())) == set(model.state_dict())
    assert isinstance(runner, PipelineRunner)
