"""Pipeline schedules as data, checked with no processes: all ranks simulated together."""

import pytest

from plait.pipeline.schedules import (
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    ScheduleError,
    SendActivation,
    SendGrad,
    build,
    forward_only,
    lockstep,
    one_f_one_b_order,
)
from plait.pipeline.simulate import simulate

CASES = ([(name, 1) for name in ("gpipe", "1f1b", "zb_h1")]
         + [("interleaved_1f1b", 2), ("interleaved_1f1b", 3)])
GRID = [(p, m) for p in (1, 2, 3, 4, 8) for m in (p, p + 1, 2 * p, 3 * p, 17)]


def programs(name, p, m, v):
    return [build(name, r, p, m, v) for r in range(p)]


def runnable(name, p, m, v):
    return not ((v > 1 and (p == 1 or m % p)) or (name == "interleaved_1f1b" and m % p))


@pytest.mark.parametrize("name,v", CASES)
def test_every_schedule_is_consistent_and_deadlock_free(name, v):
    for p, m in GRID:
        if not runnable(name, p, m, v):
            continue
        progs = programs(name, p, m, v)
        simulate(progs, p, v, m)  # rendezvous: raises on a mismatch, a missing step or a deadlock
        for prog in progs:
            # every forward precedes its backward, every B precedes its W,
            # one optimizer step at the end
            at = {(type(i).__name__, i.mb, i.chunk): k for k, i in enumerate(prog)
                  if not isinstance(i, OptimizerStep)}
            for mb in range(m):
                for c in range(v):
                    f = at[("Forward", mb, c)]
                    if name == "zb_h1":
                        assert f < at[("BackwardInput", mb, c)] < at[("BackwardWeight", mb, c)]
                    else:
                        assert f < at[("Backward", mb, c)]
            assert prog[-1] == OptimizerStep() and prog.count(OptimizerStep()) == 1


@pytest.mark.parametrize("name,v", CASES)
def test_instruction_counts(name, v):
    p, m = 4, 8
    progs = programs(name, p, m, v)
    S = p * v
    for r, prog in enumerate(progs):
        def count(t, prog=prog):
            return sum(isinstance(i, t) for i in prog)

        assert count(Forward) == m * v
        if name == "zb_h1":
            assert count(BackwardInput) == count(BackwardWeight) == m and count(Backward) == 0
        else:
            assert count(Backward) == m * v and count(BackwardInput) == count(BackwardWeight) == 0
        stages = [c * p + r for c in range(v)]
        assert count(SendActivation) == m * sum(s < S - 1 for s in stages)
        assert count(RecvActivation) == m * sum(s > 0 for s in stages)
        assert count(SendGrad) == m * sum(s > 0 for s in stages)
        assert count(RecvGrad) == m * sum(s < S - 1 for s in stages)
    total = sum(isinstance(i, SendActivation) for prog in progs for i in prog)
    assert total == m * (S - 1)  # one message per micro-batch per stage boundary


@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (4, 4), (4, 9), (8, 8), (8, 20)])
def test_in_flight_bounds(p, m):
    one = simulate(programs("1f1b", p, m, 1), p, 1, m)
    assert max(one.peak_in_flight) <= p
    assert one.peak_in_flight == [min(p - r, m) for r in range(p)]
    assert simulate(programs("gpipe", p, m, 1), p, 1, m).peak_in_flight == [m] * p
    assert max(simulate(programs("zb_h1", p, m, 1), p, 1, m).peak_in_flight) <= p


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_simulated_bubbles_match_theory(p, m):
    theory = (p - 1) / (m + p - 1)
    for name in ("gpipe", "1f1b"):
        res = simulate(programs(name, p, m, 1), p, 1, m, rendezvous=False)
        assert res.makespan == 3 * (m + p - 1)
        assert all(abs(b - theory) < 1e-12 for b in res.bubble)
    v = 2
    inter = simulate(programs("interleaved_1f1b", p, m, v), p, v, m, rendezvous=False)
    ideal = 3 * m * v  # in units of one chunk's forward
    assert (inter.makespan - ideal) / ideal == pytest.approx((p - 1) / (v * m))
    zb = simulate(programs("zb_h1", p, m, 1), p, 1, m, rendezvous=False)
    assert 3 * m + p - 1 <= zb.makespan <= 3 * m + p + 1
    assert zb.makespan < 3 * (m + p - 1)  # below 1F1B


