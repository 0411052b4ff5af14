"""Time to loss across two nodes over a slow link: compressors and sync strategies against dense.

    .venv/bin/python scripts/time_to_loss.py loss      # loss curves on one machine (fast link)
    .venv/bin/python scripts/time_to_loss.py link      # per-step wall time on two nodes (root)
    .venv/bin/python scripts/time_to_loss.py direct    # one end-to-end two-node run per family
    .venv/bin/python scripts/time_to_loss.py report    # table, PNG, JSON

Every run is `plait train` with the same model (10m preset, 10.8M parameters), seed, data order,
global batch 8 × 256 tokens and schedule, `parallel.replicas = 2` (one replica per node, one rank
each); only `compression.*` or `sync.*` differ. The method (the loss does not depend on the link):

1. `loss`: each method trains `--steps` steps on one machine (`--nproc 2`), validation every 25
   steps: the validation loss against samples (a method that sets `train.steps` trains that
   many steps on its own schedule: when it gets to the dense loss given more samples);
2. `link`: each method trains on two emulated nodes (the command lines of two hosts: c10d
   rendezvous at node0), compressors at 100 Mbit/s with 20 ms round trip, strategies at
   10 Mbit/s with 50 ms round trip: `--link-steps` steps (after PowerSGD's 10 dense warmup
   steps) or, for strategies with H inner steps, 2·H + 1 (two synchronizations inside, the last
   step's run-end flush left out). Their `step_s` are the per-step wall times (step 1, which pays
   the start, counted as the median step); later steps take the steady mean (after the warmup,
   synchronizations included);
3. time to loss = the wall time of the steps that reach the dense run's final validation loss
   (the first validation at or below it); "sooner" = the dense method's time on the same link /
   the method's;
4. `direct`: one run per family (PowerSGD, DiLoCo) trains its first `--direct-steps` steps on
   the two nodes, end to end; its measured wall time (the sum of step_s) is compared with what
   step 3 predicts for that many steps (target: within 10%), and its validation loss with the
   loss run's at that step (the same, the link changes no number).

Finished runs are reused (delete a run folder to redo it). Results: OUT/time_to_loss.json,
OUT/time_to_loss.png, and a Markdown table printed for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H = 50
COMPRESSORS = {  # at 100 Mbit/s, 20 ms round trip
    "none": {},
    "fp16": {"compression.name": "fp16"},
    "powersgd": {"compression.name": "powersgd", "compression.rank": 4},
    "topk": {"compression.name": "topk"},
    "sign": {"compression.name": "sign"},
}
STRATEGIES = {  # at 10 Mbit/s, 50 ms round trip
    "every_step": {},
    "local_sgd": {"sync.strategy": "local_sgd", "sync.every": H},
    "diloco": {"sync.strategy": "diloco", "sync.every": H},
    "diloco_h10": {"sync.strategy": "diloco", "sync.every": 10},
    # the outer step scripts/sync_sweep.py found better on the tiny model (lr 1, momentum 0.5)
    "diloco_h25_m05": {"sync.strategy": "diloco", "sync.every": 25, "sync.outer_lr": 1.0,
                       "sync.outer_momentum": 0.5},
    "streaming_diloco": {"sync.strategy": "streaming_diloco", "sync.every": H,
                         "sync.fragments": 4, "sync.delay": 1},
    "delayed": {"sync.strategy": "delayed"},
    # the streaming exchange hidden behind the inner steps: fragments travel as 4-bit floats
    # (1/7 of the bytes) and are applied 4 inner steps after they are sent
    "streaming_diloco_fp4_d4": {"sync.strategy": "streaming_diloco", "sync.every": H,
                                "sync.fragments": 4, "sync.delay": 4, "sync.quantize": "fp4"},
    # DiLoCo given twice the steps (its own 1000-step schedule): when it reaches the dense run's
    # final loss, if ever (the equal-samples comparison is the 500-step row)
    "diloco_1000_steps": {"sync.strategy": "diloco", "sync.every": H, "train.steps": 1000},
}
LINKS = {"compressors": (10.0, "100mbit"), "strategies": (25.0, "10mbit")}  # one way ms, rate
DIRECT = {"compressors": "powersgd", "strategies": "diloco"}


def base(steps: int) -> dict:
    return {"model.preset": "10m", "train.seq_len": 256, "train.global_batch": 8,
            "train.micro_batch": 4, "train.steps": steps, "train.val_every": 25,
            "train.val_samples": 64, "train.log_every": 1, "train.seed": 1337,
            "parallel.replicas": 2, "log.progress": "false", "log.plots": "false",
            # one thread per rank: the two emulated nodes share this machine's cores (left at
            # cores / local ranks, each node's rank would take them all: 7x slower steps)
            "train.threads": 1}


def methods():
    for fam, table in (("compressors", COMPRESSORS), ("strategies", STRATEGIES)):
        for name, over in table.items():
            yield fam, name, over


def records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def train(over: dict, run_dir: Path, nodes_link: tuple | None = None) -> None:
    if (run_dir / "summary.json").exists():
        return
    cmd = [sys.executable, "-m", "plait", "train", *(f"{k}={v}" for k, v in over.items()),
           "--run-dir", str(run_dir)]
    print("$", " ".join(cmd[2:]), f"(link {nodes_link})" if nodes_link else "", flush=True)
    if nodes_link is None:
        subprocess.run([*cmd, "--nproc", "2"], check=True)
        return
    from plait.netem.nodes import HOSTS, Link, TwoNodes

    node = [*cmd, "--nnodes", "2", "--nproc", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{HOSTS[0]}:29500"]
    with TwoNodes(Link(delay_ms=nodes_link[0], rate=nodes_link[1])) as nodes:
        codes = nodes.run([node, node], env={"PYTHONPATH": str(ROOT)})
    if codes != [0, 0]:
        raise SystemExit(f"two-node run failed: exit codes {codes} ({run_dir})")


def loss_name(method: str) -> str:
    return "none" if method == "every_step" else method


def warmup(over: dict) -> int:
    """Dense steps before a compressor compresses (compression.warmup_steps, default 10)."""
    return over.get("compression.warmup_steps", 10) if over.get("compression.name") in (
        "powersgd",) else 0


def link_steps(over: dict, args) -> int:
    if "sync.every" in over:
        return 2 * over["sync.every"] + 1
    return warmup(over) + args.link_steps


def step_time(run_dir: Path, over: dict) -> dict:
    """Per-step wall times on the link (`step_s` of every step; step 1, which pays the start,
    counted as the median step) and the steady mean after the warmup, which extends them to
    later steps; the share of the steady time above the median step (a step that waits for the
    link takes longer than the median, an inner step's compute) is the exposed synchronization."""
    recs = [r for r in records(run_dir) if r.get("step_s") is not None]
    # the link run's last step ends its run: it averages or applies everything in flight (a
    # third synchronization after 2·H steps, delayed's second exchange), which the long run does
    # only at its own end; it is left out
    times = [r["step_s"] for r in recs][:-1]
    med = statistics.median(times[1:])
    times[0] = med
    steady = times[warmup(over) + 1:]
    mean = sum(steady) / len(steady)
    return {"times": times, "step_s": mean, "median_step_s": med, "steps": len(times),
            "wait_share": sum(max(0.0, t - med) for t in steady) / sum(steady)}


def time_for(st: dict, n: int) -> float:
    """Wall time of n steps on the link: the measured steps, then the steady mean."""
    k = min(n, len(st["times"]))
    return sum(st["times"][:k]) + (n - k) * st["step_s"]


def curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records(run_dir) if r.get("val_loss") is not None]


