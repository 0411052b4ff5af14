"""Shared pieces of the parity tests: a tiny config, the single-process reference, the comparison."""

from __future__ import annotations

import os

import torch

from plait import config as C

RTOL = 1e-5  # DESIGN.md §3: |Δloss|/|loss| and ‖a−b‖/‖b‖ per tensor
# PLAIT_TEST_DEVICE=cuda runs the parity tests with CUDA tensors (several gloo ranks sharing one GPU)
DEVICE = os.environ.get("PLAIT_TEST_DEVICE", "cpu")


def tiny_cfg(corpus_path: str, **sections) -> dict:
    """A config dict for the tiny model; `sections` = {'parallel': {...}, 'train': {...}} merged on top."""
    d = {
        "model": {"preset": "tiny"},
        "data": {"path": corpus_path, "cache_dir": str(__import__("pathlib").Path(corpus_path).parent / "cache")},
        "train": {"steps": 5, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "val_every": 0,
                  "val_samples": 8, "threads": 1},
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


def assert_parity(ref: dict, got: dict, rtol: float = RTOL) -> None:
    assert len(ref["losses"]) == len(got["losses"])
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / abs(b) <= rtol, f"step {i + 1}: loss {a} vs reference {b}"
    assert ref["state"].keys() == got["state"].keys()
    for k, b in ref["state"].items():
        a = got["state"][k]
        assert a.shape == b.shape, f"{k}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        assert err <= rtol, f"{k}: relative error {err:.3e} > {rtol}"
    # the parameters must have moved, or the comparison proves nothing
    assert ref["losses"][-1] < ref["losses"][0]
