"""The trainer with large-batch features: LAMB end to end, batch ramp-up parity across layouts,
the scaling rule, and `critical_batch` in every step's output of a multi-micro-batch run."""

import pytest
import torch
from common import assert_parity, single_process, tiny_cfg

from plait.config import from_dict
from plait.optim import metric_value
from plait.testing import run_ranks

RAMP = {"train": {"steps": 7, "global_batch": 8, "micro_batch": 2, "batch_rampup_samples": 16},
        "optim": {"scale_lr_with_batch": True, "reference_batch": 8}}
# global batches of the ramp above (target 8, micro 2, over 16 samples):
# see test_schedule for the rule
RAMP_BATCHES = [2, 2, 2, 4, 4, 6, 8]


def _steps(cfg_dict: dict) -> dict:
    """Run on this process's mesh; every step's output plus the final full parameters."""
    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, Mesh.build(cfg.parallel.dp, device="cpu"))
    outs = []
    for _ in range(cfg.train.steps):
        o = tr.train_step()
        outs.append({**o, "loss": float(o["loss"]),
                     "critical_batch": metric_value(o.get("critical_batch", -1.0))})
    norms = [None if o["grad_norm"] is None else float(o["grad_norm"]) for o in outs]
    return {"outs": outs, "losses": [o["loss"] for o in outs], "norms": norms,
            "state": tr.full_state(), "samples": tr.state.samples}


def _many(cfgs: list[dict]) -> list[dict]:
    return [_steps(c) for c in cfgs]


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for sec, body in extra.items():
        out.setdefault(sec, {}).update(body)
    return out


def _close_list(a, b, rtol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert abs(x - y) <= rtol * abs(y), f"{x} vs {y}"


def test_lamb_trains_and_reports_critical_batch(corpus_path):
    cfg = tiny_cfg(corpus_path, optim={"name": "lamb", "lr": 2e-2}, train={"steps": 6})
    torch.set_num_threads(1)
    res = _steps(cfg)
    assert res["losses"][-1] < res["losses"][0] - 0.05
    # global batch 8 over micro-batches of 2
    assert all(o["critical_batch"] != -1.0 for o in res["outs"])
    assert res["outs"][-1]["critical_batch"] is not None and res["outs"][-1]["critical_batch"] > 0


def test_rampup_critical_batch_and_lamb_zero_match_across_layouts(corpus_path):
    ramp = _merge(tiny_cfg(corpus_path), RAMP)
    # no accumulation at all on dp=2 (one micro-batch of 4 per rank) against 2
    # micro-batches on one rank
    wide = tiny_cfg(corpus_path, train={"micro_batch": 4}, optim={"grad_clip": 0.0})
    # a ramp-up is plait's own: its one-process run is the reference
    ref_ramp = single_process(ramp)
    ref_ramp_outs = _steps(_merge(ramp, {"parallel": {"dp": 1}}))["outs"]
    ref_wide = _steps(wide)
    lamb = tiny_cfg(corpus_path, optim={"name": "lamb", "lr": 2e-2})
    # LAMB is plait's (tests/test_optim.py checks it against its paper)
    ref_lamb = single_process(lamb)
    got = run_ranks(_many, 2, args=([_merge(ramp, {"parallel": {"dp": 2}}),
                                     _merge(wide, {"parallel": {"dp": 2}}),
                                     _merge(wide, {"parallel": {"dp": 2, "zero": 2}}),
                                     _merge(lamb, {"parallel": {"dp": 2, "zero": 1}})],),
                    timeout=180)
    for rank_res in got:
        r_ramp, r_wide, r_zero, r_lamb = rank_res
        # LAMB over ZeRO-1 pieces: whole-layer trust ratios through the norm reducer,
        # same run as one process
        assert_parity(ref_lamb, r_lamb)
        # ramp-up: same batches, same data, same loss and parameters as one process (ranks run
        # unequal numbers of micro-batches at global batch 2 and 6)
        assert [o["global_batch"] for o in r_ramp["outs"]] == RAMP_BATCHES
        assert r_ramp["samples"] == sum(RAMP_BATCHES)
        assert_parity(ref_ramp, r_ramp)
        # the scaling rule follows the step's batch: lr = base · warm-up/decay factor · B/8
        assert [o["lr"] for o in r_ramp["outs"]] == pytest.approx([o["lr"] for o in ref_ramp_outs])
        assert r_ramp["outs"][0]["lr"] == pytest.approx(1e-2 * 0.5 * 2 / 8)
        _close_list([o["critical_batch"] for o in r_ramp["outs"]],
                    [o["critical_batch"] for o in ref_ramp_outs], 1e-3)
        # dp=2 with one micro-batch per rank still has two batch sizes (4 per rank, 8 global)
        assert all(o["critical_batch"] is not None for o in r_wide["outs"][1:])
        _close_list([o["critical_batch"] for o in r_wide["outs"]],
                    [o["critical_batch"] for o in ref_wide["outs"]], 1e-3)
        # ZeRO-2: the big-batch norm comes from the optimizer's grad_norm() over the sharded pieces
        _close_list([o["critical_batch"] for o in r_zero["outs"]],
                    [o["critical_batch"] for o in ref_wide["outs"]], 1e-3)