def steps_to(c: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in c if v <= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["loss", "link", "direct", "report"])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--link-steps", type=int, default=8)
    ap.add_argument("--direct-steps", type=int, default=150)
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--runs", default="runs/time_to_loss")
    ap.add_argument("--out", default="docs/results/time_to_loss")
    args = ap.parse_args()
    runs, only = Path(args.runs), set(filter(None, args.only.split(",")))
    todo = [(f, n, o) for f, n, o in methods() if not only or n in only]
    if args.phase == "loss":
        for _fam, name, over in todo:  # every_step is the run of `none` (the same config)
            train({**base(args.steps), **over}, runs / "loss" / loss_name(name))
        return 0
    if args.phase == "link":
        for fam, name, over in todo:  # the link's own wall time: no validation
            steps = link_steps(over, args)
            train({**base(steps), **over, "train.steps": steps, "train.val_every": 0},
                  runs / "link" / name, LINKS[fam])
        return 0
    dense = {"compressors": "none", "strategies": "every_step"}
    if args.phase == "direct":
        for fam, name in DIRECT.items():  # the first --direct-steps steps, end to end
            over = dict(COMPRESSORS, **STRATEGIES)[name]
            n = args.direct_steps
            # the loss run's schedule (train.steps), stopped after n steps: the same n steps
            train({**base(args.steps), **over, "train.val_every": n,
                   "train.exit_after_steps": n}, runs / "direct" / name, LINKS[fam])
        return 0
    target = curve(runs / "loss" / "none")[-1][1]
    rows = []
    for fam, name, over in methods():
        c, lk = curve(runs / "loss" / loss_name(name)), runs / "link" / name
        if not c or not (lk / "summary.json").exists():
            continue
        st = step_time(lk, over)
        n = steps_to(c, target)
        rows.append({"family": fam, "method": name, "settings": over, "link": LINKS[fam],
                     "final_val_loss": c[-1][1], "steps_to_target": n, **st,
                     "time_to_target_s": time_for(st, n) if n else None, "curve": c})
    for r in rows:
        d = next(x for x in rows if x["method"] == dense[r["family"]])
        r["sooner"] = (d["time_to_target_s"] / r["time_to_target_s"]
                       if r["time_to_target_s"] and d["time_to_target_s"] else None)
        r["vs_dense_loss"] = r["final_val_loss"] / d["final_val_loss"] - 1
        # a looser target, the method's own final loss: how soon dense gets there on this link
        n_dense, last = steps_to(d["curve"], r["final_val_loss"]), r["curve"][-1][0]
        r["sooner_to_own_final"] = (time_for(d, n_dense) / time_for(r, last)) if n_dense else None
        dr = runs / "direct" / r["method"]
        if (dr / "summary.json").exists():
            steps = [x["step_s"] for x in records(dr) if x.get("step_s") is not None]
            measured = sum(steps[1:]) + statistics.median(steps[1:])  # step 1 as in step_time
            n, val = curve(dr)[-1]
            predicted = time_for(r, n)
            r["direct"] = {"steps": n, "measured_s": measured, "predicted_s": predicted,
                           "error": predicted / measured - 1, "val_loss": val,
                           "val_loss_of_loss_run": dict(r["curve"]).get(n)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_to_loss.json").write_text(json.dumps(
        {"target_val_loss": target, "rows": rows, "date": time.strftime("%Y-%m-%d")}, indent=1))
    plot(rows, out / "time_to_loss.png", target)
    print(f"target: the dense run's final validation loss {target:.4f}\n")
    print("| link | method | steps | final val loss | vs dense | steps to target | "
          "s/step on link | time to target | sooner | sooner to its own final loss | "
          "time above median step | direct run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = f"{r['time_to_target_s']:.0f} s" if r["time_to_target_s"] else "not reached"
        s = f"{r['sooner']:.2f}×" if r["sooner"] else "–"
        own = f"{r['sooner_to_own_final']:.2f}×" if r["sooner_to_own_final"] else "–"
        d = r.get("direct")
        d = (f"{d['steps']} steps: {d['measured_s']:.0f} s measured, {d['predicted_s']:.0f} s "
             f"predicted ({d['error']:+.1%})") if d else "–"
        print(f"| {r['link'][1]}, {2 * r['link'][0]:.0f} ms | {r['method']} | "
              f"{r['curve'][-1][0]} | {r['final_val_loss']:.4f} | {r['vs_dense_loss']:+.2%} | "
              f"{r['steps_to_target'] or '–'} | {r['step_s']:.2f} | {t} | {s} | {own} | "
              f"{r['wait_share']:.1%} | {d} |")
    return 0


def plot(rows: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, fam in zip(axes, ("compressors", "strategies")):
        for r in (x for x in rows if x["family"] == fam):
            ax.plot([time_for(r, s) / 60 for s, _ in r["curve"]], [v for _, v in r["curve"]],
                    label=r["method"])
        ax.axhline(target, color="grey", ls=":", lw=1)
        rate = LINKS[fam][1]
        ax.set(xlabel="wall time on the link (min)", ylabel="validation loss", xscale="log",
               title=f"{fam} at {rate}, {2 * LINKS[fam][0]:.0f} ms round trip")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