def test_forward_only_any_number_of_micro_batches():
    for p, m, v in [(2, 1, 1), (4, 3, 1), (4, 6, 1), (2, 3, 2), (4, 5, 2)]:
        progs = [forward_only(r, p, m, v) for r in range(p)]
        res = simulate(progs, p, v, m, train=False)
        assert all(c["Forward"] == m * v for c in res.counts)


def test_checker_rejects_broken_programs():
    p, m = 2, 4
    good = programs("1f1b", p, m, 1)
    # a backward before its forward
    bad = [list(prog) for prog in good]
    k = next(i for i, ins in enumerate(bad[1]) if isinstance(ins, Backward))
    bad[1].insert(0, bad[1].pop(k))
    with pytest.raises(ScheduleError, match="backward before its forward"):
        simulate(bad, p, 1, m)
    # messages in a different order on the two sides
    bad = [list(prog) for prog in good]
    recvs = [i for i, ins in enumerate(bad[1]) if isinstance(ins, RecvActivation)]
    bad[1][recvs[0]], bad[1][recvs[1]] = bad[1][recvs[1]], bad[1][recvs[0]]
    with pytest.raises(ScheduleError):
        simulate(bad, p, 1, m)
    # a micro-batch never backwarded
    bad = [[ins for ins in prog if ins != Backward(3)] for prog in good]
    with pytest.raises(ScheduleError):
        simulate(bad, p, 1, m)
    # both ranks receive before they send: a deadlock
    dead = [[RecvGrad(0, 0, 1), Forward(0), SendActivation(0, 0, 1), Backward(0), OptimizerStep()],
            [RecvActivation(0, 0, 0), Forward(0), Backward(0), SendGrad(0, 0, 0), OptimizerStep()]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(dead, 2, 1, 1)


def test_naive_interleaved_placement_would_deadlock_under_rendezvous():
    """Why messages are placed by `lockstep`: receive-right-before / send-right-after hangs NCCL."""
    from plait.pipeline.schedules import interleaved_order, place, stage_of

    p, m, v = 2, 4, 2

    def naive(rank):
        for ins in interleaved_order(rank, p, m, v):
            s = stage_of(rank, ins.chunk, p)
            if isinstance(ins, Forward):
                if s > 0:
                    yield RecvActivation(ins.mb, ins.chunk, place(s - 1, p)[0])
                yield ins
                if s < p * v - 1:
                    yield SendActivation(ins.mb, ins.chunk, place(s + 1, p)[0])
            else:
                if s < p * v - 1:
                    yield RecvGrad(ins.mb, ins.chunk, place(s + 1, p)[0])
                yield ins
                if s > 0:
                    yield SendGrad(ins.mb, ins.chunk, place(s - 1, p)[0])
        yield OptimizerStep()

    progs = [list(naive(r)) for r in range(p)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(progs, p, v, m)
    simulate(progs, p, v, m, rendezvous=False)  # fine when sends never block
    simulate(programs("interleaved_1f1b", p, m, v), p, v, m)


def test_lockstep_pairs_messages_at_the_same_instant():
    p, m = 3, 6
    progs = lockstep([list(one_f_one_b_order(r, p, m)) for r in range(p)], p)
    # the middle rank's steady state: a forward's send and the next backward's receive in one batch
    mid = progs[1]
    pairs = [(a, b) for a, b in zip(mid, mid[1:])
             if isinstance(a, SendActivation) and isinstance(b, RecvGrad)]
    assert pairs


def test_invalid_combinations_are_clear_errors():
    with pytest.raises(ScheduleError, match="m >= p"):
        build("1f1b", 0, 4, 3)
    with pytest.raises(ScheduleError, match="interleaved_1f1b"):
        build("1f1b", 0, 2, 4, v=2)
    with pytest.raises(ScheduleError, match="multiple of p"):
        build("interleaved_1f1b", 0, 2, 5, v=2)
    with pytest.raises(ScheduleError, match="unknown pipeline schedule"):
        build("pipedream", 0, 2, 4)
