"""Mixed precision: bf16 / fp16 autocast with fp32 master weights, and fp16 dynamic loss scaling.

Stated tolerance (tiny model, 10 steps, AdamW lr 1e-2): against the fp32 run, every step's loss
within 2e-3 relative for bf16 and 5e-4 for fp16 (measured on this machine, torch 2.13 CPU: 2.4e-4
and 6.5e-5), single process and tp = 2 alike. fp16: a gradient overflow on one rank skips the
update on every rank and halves the scale; the scale doubles after `growth_interval` good steps.
"""

import math
import traceback

import pytest
import torch
from common import tiny_cfg

from plait import parity
from plait.config import from_dict
from plait.errors import ConfigError, NonFiniteError
from plait.mesh import Mesh
from plait.optim.loss_scale import LossScaler, any_rank, any_rank_nonfinite
from plait.testing import run_ranks

TOL = {"bf16": 2e-3, "fp16": 5e-4}
STEPS = 10


def _cfg(corpus, dtype, **parallel):
    return tiny_cfg(corpus, parallel=parallel, train={"dtype": dtype, "steps": STEPS})


@pytest.fixture(scope="module")
def fp32_ref(corpus_path):
    return parity.train_case(_cfg(corpus_path, "fp32"))


def _close_to_fp32(ref, got, dtype):
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / b <= TOL[dtype], f"{dtype} step {i + 1}: loss {a} vs fp32 {b}"
    assert got["losses"][-1] < got["losses"][0] - 1.0  # it trains as fp32 does (5.6 -> 3.7)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_single_process_within_tolerance_of_fp32(corpus_path, fp32_ref, dtype):
    got = parity.train_case(_cfg(corpus_path, dtype))
    _close_to_fp32(fp32_ref, got, dtype)
    assert all(v.dtype == torch.float32 for v in got["state"].values())  # fp32 master weights


# -- two ranks -------------------------------------------------------------------------------------
def _overflow_run(cfg_dict, bad_rank, bad_step):
    """fp16 training where `bad_rank` gets an inf in one local gradient at step `bad_step`
    (1-based)."""
    from plait.train import Trainer

    cfg = from_dict(cfg_dict)
    mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device="cpu")
    tr = Trainer(cfg, mesh)
    fb = tr.model.train_step

    def train_step(batches, tokens):
        loss = fb(batches, tokens)
        if mesh.rank == bad_rank and tr.state.step + 1 == bad_step:
            next(p for p in tr.model.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf
        return loss

    tr.model.train_step = train_step
    applied, scales, changed = [], [], []
    for _ in range(cfg.train.steps):
        before = [p.detach().clone() for p in tr.model.parameters()]
        out = tr.train_step()
        applied.append(out["applied"])
        scales.append(out["loss_scale"])
        changed.append(any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters())))
    return {"applied": applied, "scales": scales, "changed": changed,
            "skipped": tr.optimizer.scaler.skipped,
            "state": tr.optimizer.state_dict()["loss_scale"]}


def _agreement():
    mesh = Mesh.build(dp=2)
    nan_on_1 = torch.tensor([1.0, float("nan") if mesh.rank == 1 else 2.0])
    mesh.comm.stats.reset_step()
    out = [any_rank_nonfinite(nan_on_1, mesh), any_rank_nonfinite(torch.ones(3), mesh),
           any_rank(torch.tensor(float(mesh.rank == 0)), mesh)]
    return out, mesh.comm.stats.reset_step()["formula_by_op"]  # the wire adds gloo's framing


def _worker(cases):
    out = {}
    for name, fn, args in cases:
        try:
            out[name] = fn(*args)
        except Exception:  # noqa: BLE001 - reported by the test of this case
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def two_ranks(corpus_path):
    overflow = tiny_cfg(corpus_path, parallel={"pp": 2},
                        train={"dtype": "fp16", "steps": 5, "loss_scale_init": 1024.0,
                               "loss_scale_growth_interval": 2})
    cases = [("overflow", _overflow_run, (overflow, 1, 2)),
             ("agreement", _agreement, ()),
             ("bf16-tp2", parity.train_case, (_cfg(corpus_path, "bf16", tp=2),)),
             ("fp16-tp2", parity.train_case, (_cfg(corpus_path, "fp16", tp=2),))]
    return run_ranks(_worker, 2, args=(cases,), timeout=300)


def _get(results, name):
    for rank, r in enumerate(results):
        assert not isinstance(r[name], str), f"rank {rank} failed:\n{r[name]}"
    return [r[name] for r in results]


