"""Learning-rate and batch schedules: pure functions of the step / of the samples consumed."""

import pytest

from plait.config import from_dict
from plait.data.batching import batch_at, rank_share, samples_after
from plait.errors import ConfigError
from plait.optim import batch_lr_scale, lr_factor


def test_lr_factor_warmup_and_decays():
    assert [lr_factor(s, 10, 4, "constant", 0.1) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, 10, 4, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 4, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(7, 10, 4, "linear", 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_factor(5, 10, 0, "step", 0.1)


def test_linear_scaling_rule():
    assert batch_lr_scale(256, 32, True) == 8.0
    assert batch_lr_scale(256, 32, False) == 1.0
    # the rule's precondition is checked once, where the config is loaded
    with pytest.raises(ConfigError, match="optim.reference_batch"):
        from_dict({"optim": {"scale_lr_with_batch": True}})


def test_batch_rampup_shape():
    target, micro, n = 64, 4, 1000
    assert batch_at(0, target, micro, 0) == target  # off
    assert batch_at(0, target, micro, n) == micro  # starts at one micro-batch
    prev, s = 0, 0
    while s < n + target:
        b = batch_at(s, target, micro, n)
        # whole micro-batches, monotone
        assert b % micro == 0 and micro <= b <= target and b >= prev
        assert b <= micro + (target - micro) * s / n + 1e-9  # never above the linear ramp
        prev, s = b, s + b
    assert batch_at(n, target, micro, n) == target and batch_at(n - 1, target, micro, n) < target


def test_rampup_accounting_and_data_order_exact():
    # step n reads samples [s_n, s_n + B_n): consecutive, no gap, no overlap -> the data order of a
    # run without ramp-up; the samples consumed after k steps are a pure function of k
    target, micro, n = 32, 2, 200
    s, seen = 0, []
    for k in range(40):
        assert s == samples_after(k, target, micro, n)
        b = batch_at(s, target, micro, n)
        for dp in (1, 2, 3, 4):  # every layout reads the same samples, each exactly once
            shares = [rank_share(s, b, micro, dp, r) for r in range(dp)]
            got = [i for start, count in shares for i in range(start, start + count)]
            assert got == list(range(s, s + b))
            counts = [c // micro for _, c in shares]
            assert max(counts) - min(counts) <= 1
        seen += range(s, s + b)
        s += b
    assert seen == list(range(s))


def test_rank_share_is_the_plain_split_when_it_divides():
    assert [rank_share(100, 16, 2, 4, r) for r in range(4)] == \
           [(100, 4), (104, 4), (108, 4), (112, 4)]
    with pytest.raises(ValueError):
        rank_share(0, 15, 2, 1, 0)


def test_config_keys():
    cfg = from_dict({"optim": {"name": "lars", "scale_lr_with_batch": True, "reference_batch": 16},
                       "train": {"batch_rampup_samples": 1000}})
    assert cfg.optim.reference_batch == 16 and cfg.train.batch_rampup_samples == 1000
    with pytest.raises(ConfigError, match="train.batch_rampup_samples"):
        from_dict({"train": {"batch_rampup_samples": -1}})
    with pytest.raises(ConfigError, match="optim.scale_lr_with_batch"):
        from_dict({"optim": {"scale_lr_with_batch": 1}})
