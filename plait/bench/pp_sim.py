"""`plait bench pp --simulate`: the bubble plait's simulator predicts from the measured costs.

The timelines of measured steps (plait.pipeline.measured) give the median F, B, W per stage, each
rank's overhead per compute instruction and the median message latency; the planner's pipeline
simulator (plait.planner.pipesim, which runs the very programs the runtime runs) times one step
with them. Its bubble is defined as the runtime's: per rank 1 − compute time / step time, here
the simulated makespan; the mean over ranks is compared with the mean of the measured bubbles of
the same steps.
"""

from __future__ import annotations

import statistics

from plait.pipeline.measured import MeasuredCosts, costs_from_events


def predict(costs: MeasuredCosts, schedule: str, m: int) -> list[float]:
    """Per-rank bubble of one step simulated with `costs`."""
    from plait.planner.pipesim import simulate

    res = simulate(schedule, costs.p, m, costs.v, costs.simulator_costs(), costs.p2p)
    return [1.0 - c / res.makespan for c in costs.compute_per_rank(m)]


def simulated_bubble(timelines: list, schedule: str, p: int, m: int, v: int) -> dict:
    """`timelines`: per measured step, (per-rank event rows, per-rank measured bubbles)."""
    costs = costs_from_events([t for t, _ in timelines], p, v)
    sim = predict(costs, schedule, m)
    measured = [statistics.median(b[r] for _, b in timelines) for r in range(p)]
    mean_sim, mean_meas = sum(sim) / p, sum(measured) / p
    return {"sim_bubble": mean_sim, "sim_bubble_per_rank": sim,
            "sim_measured_bubble": mean_meas,
            "sim_rel_err": abs(mean_meas - mean_sim) / mean_sim if mean_sim else float("inf"),
            "sim_costs_ms": {"F": [1e3 * f for f in costs.F], "B": [1e3 * b for b in costs.B],
                             "W": [1e3 * w for w in costs.W],
                             "overhead": [1e3 * o for o in costs.overhead],
                             "p2p": 1e3 * costs.p2p},
            "sim_samples": costs.samples}
