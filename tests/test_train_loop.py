"""The loop users run: host reads per step, no collective between the syncs of a local strategy,
metrics.jsonl without duplicated steps, TensorBoard events."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from common import tiny_cfg
from torch.overrides import TorchFunctionMode

from plait.config import from_dict
from plait.testing import run_ranks

READS = {"item", "tolist", "__float__", "__int__", "__bool__", "numpy", "__index__"}
# the step guard's agreement (or, between syncs, its local verdict): the loop's only one
ALLOWED_READS = 1


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values on the host (each waits for the device on a GPU).

    torch's own optimizers read their per-parameter step counters (`_get_value(step)`); those live
    in host memory also on a GPU run (non-capturable optimizers), so they wait for nothing and are
    not counted: a read is left out when the code asking for it is in torch/optim/."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/torch/optim/" not in caller:
                self.seen.append(f"{name} ({caller.rsplit('/', 2)[-2]}/{caller.rsplit('/', 1)[-1]}:"
                                 f"{sys._getframe(1).f_lineno})")
        return func(*args, **(kwargs or {}))


def _reads_worker(cases: dict) -> dict:
    from plait.mesh import Mesh
    from plait.train import Trainer

    out = {}
    for name, d in cases.items():
        cfg = from_dict(d)
        tr = Trainer(cfg,
                     Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device="cpu"))
        steps = []
        for _ in range(cfg.train.steps):
            tr.mesh.comm.stats.reset_step()
            with HostReads() as reads:
                o = tr.train_step()
            steps.append(
                {"reads": reads.seen, "bytes": tr.mesh.comm.stats.reset_step()["comm_bytes"],
                 "local": o["loss_is_local"], "loss": float(o["loss"])})
        out[name] = steps
    return out


@pytest.fixture(scope="module")
def two_ranks(corpus_path):
    base = {"train": {"steps": 4, "log_every": 100}}
    cases = {
        "dp": tiny_cfg(corpus_path, parallel={"dp": 2}, **base),
        "pp": tiny_cfg(corpus_path, parallel={"pp": 2}, **base),
        "zero2": tiny_cfg(corpus_path, parallel={"dp": 2, "zero": 2}, **base),
        "diloco": tiny_cfg(corpus_path, parallel={"dp": 2}, sync={"strategy": "diloco", "every": 2},
                           train={"steps": 5, "log_every": 100}),
    }
    return run_ranks(_reads_worker, 2, args=(cases,), timeout=300)


@pytest.mark.parametrize("case", ["dp", "pp", "zero2", "diloco"])
def test_a_step_reads_the_device_once(two_ranks, case):
    for rank, got in enumerate(two_ranks):
        for i, step in enumerate(got[case]):
            assert len(step["reads"]) <= ALLOWED_READS, (f"rank {rank} step {i + 1}: host reads "
                                                         f"{step['reads']}")


def test_diloco_inner_steps_make_no_collective(two_ranks):
    for got in two_ranks:
        steps = got["diloco"]
        for i, step in enumerate(steps, start=1):
            sync = i % 2 == 0 or i == len(steps)  # sync.every = 2, and the run's last step
            assert step["local"] == (not sync)
            if sync:
                assert step["bytes"] > 0
            else:
                assert step["bytes"] == 0, f"inner step {i} sent {step['bytes']} bytes"
    # between syncs each replica logs its own loss; at a sync both log the same (global) one
    a, b = (got["diloco"] for got in two_ranks)
    assert a[0]["loss"] != b[0]["loss"] and a[1]["loss"] == b[1]["loss"]


def test_the_host_read_counter_can_fail():
    with HostReads() as reads:
        t = torch.ones(2)
        float(t.sum())
        t.tolist()
    assert [r.split()[0] for r in reads.seen] == ["__float__", "tolist"]


def _train_worker(d: dict, run: str) -> None:
    from plait.train import train

    train(from_dict(d), run)


def test_diloco_metrics_mark_local_losses_and_zero_bytes(corpus_path, tmp_path):
    d = tiny_cfg(corpus_path, parallel={"dp": 2}, sync={"strategy": "diloco", "every": 3},
                 train={"steps": 6, "val_every": 0})
    run_ranks(_train_worker, 2, args=(d, str(tmp_path / "run")), timeout=300)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        sync = r["step"] % 3 == 0
        assert r.get("loss_is_local", False) == (not sync)
        assert (r["comm_bytes"] == 0) == (not sync), r


def _subnormal_survives() -> bool:
    # 1e-30 * 1e-9 = 1e-39 is subnormal in fp32: zero where the CPU flushes subnormals
    return (torch.tensor([1e-30]) * torch.tensor([1e-9])).item() != 0.0


def _denormal_worker(d: dict, run: str) -> tuple[bool, bool]:
    from plait.train import train

    before = _subnormal_survives()
    train(from_dict(d), run)
    return before, _subnormal_survives()


@pytest.mark.parametrize("flush", [True, False])
def test_the_trainer_flushes_subnormals_on_cpu_unless_told_not_to(corpus_path, tmp_path, flush):
    """Subnormal floats cost ~100x per operation on a CPU and a run drifts into them (the 10m
    model's step 1.8x slower by step 120): the trainer sets flush-to-zero, train.flush_denormal."""
    d = tiny_cfg(corpus_path, train={"steps": 1, "flush_denormal": flush})
    if torch.set_flush_denormal(True):  # this CPU has the mode; put it back for this process
        torch.set_flush_denormal(False)
    else:
        pytest.skip("this CPU has no flush-to-zero mode (torch.set_flush_denormal returns False)")
    [(before, after)] = run_ranks(_denormal_worker, 1, args=(d, str(tmp_path / "run")),
                                  timeout=120)
    assert before  # a fresh process keeps subnormals: the trainer is what changes it
    assert after == (not flush)


def _session(run, start_step: int, steps, loss_scale: float):
    from plait.train.metrics import Metrics

    m = Metrics(run, total_steps=8, log_every=1, seq_len=4, world=1, flops_per_token=1.0,
                peak_flops=1.0, progress=False, tensorboard=True, start_step=start_step)
    for step in steps:
        m.step_done(2, 0.0)
        m.log({"step": step, "loss": loss_scale / step, "lr": 0.1, "grad_norm": 1.0,
               "critical_batch": None})
    m.close()


def test_a_resumed_run_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _session(run, 0, range(1, 7), 1.0)  # crashed after step 6; its checkpoint is step 4
    _session(run, 4, (5, 6), 2.0)  # resumed from step 4: steps 5 and 6 again
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs][4:] == [2.0 / 5, 2.0 / 6]  # the resumed session's records
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    got = [(e.step, round(e.value, 6)) for e in ea.Scalars("loss")]
    assert got == [(s, round(1.0 / s, 6)) for s in range(1, 5)] + [(5, 0.4), (6, round(2.0 / 6, 6))]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "comm_bytes"} <= set(ea.Tags()["scalars"])
