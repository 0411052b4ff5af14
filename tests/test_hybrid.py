"""The parity matrix: dp × tp × pp × ZeRO layouts equal the single-process run (plait.parity).

Every layout trains the tiny model (2 blocks) for 5 fp32 steps on a global batch of 8 sequences
in micro-batches of 2 (gradient accumulation: 4 micro-batches per step at dp = 1, 2 at dp = 2),
with gradient clipping active on every step (optim.grad_clip below the gradient norm, asserted),
and must match the single-process run within 1e-5 relative: each step's loss, each step's global
gradient norm (the clip factor's input: tp-replicated parameters counted once, pipeline stages
and ZeRO shards summed), every parameter at the end. Under PLAIT_TEST_DTYPE=bf16 both sides run
bf16 autocast and tests/common.py's bf16 tolerances apply.

Layouts of one world size share one spawn of that many ranks (3 spawns for the 19 layouts: about
30 s on 2 idle cores, a minute when they are busy). `PLAIT_PARITY_SAMPLE=1` keeps two of the four
8-rank layouts for slower machines; `scripts/parity_matrix.py` runs the same matrix and writes
docs/parity_matrix.md.
"""

import os

import pytest
from common import DEVICE, TOL, tiny_cfg

from plait import parity

# ZeRO stage: one parameter of the matrix (plait.parity.matrix drops ZeRO at dp = 1)
ZERO = (0, 1, 2, 3)
# below every step's gradient norm (~1-2.5) of this run: clipping is active on every step
CLIP = 0.05
SAMPLE = os.environ.get("PLAIT_PARITY_SAMPLE", "") not in ("", "0")
# ZeRO-1 (the 3-D example) and ZeRO-3 (FSDP2)
SAMPLE_8 = {parity.Layout(2, 2, 2, 1), parity.Layout(2, 2, 2, 3)}
LAYOUTS = [lay for lay in parity.matrix(zeros=ZERO)
           if not SAMPLE or lay.world < 8 or lay in SAMPLE_8]


def base_cfg(corpus_path: str) -> dict:
    return tiny_cfg(corpus_path, model={"n_layers": 2}, optim={"grad_clip": CLIP})


@pytest.fixture(scope="module")
def ref(corpus_path):
    return parity.reference(base_cfg(corpus_path), DEVICE)


class _Spawns:
    """Runs each world size's layouts in one spawn, the first time one of them is asked for."""

    def __init__(self, base: dict):
        self.base = base
        self.results: dict = {}

    def get(self, layout: parity.Layout):
        if layout.name not in self.results:
            same = [lay for lay in LAYOUTS if lay.world == layout.world]
            self.results.update(parity.run_layouts(self.base, same, timeout=600, device=DEVICE))
        return self.results[layout.name]


@pytest.fixture(scope="module")
def spawns(corpus_path):
    return _Spawns(base_cfg(corpus_path))


def _check(ref, got, what="parity"):
    assert not isinstance(got, str), f"the layout failed:\n{got}"
    assert all(n > CLIP for n in ref["norms"]), (f"clipping must be active on every step: norms "
                                                 f"{ref['norms']}")
    assert ref["losses"][-1] < ref["losses"][0]  # the run trains: the comparison means something
    for rank, res in enumerate(got):
        e = parity.errors(ref, res)
        assert e["loss"] <= TOL["loss"], (f"rank {rank}: losses {res['losses']} vs reference "
                                          f"{ref['losses']}")
        assert e["norm"] <= TOL["norm"], (f"rank {rank}: gradient norms {res['norms']} vs "
                                          f"reference {ref['norms']}")
        assert e["param"] <= TOL["param"], f"rank {rank}: parameters differ by {e}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_parity_matrix(spawns, ref, layout):
    _check(ref, spawns.get(layout))


@pytest.mark.parametrize("layout",
                         [parity.Layout(1, 2, 1), parity.Layout(1, 1, 2), parity.Layout(1, 2, 2)],
                         ids=lambda x: x.name)
def test_global_grad_norm_across_tp_and_pp(spawns, ref, layout):
    # the norm that sets the clip factor: squares summed over mesh.mp, tp-replicated parameters once
    got = spawns.get(layout)
    assert not isinstance(got, str), got
    for res in got:
        for a, b in zip(res["norms"], ref["norms"]):
            assert b > CLIP and abs(a - b) / b <= TOL["norm"], (f"norms {res['norms']} vs "
                                                                f"reference {ref['norms']}")


def test_matrix_covers_every_combination():
    full = parity.matrix(zeros=ZERO)
    # 7 layouts besides the single process; ZeRO > 0 on the 4 with dp 2
    assert len(full) == 7 + 4 * len(ZERO[1:])
    assert {(lay.dp, lay.tp, lay.pp) for lay in full} == {(d, t, p) for d in (1, 2) for t in (1, 2)
                                                          for p in (1, 2) if d * t * p > 1}
    assert all(lay.world <= 8 for lay in full)
