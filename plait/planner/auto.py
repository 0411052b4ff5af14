"""`plait train parallel.auto=true`: the planner chooses the layout of a run, the run reports how
close the prediction came.

The launcher (or, started by hand under torchrun, each worker: the plan is a pure function of the
config, the world size and the cluster) calls `resolve(cfg, world, cluster)`: it plans with
`plan_for_world`, prints the choice and the prediction, and returns the config with the layout
applied and `parallel.auto = false`, plus the same as `key=value` overrides for the workers, so
every worker runs exactly the chosen layout and none plans again. `write_plan` keeps the plan in the
run folder (`plan.json`); at the end of the run `compare(plan, summary, tokens_per_step)` puts the
prediction beside the measurement in summary.json (`plan`): step time from the steady steps'
tokens/s, and rank 0's model state (parameters, gradients, optimizer state, counted from the tensors
held) beside the formula's. Peak memory is shown, not compared: on CPU it is the process's RSS
(interpreter, libraries, allocator caches), which no formula of the model predicts.

Several nodes: each node's launcher plans on its own, so every node must plan on the same cluster
description (`--cluster FILE|PROFILE`, not the per-machine `local` calibration).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from plait.errors import ConfigError

# the parallel.* keys the planner chooses (train.micro_batch and train.activation_checkpointing too)
CHOSEN = ("dp", "tp", "pp", "zero", "schedule", "virtual_stages", "microbatches",
          "sequence_parallel")


def check_not_set(cfg) -> None:
    """ConfigError naming the keys set by hand that parallel.auto = true would choose."""
    from plait.config.schema import ParallelConfig

    default = ParallelConfig()
    clash = [f"parallel.{k}" for k in CHOSEN if getattr(cfg.parallel, k) != getattr(default, k)]
    if clash:
        raise ConfigError(f"parallel.auto = true chooses the layout, but {', '.join(clash)} "
                          f"{'is' if len(clash) == 1 else 'are'} set: remove "
                          f"{'it' if len(clash) == 1 else 'them'}, or set parallel.auto=false "
                          "to keep your layout")


def overrides(layout: dict) -> list[str]:
    """The layout as `key=value` overrides, with parallel.auto=false (the workers do not plan)."""
    return [f"parallel.dp={layout['dp']}", f"parallel.tp={layout['tp']}",
            f"parallel.pp={layout['pp']}", f"parallel.zero={layout['zero']}",
            f"parallel.schedule={layout['schedule']}",
            f"parallel.virtual_stages={layout['virtual_stages']}",
            f"parallel.sequence_parallel={str(layout['sequence_parallel']).lower()}",
            f"train.micro_batch={layout['micro_batch']}",
            f"train.activation_checkpointing={layout['activation_checkpointing']}",
            "parallel.auto=false"]


def resolve(cfg, world: int, cluster: str = "auto", nnodes: int = 1, log=print):
    """Plan `cfg` for `world` ranks: (config with the layout applied, overrides, plan record)."""
    from dataclasses import replace

    from plait.planner import detect_cluster, plan_for_world
    from plait.planner.cluster import load_cluster
    from plait.planner.layout import Layout, apply

    check_not_set(cfg)
    if nnodes > 1 and cluster in ("auto", "local"):
        raise ConfigError(f"parallel.auto = true with --nnodes {nnodes}: each node plans on its "
                          "own, so all must plan on the same cluster; pass --cluster FILE (or a "
                          "shipped profile) describing the whole cluster, the same on every node")
    clus = detect_cluster() if cluster == "auto" else load_cluster(cluster)
    layout, pred = plan_for_world(cfg, world, clus)
    lay = Layout(**layout)
    record = {"cluster": clus.name, "world": world, "layout": layout,
              "predicted": {"step_s": pred["step_s"], "tokens_per_s": pred["tokens_per_s"],
                            "mfu": pred["mfu"], "memory_bytes": pred["memory_bytes"],
                            "model_state_bytes": _state(pred["memory_rank0"])}}
    log(f"plait: parallel.auto: {lay.short()} for {world} ranks on {clus.name}; predicted "
        f"{pred['step_s']:.3g} s/step, {pred['tokens_per_s']:,.0f} tok/s, "
        f"{pred['memory_bytes'] / 2**30:.2f} GiB on the fullest rank")
    resolved = replace(apply(cfg, lay), parallel=replace(apply(cfg, lay).parallel, auto=False))
    return resolved, overrides(layout), record


def _state(mem: dict) -> int:
    return int(mem["parameters"] + mem["gradients"] + mem["optimizer_state"])


def write_plan(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(record, indent=1))


def read_plan(run_dir: Path | None, layout: dict) -> dict | None:
    """The run folder's plan.json when it planned the layout this run has, else None (a resumed run
    under another layout is not the planned one)."""
    path = run_dir / "plan.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    from plait.planner.layout import Layout

    record = json.loads(path.read_text())
    planned = record.get("layout", {})
    same = all(planned.get(f.name) == layout.get(f.name) for f in fields(Layout))
    return record if same else None


def compare(record: dict, summary: dict, tokens_per_step: int) -> dict:
    """The plan record with `measured` and `error` (predicted / measured − 1) added."""
    tps = summary.get("tokens_per_s") or 0.0
    mem = summary.get("memory") or {}
    measured = {"step_s": tokens_per_step / tps if tps > 0 else None,
                "tokens_per_s": tps,
                "model_state_bytes": _state(mem) if mem else None,
                "peak_memory_bytes": summary.get("peak_memory_bytes")}
    pred = record["predicted"]
    error = {k: pred[k] / measured[k] - 1 for k in ("step_s", "model_state_bytes")
             if measured.get(k)}
    return {**record, "measured": measured, "error": error}
