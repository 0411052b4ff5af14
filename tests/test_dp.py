"""Data parallelism equals the single-process run of the same global batch."""

import pytest
import torch
import torch.nn as nn
from common import TOL, assert_parity, reference, tiny_cfg, train_run

from plait.comm import Comm, Group
from plait.data_parallel import GradReducer
from plait.testing import run_ranks


@pytest.mark.parametrize("dp,micro", [(1, 2), (2, 4), (2, 2), (4, 2), (4, 1)])
def test_dp_parity(corpus_path, dp, micro):
    # global batch 8: dp=2, micro=4 -> no accumulation; micro=2 -> 2 micro-batches;
    # dp=4, micro=1 -> 2
    cfg = tiny_cfg(corpus_path, parallel={"dp": dp}, train={"micro_batch": micro})
    ref = reference(cfg)
    got = run_ranks(train_run, dp, args=(cfg,), timeout=120)
    for g in got:
        assert_parity(ref, g)
    assert abs(got[0]["val"] - ref["val"]) / ref["val"] <= TOL["loss"]


def _doubled_run(cfg: dict) -> dict:
    """plait at dp = 2 with a broken reducer that doubles every reduced gradient."""
    from plait.data_parallel.reducer import GradReducer as Reducer

    finish = Reducer.finish

    def doubled(self):
        finish(self)
        for b in self.buckets:
            b.buffer.mul_(2.0)

    Reducer.finish = doubled
    return train_run(cfg)


def test_parity_catches_gradients_off_by_a_constant_factor(corpus_path):
    """AdamW's update is nearly scale-free and clipping normalizes the gradient, so doubled
    gradients barely move losses and parameters;
    the gradient norms expose them, and assert_parity compares them."""
    cfg = tiny_cfg(corpus_path, parallel={"dp": 2})
    ref = reference(cfg)
    got = run_ranks(_doubled_run, 2, args=(cfg,), timeout=120)
    with pytest.raises(AssertionError, match="norm"):
        assert_parity(ref, got[0])


def test_parity_treats_nan_as_an_error():
    from plait.parity import errors

    ref = {"losses": [2.0, 1.0], "norms": [1.0, 1.0], "state": {"w": torch.ones(3)}}
    for bad in ({"losses": [float("nan"), 1.0]}, {"norms": [1.0, float("nan")]},
                {"state": {"w": torch.tensor([1.0, float("nan"), 1.0])}}):
        got = {**ref, **bad}
        assert max(errors(ref, got).values()) == float("inf"), bad


def _uneven_worker():
    import torch.distributed as dist

    from plait.mesh import Mesh

    mesh = Mesh.build(dp=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    # rank 0 holds 3 samples, rank 1 holds 2: each scales its summed loss by the global count
    mine = x[:3] if dist.get_rank() == 0 else x[3:]
    red = GradReducer(list(model.parameters()), mesh.dp, mesh.comm, bucket_bytes=64,
                      first_bucket_bytes=32)
    (model(mine).pow(2).sum() / 5).backward()
    red.finish()
    return [p.grad.clone() for p in model.parameters()], len(red.buckets)


def test_reducer_uneven_batches_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    (model(x).pow(2).sum() / 5).backward()
    ref = [p.grad for p in model.parameters()]
    out = run_ranks(_uneven_worker, 2)
    for grads, nbuckets in out:
        assert nbuckets > 1  # small buckets: several all-reduces, issued in order
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reducer_single_rank_keeps_grads_and_zeroes():
    model = nn.Linear(4, 2)
    red = GradReducer(list(model.parameters()), Group("dp", (0,), 0), Comm())
    model(torch.ones(3, 4)).sum().backward()
    g = model.weight.grad.clone()
    model.zero_grad(set_to_none=True)  # a user's zero_grad must not break the bucket views
    model(torch.ones(3, 4)).sum().backward()
    red.finish()
    torch.testing.assert_close(model.weight.grad, g)
    assert model.weight.grad.data_ptr() == red.buckets[0].views[id(model.weight)].data_ptr()
    red.zero_grad()
    assert float(model.weight.grad.abs().sum()) == 0.0
