"""The parity matrix: every dp × tp × pp (× ZeRO) layout against the single-process run.

DESIGN.md §3: same seed, same global batch, fp32 → each step's loss, each step's global gradient
norm (before clipping) and, after the last step, every parameter gathered back to full shape equal
the single-process run's within 1e-5 relative. The layouts of one world size run in one spawn of
that many ranks (each case builds its own mesh and trainer), so the matrix pays for process start
and imports once per world size, not once per layout.

    ref = reference(cfg)                              # this process, dp = tp = pp = 1
    got = run_layouts(cfg, matrix(zeros=(0, 1)))     # {layout name: result, or a traceback string}
    errors(ref, got["dp2-tp2-pp1-zero1"])            # {"loss": ..., "norm": ..., "param": ...}

`scripts/parity_matrix.py` runs the whole matrix and writes docs/parity_matrix.md;
tests/test_hybrid.py runs it (or a sample of its 8-rank layouts) as parameterized tests.
"""

from __future__ import annotations

import itertools
import traceback
from typing import NamedTuple

import torch

from plait import config as C


class Layout(NamedTuple):
    dp: int
    tp: int
    pp: int
    zero: int = 0

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        return f"dp{self.dp}-tp{self.tp}-pp{self.pp}-zero{self.zero}"


def matrix(dps=(1, 2), tps=(1, 2), pps=(1, 2), zeros=(0,)) -> list[Layout]:
    """Every combination except the single process itself. ZeRO shards over dp, and at dp = 1 it is
    the plain path (parallelize builds no ZeRO wrapper), so ZeRO > 0 appears with dp > 1 only."""
    out = []
    for dp, tp, pp, z in itertools.product(dps, tps, pps, zeros):
        if dp * tp * pp == 1 or (z and dp == 1):
            continue
        out.append(Layout(dp, tp, pp, z))
    return out


def layout_config(base: dict, layout: Layout, **train) -> dict:
    d = {k: dict(v) for k, v in base.items()}
    d["parallel"] = {**d.get("parallel", {}), "dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "zero": layout.zero}
    d["train"] = {**d.get("train", {}), **train}
    return d


def train_case(cfg_dict: dict, device: str = "cpu") -> dict:
    """Train `cfg_dict` on this process's world: per-step losses and gradient norms, full parameters."""
    from plait.mesh import Mesh
    from plait.trainer import Trainer

    cfg = C.from_dict(cfg_dict)
    mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device=device)
    tr = Trainer(cfg, mesh)
    losses, norms = [], []
    for _ in range(cfg.train.steps):
        out = tr.train_step()
        losses.append(float(out["loss"]))
        norms.append(None if out["grad_norm"] is None else float(out["grad_norm"]))
    state = {k: v.detach().cpu() for k, v in tr.full_state().items()}
    return {"losses": losses, "norms": norms, "state": state, "rank": mesh.rank,
            "comm": mesh.comm.stats.total_bytes}


def run_cases(cases: list[tuple[str, dict]], device: str = "cpu") -> dict:
    """On every rank: each (name, config) in turn; {name: result, or the traceback of its failure}."""
    out = {}
    for name, cfg_dict in cases:
        try:
            out[name] = train_case(cfg_dict, device)
        except Exception:  # noqa: BLE001 - reported per case, the other cases still run
            out[name] = traceback.format_exc()
    return out


def reference(base: dict, device: str = "cpu") -> dict:
    """The single-process run of `base` (in this process)."""
    torch.set_num_threads(1)
    return train_case(layout_config(base, Layout(1, 1, 1, 0)), device)


def run_layouts(base: dict, layouts: list[Layout], timeout: float = 600.0, device: str = "cpu") -> dict:
    """Run `layouts` grouped by world size, one spawn per size; {name: [result per rank] or traceback}."""
    from plait.testing import RankFailure, run_ranks

    results: dict = {}
    for world in sorted({lay.world for lay in layouts}):
        cases = [(lay.name, layout_config(base, lay)) for lay in layouts if lay.world == world]
        try:
            per_rank = run_ranks(run_cases, world, args=(cases, device), timeout=timeout)
        except RankFailure as e:  # a hang or crash takes the whole spawn: every case of it failed
            results.update({name: str(e) for name, _ in cases})
            continue
        for name, _ in cases:
            failed = [r[name] for r in per_rank if isinstance(r[name], str)]
            results[name] = failed[0] if failed else [r[name] for r in per_rank]
    return results


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def errors(ref: dict, got: dict) -> dict:
    """Largest relative errors of one rank's result: per-step loss, per-step gradient norm, parameter."""
    loss = max(_rel(a, b) for a, b in zip(got["losses"], ref["losses"]))
    pairs = [(a, b) for a, b in zip(got["norms"], ref["norms"]) if a is not None and b is not None]
    norm = max((_rel(a, b) for a, b in pairs), default=float("nan"))
    param = 0.0
    for k, b in ref["state"].items():
        a = got["state"].get(k)
        if a is None or a.shape != b.shape:
            return {"loss": loss, "norm": norm, "param": float("inf"), "bad_key": k}
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        param = max(param, float(err))
    return {"loss": loss, "norm": norm, "param": param}
