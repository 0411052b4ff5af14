"""Shared pieces of the parity tests: a tiny config, plait's run, the references, the comparison.

The reference of an engine's parity test is `reference()`: plain PyTorch (plait.parity's
plain_reference: the model class, torch.optim.AdamW, clip_grad_norm_, accumulation by hand).
`single_process()` is plait's own loop on one rank, for features plain PyTorch does not have
(sync strategies, compression, LAMB, batch ramp-up); each of those has a test of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from plait import parity

# PLAIT_TEST_DEVICE=cuda runs the parity tests with CUDA tensors (several gloo ranks sharing one
# GPU); PLAIT_TEST_DTYPE=bf16 runs them, and their single-process reference, under bf16 autocast
DEVICE = os.environ.get("PLAIT_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("PLAIT_TEST_DTYPE", "fp32")
# Relative tolerances: |Δloss|/|loss|, |Δnorm|/|norm| per step and ‖a−b‖/‖b‖ per parameter tensor.
# fp32: the parity contract's 1e-5 (docs/architecture.md): the mode that proves each layout computes
# the same training.
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
    """A config dict for the tiny model; `sections` = {'parallel': {...}, 'train': {...}} merged on
    top."""
    d = {
        "model": {"preset": "tiny"},
        "data": {"path": corpus_path, "cache_dir": str(Path(corpus_path).parent / "cache")},
        "train": {"steps": 5, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "val_every": 0,
                  "val_samples": 8, "threads": 1, "dtype": DTYPE},
        # eps 1e-6, not 1e-8: Adam's first steps are ~sign(g) where |g| << eps is not true, so
        # round-off in a near-zero gradient element flips a whole lr-sized update; a larger eps
        # keeps the update continuous in the gradient and layouts agree to ~1e-6 instead of ~2e-5
        # (measured: tp=2, 4 layers).
        "optim": {"lr": 1e-2, "warmup_steps": 2, "grad_clip": 1.0, "eps": 1e-6},
        "log": {"progress": False, "plots": False},
    }
    for sec, body in sections.items():
        d.setdefault(sec, {}).update(body)
    return d


def train_run(cfg_dict: dict, steps: int | None = None) -> dict:
    """plait on this process's mesh (single, or torch.distributed's if initialized)."""
    return parity.train_case(cfg_dict, DEVICE, steps)


def reference(cfg_dict: dict, steps: int | None = None) -> dict:
    """The independent reference: the same run in plain PyTorch, in this process."""
    return parity.reference(cfg_dict, DEVICE, steps)


def single_process(cfg_dict: dict, steps: int | None = None) -> dict:
    """plait's own loop on one process (see the module docstring for when it is the reference)."""
    return parity.single_process(cfg_dict, DEVICE, steps)


def assert_parity(ref: dict, got: dict, rtol: float | None = None) -> None:
    """Every step's loss and gradient norm, and every parameter,
    within TOL (or all within `rtol`)."""
    tol = TOL if rtol is None else {"loss": rtol, "norm": rtol, "param": rtol}
    err = parity.errors(ref, got)
    for what in ("loss", "norm", "param"):
        assert err[what] <= tol[what], (
            f"{what}: relative error {err[what]:.3e} > {tol[what]} (losses {got['losses']} vs "
            f"{ref['losses']}, norms {got['norms']} vs {ref['norms']}"
            f"{', key ' + err['bad_key'] if 'bad_key' in err else ''})")
    # the parameters must have moved, or the comparison proves nothing
    assert ref["losses"][-1] < ref["losses"][0]
