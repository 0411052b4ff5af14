"""`plait plan --validate`: predict, then run, layouts of one small model on this machine; compare.

Each layout is written as a config (the `--write` path) and run by `python -m plait train CONFIG
--nproc N --run-dir DIR` in a subprocess, as a user would. Measured: the step time from
summary.json's `tokens_per_s` (its steady steps, the first left out), rank 0's model-state bytes
from summary.json's `memory` (parameters, gradients, optimizer_state: counted from the tensors
held, so comparable to the byte), and `peak_memory_bytes` (the process's peak RSS on CPU).

Why RSS is not compared to 5%: it counts the Python interpreter, torch's libraries and allocator
caches, the corpus, gloo's buffers and every temporary ever touched (RSS never shrinks), a few
hundred MB that no formula of the model predicts; it is shown beside the prediction only.

The model: the 10m preset with 8 heads (so tp = 4 divides), sequences of 128 tokens, global batch
16, fp32, one thread per rank (train.threads = 1: on a shared 2-core machine OpenMP threads
competing with other processes distort every measurement), 5 steps.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plait.planner.layout import Layout, apply

BASE = [
    "model.preset=10m",
    "model.n_heads=8",
    "train.seq_len=128",
    "train.global_batch=16",
    "train.dtype=fp32",
    "train.threads=1",
    "train.steps=5",
    "train.val_every=0",
    "train.val_samples=0",
    "log.plots=false",
    "log.progress=false",
    "checkpoint.every=0",
]

LAYOUTS = [  # world ≤ 4 on 2 cores; every dimension and schedule at least once
    Layout(1, 1, 1, 0, 4),
    Layout(1, 1, 1, 0, 16),
    Layout(2, 1, 1, 0, 4),
    Layout(2, 1, 1, 1, 4),
    Layout(2, 1, 1, 2, 4),
    Layout(2, 1, 1, 3, 4),
    Layout(2, 1, 1, 0, 4, activation_checkpointing="full"),
    Layout(1, 2, 1, 0, 4),
    Layout(1, 2, 1, 0, 4, sequence_parallel=True, activation_checkpointing="selective"),
    Layout(1, 1, 2, 0, 2, "gpipe"),
    Layout(1, 1, 2, 0, 2, "1f1b"),
    Layout(1, 1, 2, 0, 2, "zb_h1"),
    Layout(1, 1, 2, 0, 2, "interleaved_1f1b", 2),
    Layout(2, 2, 1, 0, 4),
    Layout(2, 1, 2, 1, 2, "1f1b"),
    Layout(1, 2, 2, 0, 2, "1f1b"),
    Layout(4, 1, 1, 1, 4),
]


def _run(cfg_text: str, world: int, run_dir: Path, timeout: float = 300.0) -> dict:
    conf = run_dir.with_suffix(".toml")
    conf.write_text(cfg_text)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "plait",
        "train",
        str(conf),
        "--nproc",
        str(world),
        "--run-dir",
        str(run_dir),
    ]
    t0 = time.perf_counter()
    cpu0 = _children_cpu()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    cpu = _children_cpu() - cpu0
    done = run_dir / "summary.json"
    if p.returncode and not done.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-2000:]}")
    # a worker dying at teardown after the run finished (seen: gloo aborting at exit) leaves a
    # complete summary; the row says so
    s = json.loads((run_dir / "summary.json").read_text())
    steps = [
        json.loads(x)["step_s"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if x.strip()
    ]
    wall = time.perf_counter() - t0
    # the CPU the run's processes got, per core they could use: well below 1 means other work on
    # the machine took the cores (then step times say more about the load than about plait)
    share = cpu / (wall * min(world, os.cpu_count() or 1))
    return {"summary": s, "step_times": steps, "wall_s": wall, "cpu_share": share,
            "exit_code": p.returncode}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def validate(
    layouts: list[Layout] | None = None,
    cluster: str = "local",
    log=print,
    workdir: str | None = None,
) -> dict:
    from plait.config import load, to_toml
    from plait.planner.cluster import load_cluster
    from plait.planner.search import Planner, job_from_config

    cfg = load(None, BASE)
    clus = load_cluster(cluster)
    job = job_from_config(cfg)
    rows = []
    tmp = Path(workdir or tempfile.mkdtemp(prefix="plait-validate-"))
    log(
        f"plait plan --validate: {len(layouts or LAYOUTS)} layouts of the 10m GPT (8 heads), "
        f"batch 16×128, fp32, "
        f"cluster {clus.name} ({clus.source}); runs in {tmp}; load average {os.getloadavg()[0]:.1f}"
    )
    for i, lay in enumerate(layouts or LAYOUTS):
        pred = Planner(job, clus, lay.world).evaluate(lay)
        run = _run(to_toml(apply(cfg, lay)), lay.world, tmp / f"run{i:02d}")
        s = run["summary"]
        step = job.tokens / s["tokens_per_s"]
        mem = s["memory"]
        state = mem["parameters"] + mem["gradients"] + mem["optimizer_state"]
        p0 = pred["memory_rank0"]
        pstate = p0["parameters"] + p0["gradients"] + p0["optimizer_state"]
        row = {
            "layout": lay.as_dict(),
            "short": lay.short(),
            "world": lay.world,
            "pred_step_s": pred["step_s"],
            "step_s": step,
            "step_err": pred["step_s"] / step - 1,
            "pred_state_bytes": pstate,
            "state_bytes": state,
            "state_err": pstate / state - 1,
            "pred_peak_bytes": p0["total"],
            "rss_bytes": s["peak_memory_bytes"],
            "step_times": run["step_times"],
            "wall_s": run["wall_s"],
            "cpu_share": run["cpu_share"],
            "exit_code": run["exit_code"],
            "load": os.getloadavg()[0],
        }
        rows.append(row)
        log(
            f"  {lay.short():<40} step {step:6.3f} s, predicted {pred['step_s']:6.3f} s "
            f"({100 * row['step_err']:+5.1f}%)"
            f"; model state {state / 2**20:7.2f} MiB, predicted {pstate / 2**20:7.2f} MiB "
            f"({100 * row['state_err']:+.2f}%); RSS {row['rss_bytes'] / 2**20:.0f} MiB; "
            f"{run['wall_s']:.0f} s, CPU share {run['cpu_share']:.2f}, load {row['load']:.1f}"
        )
    return {"rows": rows, **summarize(rows), "cluster": clus.source}


def summarize(rows: list[dict]) -> dict:
    errs = sorted(abs(r["step_err"]) for r in rows)
    best_measured = min(rows, key=lambda r: r["step_s"])
    picked = min(rows, key=lambda r: r["pred_step_s"])
    out = {
        "median_abs_step_err": errs[len(errs) // 2],
        "max_abs_step_err": errs[-1],
        "max_abs_state_err": max(abs(r["state_err"]) for r in rows),
        "top_choice": picked["short"],
        "measured_best": best_measured["short"],
        "top_choice_vs_best": picked["step_s"] / best_measured["step_s"] - 1,
        "per_world": {},
    }
    for w in sorted({r["world"] for r in rows}):
        rs = [r for r in rows if r["world"] == w]
        b, p = min(rs, key=lambda r: r["step_s"]), min(rs, key=lambda r: r["pred_step_s"])
        out["per_world"][w] = {
            "top_choice": p["short"],
            "measured_best": b["short"],
            "top_choice_vs_best": p["step_s"] / b["step_s"] - 1,
        }
    return out


def markdown(out: dict) -> str:
    lines = [
        "| layout | ranks | measured step | predicted | error | model state measured | predicted "
        "| error | peak RSS | predicted peak | CPU share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['short']} | {r['world']} | {r['step_s']:.3f} s | {r['pred_step_s']:.3f} s | "
            f"{100 * r['step_err']:+.1f}% | {r['state_bytes'] / 2**20:.2f} MiB | "
            f"{r['pred_state_bytes'] / 2**20:.2f} MiB | {100 * r['state_err']:+.2f}% | "
            f"{r['rss_bytes'] / 2**20:.0f} MiB | {r['pred_peak_bytes'] / 2**20:.0f} MiB | "
            f"{r.get('cpu_share', float('nan')):.2f} |"
        )
    return "\n".join(lines)
