"""The gradient noise scale estimator: exact on expectations, unbiased on synthetic gradients with
known Σ and G, and the trainer's hooks measure exactly each micro-batch's gradient."""

import types

import pytest
import torch
import torch.nn as nn

from plait.mesh import Mesh
from plait.optim import NoiseScale, NoiseScaleMonitor, metric_value, two_batch_estimate


def test_two_batch_estimate_exact_on_expectations():
    g2, tr = 3.0, 120.0  # B_simple = 40
    for b, B in ((1, 2), (4, 64), (8, 1024)):
        got = two_batch_estimate(b, g2 + tr / b, B, g2 + tr / B)
        assert got == pytest.approx((g2, tr))
    with pytest.raises(ValueError):
        two_batch_estimate(8, 1.0, 8, 1.0)


def test_noise_scale_on_synthetic_gradients():
    # per-sample gradients g_i = G + σ ⊙ z_i: Σ = diag(σ²), B_simple = Σσ² / |G|² = 50
    gen = torch.Generator().manual_seed(0)
    d, b, B, steps = 32, 4, 32, 3000
    G = torch.randn(d, generator=gen, dtype=torch.float64)
    sigma = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    sigma *= (50 * G.pow(2).sum() / sigma.pow(2).sum()).sqrt()
    truth = float(sigma.pow(2).sum() / G.pow(2).sum())
    est = NoiseScale(beta=0.999)
    for _ in range(steps):
        g = G + sigma * torch.randn(B, d, generator=gen, dtype=torch.float64)  # (B, d)
        # mean ‖G_b‖² over the micro-batches
        small = g.view(B // b, b, d).mean(1).pow(2).sum(1).mean()
        big = g.mean(0).pow(2).sum()
        est.update(b, float(small), B, float(big))
    assert truth == pytest.approx(50.0)
    assert est.value == pytest.approx(truth, rel=0.1)
    # below its critical batch the small-batch norm is mostly noise: the estimate must see that
    assert est.trace > 10 * est.g2


def test_noise_scale_value_needs_positive_signal():
    est = NoiseScale(beta=0.0)
    assert est.value is None
    est.update(2, 1.0, 8, 2.0)  # |G_small|² < |G_big|²: a noisy step with negative tr(Σ)
    assert est.value is None


@pytest.mark.parametrize("kind", [float, torch.tensor])
def test_noise_scale_skips_non_finite_steps(kind):
    est = NoiseScale(beta=0.5)
    est.update(2, kind(3.0), 8, kind(1.5))  # |G|² = 1, tr(Σ) = 4
    est.update(2, kind(float("inf")), 8, kind(float("nan")))  # an fp16 overflow step
    assert float(est.value) == pytest.approx(4.0)
    # a tensor's finiteness is not read on the host
    assert est.updates == (1 if kind is float else 2)


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("clip,scale", [(False, 1.0), (True, 1.0), (False, 1024.0)])
def test_monitor_measures_each_micro_batch_exactly(clip, scale):
    b, B = 2, 8
    model, x = _model_and_data()
    # reference: each micro-batch's mean-loss gradient, and the whole batch's
    grads = []
    for k in range(B // b):
        model.zero_grad()
        model(x[k * b:(k + 1) * b]).pow(2).sum(1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    sq_small = sum(float(g.pow(2).sum()) for g in grads) / len(grads)
    sq_big = float(torch.stack(grads).mean(0).pow(2).sum())
    want = two_batch_estimate(b, sq_small, B, sq_big)

    model.zero_grad()
    mon = NoiseScaleMonitor(list(model.parameters()), Mesh.single(), micro_batch=b, beta=0.0)
    mon.begin_step(grad_scale=scale)  # fp16 loss scaling multiplies every gradient by the scale
    for k in range(B // b):  # the trainer's normalization: summed loss / the global batch
        (model(x[k * b:(k + 1) * b]).pow(2).sum(1).sum() / B * scale).backward()
    for p in model.parameters():  # the optimizer unscales the reduced gradient before using it
        p.grad /= scale
    opt = types.SimpleNamespace(grad_clip=1.0 if clip else 0.0,
                                last_grad_norm=sq_big ** 0.5 if clip else None)
    out = mon.end_step(opt, B)
    assert (float(mon.estimate.g2), float(mon.estimate.trace)) == pytest.approx(want, rel=1e-5)
    assert metric_value(out["critical_batch"]) == pytest.approx(want[1] / want[0], rel=1e-5)
    mon.begin_step()  # hooks count only inside a step, and only the new step's gradients
    mon.active = False
    model(x).sum().backward()
    assert float(mon._sq) == 0.0
    mon.remove()


def test_monitor_single_micro_batch_reports_no_new_estimate():
    model, x = _model_and_data()
    mon = NoiseScaleMonitor(list(model.parameters()), Mesh.single(), micro_batch=8)
    mon.begin_step()
    model(x).sum().backward()
    assert mon.end_step(types.SimpleNamespace(grad_clip=0.0, last_grad_norm=None), 8) == \
           {"critical_batch": None}
    assert mon.estimate.updates == 0


def test_monitor_warns_once_per_direction(capsys):
    model, _ = _model_and_data()
    mon = NoiseScaleMonitor(list(model.parameters()), Mesh.single(), micro_batch=2)
    mon._maybe_warn(64, 5.0)  # batch 13x above the estimate
    mon._maybe_warn(64, 4.0)
    mon._maybe_warn(64, 30.0)  # within a factor of 10: nothing
    mon._maybe_warn(4, 100.0)  # 25x below
    err = capsys.readouterr().err
    assert err.count("global batch 64 is 13× the estimated critical batch 5") == 1
    assert err.count("global batch 4 is 25× below the estimated critical batch 100") == 1
    assert err.count("plait: warning") == 2
    assert metric_value(torch.tensor(float("nan"))) is None and metric_value(None) is None


def test_monitor_warns_only_once_the_estimate_is_reliable(capsys):
    """Early estimates are noise (the EMAs start at zero): no warning before 3/(1-beta) updates, nor
    while the estimate still moves by more than 2x between two checks."""
    mon = NoiseScaleMonitor([nn.Parameter(torch.zeros(2))], Mesh.single(), micro_batch=2)
    assert mon.warn_after == 60  # beta 0.95
    mon.estimate.updates = 16
    mon.check(64, 2.0)  # 32x off, but 16 updates: said nothing (make demo warned here before)
    mon.check(64, 2.0)
    assert capsys.readouterr().err == ""
    mon.estimate.updates = 80
    mon.check(64, 5.0)  # moved 2.5x since the last check: not yet
    assert capsys.readouterr().err == ""
    mon.check(64, 4.0)  # settled within 2x: the batch is 16x above it
    assert "16× the estimated critical batch" in capsys.readouterr().err


def test_supported_only_with_the_exact_global_gradient():
    from plait.config import from_dict
    from plait.optim.noise_scale import supported

    assert supported(from_dict({})) is None
    assert supported(from_dict({"compression": {"name": "bf16"}})) is None
    assert "sync.strategy" in supported(from_dict({"sync": {"strategy": "local_sgd"}}))
    assert "compressed" in supported(from_dict({"compression": {"name": "topk"}}))
    assert "ZeRO-3" in supported(from_dict({"parallel": {"zero": 3}}))
