"""Runtime events -> simulator costs -> simulated bubble (plait.pipeline.measured,
plait.bench.pp_sim), on synthetic timelines with known costs: no processes, no timing."""

import pytest

from plait.bench.pp_sim import predict, simulated_bubble
from plait.pipeline.measured import COMM, WAIT, B, F, W, costs_from_events
from plait.planner.pipesim import simulate


def synthetic_step(schedule, p, m, v, f, b, w, lat, post=0.0):
    """The timeline the runtime would record if every compute took exactly its cost: pipesim's own
    timeline of the step, with a `post`-long comm event after each compute (the runtime's time
    between computes: posting, its own code), and a wait event before each compute that started
    later than its rank was free."""
    costs = (tuple(f), tuple(b), tuple(w))
    # each message leaves when its sender's posting ends
    oh = tuple(x + post for x in costs[0]), tuple(x + post for x in costs[1]), tuple(
        (x + post) if x else 0.0 for x in costs[2])
    res = simulate(schedule, p, m, v, oh, lat, timeline=True)
    step = []
    for r, rows in enumerate(res.timeline):
        out, free = [], 0.0
        for kind, mb, c, t0, t1 in rows:
            if t0 > free + 1e-12:
                out.append([WAIT, mb, c, free, t0])
            s = c * p + r
            dur = costs[kind][s]
            out.append([kind, mb, c, t0, t0 + dur])
            out.append([COMM, mb, c, t0 + dur, t0 + dur + post])
            free = t1
        step.append(out)
    return step, res


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1),
                                        ("interleaved_1f1b", 2)])
def test_costs_recovered_from_a_synthetic_timeline(schedule, v):
    p, m = 2, 4
    S = p * v
    f = [1.0 + 0.1 * s for s in range(S)]
    b = [2.0 + 0.2 * s for s in range(S)] if schedule != "zb_h1" else [1.0, 1.5]
    w = [0.0] * S if schedule != "zb_h1" else [0.7, 0.9]
    lat, post = 0.25, 0.05
    step, res = synthetic_step(schedule, p, m, v, f, b, w, lat, post)
    c = costs_from_events([step, step], p, v)
    assert c.F == pytest.approx(f) and c.B == pytest.approx(b) and c.W == pytest.approx(w)
    # the posting is the only time that is neither compute nor waiting: spread over computes
    n = [sum(1 for e in rows if e[0] in (F, B, W)) for rows in step]
    posts = [sum(e[4] - e[3] for e in rows if e[0] == COMM) for rows in step]
    assert c.overhead == pytest.approx([x / k for x, k in zip(posts, n)])
    if c.samples["p2p"]:
        # counted from the later of the send's and the receiver's own posting: the synthetic
        # receiver posts (for `post`) while the message flies, so up to `post` less than lat
        assert lat - post - 1e-9 <= c.p2p <= lat + 1e-9
    # the simulated bubble of the recovered costs is the bubble of the synthetic step
    busy = [sum(e[4] - e[3] for e in rows if e[0] in (F, B, W)) for rows in step]
    spans = [max(e[4] for e in rows) - min(e[3] for e in rows) for rows in step]
    measured = [1 - x / s for x, s in zip(busy, spans)]
    got = simulated_bubble([(step, measured)], schedule, p, m, v)
    assert got["sim_measured_bubble"] == pytest.approx(sum(measured) / p)
    expected = [1 - x / res.makespan for x in busy]
    assert got["sim_bubble_per_rank"] == pytest.approx(expected, rel=0.05)


def test_message_latency_moves_the_simulated_bubble():
    """A costlier message lengthens the step: the conversion must carry the measured latency."""
    p, m = 2, 4
    f, b, w = [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]
    fast, _ = synthetic_step("1f1b", p, m, 1, f, b, w, lat=0.0)
    slow, _ = synthetic_step("1f1b", p, m, 1, f, b, w, lat=1.0)
    c_fast, c_slow = costs_from_events([fast], p), costs_from_events([slow], p)
    assert c_slow.p2p == pytest.approx(1.0) and c_slow.samples["p2p"] > 0
    assert predict(c_slow, "1f1b", m)[0] > predict(c_fast, "1f1b", m)[0] + 0.05


def test_unit_costs_give_the_theory():
    """Equal stages, B = 2F, free messages: the simulated bubble is (p − 1)/(m + p − 1)."""
    p, m = 4, 8
    step, _ = synthetic_step("1f1b", p, m, 1, [1.0] * p, [2.0] * p, [0.0] * p, lat=0.0)
    c = costs_from_events([step], p)
    sim = predict(c, "1f1b", m)
    assert sum(sim) / p == pytest.approx((p - 1) / (m + p - 1))


def test_wrong_rank_count_is_refused():
    with pytest.raises(ValueError, match="2 ranks"):
        costs_from_events([[[], []]], p=3)
