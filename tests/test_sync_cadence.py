"""Sync cadences as data (plait.sync.cadence): no processes, no tensors."""

from itertools import islice

import pytest

from plait.sync.cadence import (
    Apply,
    InnerStep,
    Send,
    delayed_schedule,
    every_step_schedule,
    send_offset,
    sends_per_step,
    streaming_schedule,
)

# (H, P, τ)
LAYOUTS = [(1, 1, 0), (4, 1, 0), (4, 2, 1), (8, 4, 3), (6, 4, 2), (12, 3, 5), (5, 5, 4), (7, 2, 0)]


def _sends(steps):
    return [i for s in steps for i in s if isinstance(i, Send)]


def _applies(steps):
    return [i for s in steps for i in s if isinstance(i, Apply)]


def test_every_step_only_steps():
    steps = list(every_step_schedule(steps=5))
    assert steps == [(InnerStep(t),) for t in range(1, 6)]


def test_diloco_cadence_syncs_every_h_steps_blocking():
    steps = list(streaming_schedule(every=3, steps=9))
    for t, instrs in enumerate(steps, start=1):
        if t % 3:
            assert instrs == (InnerStep(t),)
        else:  # the inner step, then the blocking sync of the one fragment
            assert instrs == (InnerStep(t), Send(t, 0), Apply(t, 0, t, final=t == 9))


@pytest.mark.parametrize("every,fragments,delay", LAYOUTS)
def test_streaming_each_fragment_every_h_applied_tau_later(every, fragments, delay):
    steps = list(islice(streaming_schedule(every, fragments, delay), 10 * every))
    for s in steps:
        assert isinstance(s[0], InnerStep)  # the inner step comes first in every step
        assert sum(isinstance(i, Send) for i in s) <= 1  # staggered: the peak is one fragment
    sends = _sends(steps)
    for p in range(fragments):
        times = [s.step for s in sends if s.fragment == p]
        assert times[0] <= every and all(b - a == every for a, b in zip(times, times[1:]))
        assert all(t % every == send_offset(p, every, fragments) for t in times)
    applies = {(a.fragment, a.sent): a.step for a in _applies(steps)}
    for s in sends:
        if s.step + delay <= len(steps):
            assert applies[(s.fragment, s.step)] == s.step + delay
    # a fragment is applied before it is sent again (delay < every)
    for a in _applies(steps):
        nxt = [s.step for s in sends if s.fragment == a.fragment and s.step > a.sent]
        assert not nxt or a.step <= nxt[0]


@pytest.mark.parametrize("every,fragments,delay", LAYOUTS)
def test_streaming_average_is_one_full_model_per_h_steps(every, fragments, delay):
    # P fragments of 1/P of the model, each once per H steps: bytes/step → (full sync)/H
    n = 20 * every
    counts = sends_per_step(streaming_schedule(every, fragments, delay), n)
    assert sum(counts) == 20 * fragments
    assert max(counts) == 1


def test_streaming_offsets_are_staggered_evenly():
    assert [send_offset(p, 8, 4) for p in range(4)] == [2, 4, 6, 0]
    assert [send_offset(p, 12, 3) for p in range(3)] == [4, 8, 0]
    sends = _sends(streaming_schedule(8, 4, 1, steps=16))
    assert [(s.step, s.fragment) for s in sends][:4] == [(2, 0), (4, 1), (6, 2), (8, 3)]


@pytest.mark.parametrize("every,fragments,delay", LAYOUTS)
@pytest.mark.parametrize("extra", [0, 1, 2])
def test_streaming_last_step_leaves_nothing_in_flight_and_every_fragment_final(
        every, fragments, delay, extra):
    T = 2 * every + extra
    steps = list(streaming_schedule(every, fragments, delay, steps=T))
    assert len(steps) == T
    sends, applies = _sends(steps), _applies(steps)
    # every send is applied exactly once, never before it was sent
    assert sorted((s.fragment, s.step) for s in sends) == \
           sorted((a.fragment, a.sent) for a in applies)
    assert all(a.step >= a.sent for a in applies)
    last = [a for a in applies if a.step == T]
    assert sorted(a.fragment for a in last) == list(range(fragments))
    assert all(a.final for a in last) and not any(a.final for a in applies if a.step < T)
    # in the last step the sends come before the applies
    # (FIFO: new exchanges queue after older ones)
    kinds = [type(i).__name__ for i in steps[-1]]
    assert kinds == \
           ["InnerStep"] + ["Send"] * kinds.count("Send") + ["Apply"] * kinds.count("Apply")


def test_streaming_tau_zero_sends_and_applies_in_the_same_step():
    for s in streaming_schedule(4, 2, 0, steps=8):
        sent = {i.fragment for i in s if isinstance(i, Send)}
        applied = {i.fragment for i in s if isinstance(i, Apply) and i.sent == i.step}
        assert sent == applied


def test_delayed_applies_the_gradient_of_tau_steps_ago():
    steps = list(delayed_schedule(1, steps=5))
    assert steps[0] == (Send(1, 0),)  # the first step has no old gradient: no update
    for t in range(2, 5):
        assert steps[t - 1] == (Send(t, 0), Apply(t, 0, t - 1))
    # drained
    assert steps[4] == (Send(5, 0), Apply(5, 0, 4, final=True), Apply(5, 0, 5, final=True))
    for tau in (1, 2, 3):
        applies = _applies(delayed_schedule(tau, steps=10))
        assert [a.sent for a in applies] == list(range(1, 11))  # 10 steps, 10 updates, in order
        assert all(a.step - a.sent == tau for a in applies if not a.final)


@pytest.mark.parametrize("make", [lambda s, st: streaming_schedule(6, 3, 2, steps=s, start=st),
                                  lambda s, st: delayed_schedule(2, steps=s, start=st),
                                  lambda s, st: every_step_schedule(steps=s, start=st)])
def test_resume_continues_the_same_cadence(make):
    whole = list(make(20, 1))
    assert list(make(20, 8)) == whole[7:]
    assert list(islice(make(None, 5), 6)) == [s for s in whole[4:10]
                                              if not any(getattr(i, "final", 0) for i in s)]


def test_bad_cadences_raise():
    with pytest.raises(ValueError, match="fragments <= every"):
        next(streaming_schedule(2, 4, 0))
    with pytest.raises(ValueError, match="delay < every"):
        next(streaming_schedule(4, 2, 4))
    with pytest.raises(ValueError, match="delay >= 1"):
        next(delayed_schedule(0))
