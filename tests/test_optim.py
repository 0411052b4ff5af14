"""LAMB and LARS against plain per-tensor references;
sharded (tp-like and ZeRO-like) equals unsharded."""

import math

import pytest
import torch
import torch.nn as nn

from plait.comm import Comm, Group
from plait.config import from_dict
from plait.errors import ConfigError
from plait.optim import LAMB, LARS, GroupNormReducer, optimizer_factory
from plait.testing import run_ranks

SHAPES = [(4, 6), (6, 3), (6,)]  # two matrices and a bias-like vector
STEPS = 3


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * (0.1 + k) for s in SHAPES]
             for k in range(STEPS)]
    return ws, grads


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))


# -- obviously-correct references: one tensor at a time, float64, straight from the papers -------
def ref_lamb(ws, grads, lr, b1, b2, eps, wd, adapt):
    ws = [w.clone() for w in ws]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1 ** t)) / (torch.sqrt(v[i] / (1 - b2 ** t)) + eps)
            if adapt[i]:
                u = r + wd * ws[i]
                ratio = _norm(ws[i]) / _norm(u) if _norm(ws[i]) > 0 and _norm(u) > 0 else 1.0
                ws[i] = ws[i] - lr * ratio * u
            else:
                ws[i] = ws[i] - lr * r
    return ws


def ref_lars(ws, grads, lr, mu, wd, eta, adapt):
    ws = [w.clone() for w in ws]
    buf = [torch.zeros_like(w) for w in ws]
    for gs in grads:
        for i, g in enumerate(gs):
            if adapt[i]:
                wn, gn = _norm(ws[i]), _norm(g)
                local = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
                buf[i] = mu * buf[i] + lr * local * (g + wd * ws[i])
            else:
                buf[i] = mu * buf[i] + lr * g
            ws[i] = ws[i] - buf[i]
    return ws


def _run(make_opt, ws, grads, groups=None):
    params = [nn.Parameter(w.float().clone()) for w in ws]
    opt = make_opt(groups(params) if groups else params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.float().clone()
        opt.step()
    return [p.detach().double() for p in params]


def _close(got, ref, rtol=1e-5):
    for a, b in zip(got, ref):
        err = _norm(a - b) / _norm(b)
        assert err <= rtol, f"relative error {err:.2e}"


def test_lamb_matches_reference():
    ws, grads = _tensors()
    got = _run(lambda p: LAMB(p, lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05), ws, grads)
    _close(got, ref_lamb(ws, grads, 0.1, 0.9, 0.99, 1e-6, 0.05, adapt=[True, True, False]))
    # the trust ratio really acts: plain Adam with decoupled-style decay lands elsewhere
    assert _norm(got[0] - ref_lamb(ws, grads, 0.1, 0.9, 0.99, 1e-6, 0.05,
                                   adapt=[False] * 3)[0]) > 1e-3


def test_lamb_explicit_adapt_groups():
    ws, grads = _tensors(1)
    # adapt=True on every parameter (a ZeRO wrapper's flat shards would say so):
    # the vector is adapted and decayed
    got = _run(lambda p: LAMB(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1), ws, grads,
               groups=lambda ps: [{"params": ps, "adapt": True}])
    _close(got, ref_lamb(ws, grads, 0.05, 0.8, 0.9, 1e-6, 0.1, adapt=[True] * 3))


def test_lars_matches_reference():
    ws, grads = _tensors(2)
    got = _run(lambda p: LARS(p, lr=2.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01),
               ws, grads)
    _close(got, ref_lars(ws, grads, 2.0, 0.9, 1e-3, 0.01, adapt=[True, True, False]))


def test_zero_norms_and_clamp():
    w = nn.Parameter(torch.zeros(3, 3))  # ‖w‖ = 0: trust ratio 1, the step is plain Adam's
    w.grad = torch.ones(3, 3)
    LAMB([w], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1), rtol=1e-5, atol=1e-6)
    big = nn.Parameter(torch.full((2, 2), 100.0))  # ‖w‖/‖u‖ = 100: clamped to 2
    big.grad = torch.ones(2, 2)
    LAMB([big], lr=0.1, weight_decay=0.0, max_trust_ratio=2.0).step()
    torch.testing.assert_close(big.detach(), torch.full((2, 2), 100.0 - 0.2), rtol=1e-6, atol=1e-5)


def test_norm_reducer_called_once_per_step_and_checked():
    calls = []

    def reducer(params, sq):
        calls.append((len(params), tuple(sq.shape)))
        return sq

    ws, grads = _tensors()
    _run(lambda p: LAMB(p, lr=0.1, norm_reducer=reducer), ws, grads)
    assert calls == [(2, (2, 2))] * STEPS  # the two matrices, one call per step
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="norm_reducer returned"):
        LARS([p], norm_reducer=lambda params, sq: sq[:, 0]).step()
    # a rank holding no adapted piece still takes part (the reducer may be a collective)
    one = Group("dp", (0,), 0)
    for red in (GroupNormReducer(Comm(), one),
                GroupNormReducer(Comm(), one, slot=lambda p: 0, n_slots=3)):
        calls.clear()
        vec = nn.Parameter(torch.ones(3))  # 1-D: not adapted, so the reducer gets no rows
        vec.grad = torch.ones(3)
        LAMB([vec],
             norm_reducer=lambda params, sq, red=red: reducer(params, red(params, sq))).step()
        assert calls == [(0, (0, 2))]


