"""Shared pieces of the parity tests: a tiny config, the single-process reference, the comparison."""

from __future__ import annotations

import os

import torch

from plait import config as C

# PLAIT_TEST_DEVICE=cuda runs the parity tests with CUDA tensors (several gloo ranks sharing one GPU);
# PLAIT_TEST_DTYPE=bf16 runs them, and their single-process reference, under bf16 autocast
DEVICE = os.environ.get("PLAIT_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("PLAIT_TEST_DTYPE", "fp32")
# Relative tolerances: |Δloss|/|loss|, |Δnorm|/|norm| per step and ‖a−b‖/‖b‖ per parameter tensor.
# fp32: DESIGN.md §3's 1e-5: this is the mode that proves each layout computes the same training.
# bf16 (8-bit mantissa, rounding 2^-9 ≈ 2e-3) checks that the layouts also run and train alike under
# bf16 autocast. Splitting a product over tp, or a batch over ranks, rounds partial results to bf16
# at other places, so activations and gradients differ by an ulp here and there, and Adam's early
# updates are ~lr·sign(g): a few small gradient elements flip and move by 2·lr. Measured on CPU
# (torch 2.13, these parity tests): losses within 2.7e-4; parameters within 6e-6 (pp), 1.2e-3 (dp,
# pp4), 2.8e-2 (tp: the small k_proj weights of the tiny model); the matrix's gradient norms within
# 4.3e-4. The parameter bound leaves ~3.5x for other kernels (GPU); a gradient piece missing or
# counted twice moves losses and clipped norms by far more than these.
TOLERANCES = {"fp32": {"loss": 1e-5, "norm": 1e-5, "param": 1e-5},
              "bf16": {"loss": 2e-3, "norm": 1e-2, "param": 1e-1}}
if DTYPE not in TOLERANCES:
    raise ValueError(f"PLAIT_TEST_DTYPE = {DTYPE!r}: choose one of {sorted(TOLERANCES)}")
TOL = TOLERANCES[DTYPE]


def tiny_cfg(corpus_path: str, **sections) -> dict:
    """A config dict for the tiny model; `sections` = {'parallel': {...}, 'train': {...}} merged on top."""
    d = {
        "model": {"preset": "tiny"},
        "data": {"path": corpus_path, "cache_dir": str(__import__("pathlib").Path(corpus_path).parent / "cache")},
        "train": {"steps": 5, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "val_every": 0,
                  "val_samples": 8, "threads": 1, "dtype": DTYPE},
        # eps 1e-6, not 1e-8: Adam's first steps are ~sign(g) where |g| << eps is not true, so round-off in a
        # near-zero gradient element flips a whole lr-sized update; a larger eps keeps the update continuous in
        # the gradient and layouts agree to ~1e-6 instead of ~2e-5 (measured: tp=2, 4 layers).
        "optim": {"lr": 1e-2, "warmup_steps": 2, "grad_clip": 1.0, "eps": 1e-6},
        "log": {"progress": False, "plots": False},
    }
    for sec, body in sections.items():
        d.setdefault(sec, {}).update(body)
    return d


def train_run(cfg_dict: dict, steps: int | None = None) -> dict:
    """Train on this process's mesh (single, or torch.distributed's if initialized); losses + full params."""
    from plait.mesh import Mesh
    from plait.trainer import Trainer

    cfg = C.from_dict(cfg_dict)
    mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device=DEVICE)
    tr = Trainer(cfg, mesh)
    losses = [float(tr.train_step()["loss"]) for _ in range(steps or cfg.train.steps)]
    state = {k: v.cpu() for k, v in tr.full_state().items()}
    return {"losses": losses, "state": state, "rank": mesh.rank, "val": tr.evaluate()}


def reference(cfg_dict: dict, steps: int | None = None) -> dict:
    single = {k: dict(v) for k, v in cfg_dict.items()}
    single["parallel"] = {**single.get("parallel", {}), "dp": 1, "tp": 1, "pp": 1, "zero": 0}
    torch.set_num_threads(1)
    return train_run(single, steps)


def assert_parity(ref: dict, got: dict, rtol: float | None = None) -> None:
    """Losses within TOL['loss'] and parameters within TOL['param'] (or both within `rtol`)."""
    loss_tol = TOL["loss"] if rtol is None else rtol
    rtol = TOL["param"] if rtol is None else rtol
    assert len(ref["losses"]) == len(got["losses"])
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / abs(b) <= loss_tol, f"step {i + 1}: loss {a} vs reference {b}"
    assert ref["state"].keys() == got["state"].keys()
    for k, b in ref["state"].items():
        a = got["state"][k]
        assert a.shape == b.shape, f"{k}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        assert err <= rtol, f"{k}: relative error {err:.3e} > {rtol}"
    # the parameters must have moved, or the comparison proves nothing
    assert ref["losses"][-1] < ref["losses"][0]