def test_overflow_on_one_rank_skips_on_all(two_ranks):
    # pp = 2: rank 1 (the last stage) overflows at step 2; rank 0's own gradients are finite
    for r in _get(two_ranks, "overflow"):
        assert r["applied"] == [True, False, True, True, True]
        # step 2 left every parameter as it was
        assert r["changed"] == [True, False, True, True, True]
        # halved at the overflow; doubled after 2 good steps in a row (growth_interval = 2)
        assert r["scales"] == [1024.0, 512.0, 512.0, 1024.0, 1024.0]
        assert r["skipped"] == 1 and r["state"] == {"scale": 1024.0, "good_steps": 1, "skipped": 1}


def test_found_inf_agreement_is_one_tiny_all_reduce(two_ranks):
    for flags, by_op in _get(two_ranks, "agreement"):
        assert flags == [True, False, True]
        # 3 calls, one fp32 each: 2(n-1)/n · 4 bytes at n = 2
        assert by_op == {"all_reduce/world": 3 * 4.0}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tensor_parallel_within_tolerance_of_fp32(two_ranks, fp32_ref, dtype):
    for got in _get(two_ranks, f"{dtype}-tp2"):
        _close_to_fp32(fp32_ref, got, dtype)


# -- one process -----------------------------------------------------------------------------------
def test_fp16_overflow_lowers_scale_until_steps_apply(corpus_path):
    from plait.train import Trainer

    # 2^19: the logits' gradient overflows fp16 in backward; 2^18 does not (measured)
    cfg = from_dict(
        tiny_cfg(corpus_path, train={"dtype": "fp16", "steps": 3, "loss_scale_init": 2.0**19}))
    tr = Trainer(cfg, Mesh.single())
    outs = [tr.train_step() for _ in range(3)]
    assert [o["applied"] for o in outs] == [False, True, True]
    assert [o["loss_scale"] for o in outs] == [2.0**18] * 3
    assert all(math.isfinite(float(o["loss"])) for o in outs)


def test_loss_scaler_schedule_and_state():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    for overflow in (False, False, True, False, False, False):
        s.update(overflow)
    # 8 -> 4 (overflow) -> 8 after 3 good
    assert s.scale == 8.0 and s.good_steps == 0 and s.skipped == 1
    g = [torch.tensor([8.0, 16.0]), torch.tensor([4.0])]
    assert float(s.unscale_(g)) == 0.0 and g[0].tolist() == [1.0, 2.0] and g[1].tolist() == [0.5]
    assert float(s.unscale_([torch.tensor([1.0, math.inf])])) == 1.0
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() == {"scale": 8.0, "good_steps": 0, "skipped": 1}
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=1.0)


def test_overflow_at_the_floor_stops_the_run():
    # halving stops at min_scale; an overflow there is inf / nan at every scale:
    # a clear error, not endless skips
    s = LossScaler(init_scale=4.0, min_scale=1.0)
    s.update(True)
    s.update(False)
    s.update(True)
    assert s.scale == 1.0 and s.skipped == 2 and s.in_a_row == 1
    with pytest.raises(NonFiniteError,
                       match="train.loss_scale_min = 1 .*2 overflow steps in a row, 3 in all"):
        s.update(True)
    with pytest.raises(ConfigError, match="train.loss_scale_min"):
        LossScaler(init_scale=4.0, min_scale=8.0)


def test_fp16_run_with_gradients_nan_at_every_scale_stops(corpus_path):
    from plait.train import Trainer

    cfg = from_dict(
        tiny_cfg(corpus_path, train={"dtype": "fp16", "steps": 6, "loss_scale_init": 4.0}))
    tr = Trainer(cfg, Mesh.single())
    fb = tr.model.train_step

    def train_step(batches, tokens):  # a diverged model: a nan gradient whatever the scale
        loss = fb(batches, tokens)
        next(p for p in tr.model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        return loss

    tr.model.train_step = train_step
    assert [tr.train_step()["applied"] for _ in range(2)] == [False, False]  # 4 -> 2 -> 1
    with pytest.raises(NonFiniteError, match="train.loss_scale_min"):
        tr.train_step()


def test_loss_scale_floor_above_start_is_a_config_error():
    with pytest.raises(ConfigError,
                       match="train.loss_scale_min = 8 is above train.loss_scale_init = 4"):
        from_dict({"train": {"dtype": "fp16", "loss_scale_init": 4.0, "loss_scale_min": 8.0}})