def test_factory_builds_and_checks_config():
    cfg = from_dict({"optim": {"name": "lamb", "lr": 0.01, "weight_decay": 0.1}})
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = optimizer_factory(cfg.optim, torch.device("cpu"))(list(model.parameters()))
    assert isinstance(opt, LAMB) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    cfg = from_dict({"optim": {"name": "lars"}})
    assert isinstance(optimizer_factory(cfg.optim, torch.device("cpu"))(list(model.parameters())),
                      LARS)
    # caught when the config is loaded
    with pytest.raises(ConfigError, match="optim.reference_batch"):
        from_dict({"optim": {"scale_lr_with_batch": True}})
    with pytest.raises(ConfigError, match="optim.name"):
        from_dict({"optim": {"name": "lion"}})


# -- sharded == unsharded, over 2 gloo ranks through plait's Comm ----------------------------------
def _sharded_worker(kind: str):
    from plait.mesh import Mesh

    mesh = Mesh.build(dp=2)
    r = mesh.dp_index
    ws, grads = _tensors(3)
    make = {"lamb": lambda ps, red: LAMB(ps, lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                          norm_reducer=red),
            "lars": lambda ps, red: LARS(ps, lr=2.0, momentum=0.9, weight_decay=1e-3,
                                         trust_coefficient=0.01, norm_reducer=red)}[kind]
    # tensor-parallel-like: each rank holds half the rows of each matrix;
    # the vector is whole (replicated)
    rows = [slice(r * w.shape[0] // 2, (r + 1) * w.shape[0] // 2) if w.dim() == 2 else slice(None)
            for w in ws]
    tp = [nn.Parameter(w[s].float().clone()) for w, s in zip(ws, rows)]
    opt = make(tp, GroupNormReducer(mesh.comm, mesh.dp, replicated=lambda p: p.dim() < 2))
    for gs in grads:
        for p, g, s in zip(tp, gs, rows):
            p.grad = g[s].float().clone()
        opt.step()
    # ZeRO-like: the two matrices flattened into one buffer, rank 0 holding its first 30 of 42
    # elements (all of matrix 0, the start of matrix 1), rank 1 the rest (only matrix 1's end):
    # the ranks hold pieces of different parameters, of unequal sizes.
    flat = torch.cat([ws[0].flatten(), ws[1].flatten()])
    n0, cut = ws[0].numel(), 30
    spans = [(0, 0, n0), (1, n0, cut)] if r == 0 else [(1, cut, flat.numel())]
    pieces = [nn.Parameter(flat[a:b].float().clone()) for _, a, b in spans]
    layer = {id(p): k for p, (k, _, _) in zip(pieces, spans)}
    opt = make([{"params": pieces, "adapt": True}],
               GroupNormReducer(mesh.comm, mesh.dp, slot=lambda p: layer[id(p)], n_slots=2))
    for gs in grads:
        gflat = torch.cat([gs[0].flatten(), gs[1].flatten()])
        for p, (_, a, b) in zip(pieces, spans):
            p.grad = gflat[a:b].float().clone()
        opt.step()
    return ([p.detach().double() for p in tp],
            [(a, b, p.detach().double()) for p, (_, a, b) in zip(pieces, spans)])


@pytest.mark.parametrize("kind", ["lamb", "lars"])
def test_sharded_equals_unsharded(kind):
    ws, grads = _tensors(3)
    if kind == "lamb":
        full = ref_lamb(ws, grads, 0.1, 0.9, 0.99, 1e-6, 0.05, adapt=[True, True, False])
    else:
        full = ref_lars(ws, grads, 2.0, 0.9, 1e-3, 0.01, adapt=[True, True, False])
    (tp0, z0), (tp1, z1) = run_ranks(_sharded_worker, 2, args=(kind,), timeout=120)
    tp = [torch.cat([a, b]) if a.dim() == 2 else a for a, b in zip(tp0, tp1)]
    _close(tp, full)
    # the replicated vector stays identical on both ranks
    torch.testing.assert_close(tp0[2], tp1[2])
    flat = torch.zeros(ws[0].numel() + ws[1].numel(), dtype=torch.float64)
    for a, b, piece in z0 + z1:
        flat[a:b] = piece
    _close([flat[:ws[0].numel()], flat[ws[0].numel():]], [full[0].flatten(), full[1].flatten()])
    # the local-norm answer (no reducer) differs: the reduction is what makes them equal
    if kind == "lamb":
        local = _run(lambda p: LAMB(p, lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05),
                     [w[:2] for w in ws[:1]], [[g[0][:2]] for g in grads])
        assert _norm(local[0] - full[0][:2]) / _norm(full[0][:2]) > 1e-4
