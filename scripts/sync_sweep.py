"""What a sync strategy costs against every_step at equal samples, across its settings.

    .venv/bin/python scripts/sync_sweep.py delayed   # the lr / warm-up / beta1 grid, ~5 min
    .venv/bin/python scripts/sync_sweep.py diloco    # H and the outer step, ~4 min

Tiny GPT by default (`--preset 10m` for the larger one), 300 steps of 16 × 64 tokens, two
data-parallel replicas (`plait train --nproc 2`), the same seed, data and schedule in every run.

- `delayed`: each setting trains every_step and delayed (one-step-stale gradients) and compares
  their final validation losses. That delayed itself is what it says is tested against plain
  PyTorch in tests/test_sync.py; this measures what the delay costs.
- `diloco`: every_step, then for each H local SGD (plain averaging), DiLoCo with the published
  outer step (lr 0.7, Nesterov momentum 0.9) and DiLoCo with lr 1.0, momentum 0.5.

Finished runs are reused (delete a run folder to redo it). Results: a Markdown table and
docs/results/sync_sweep_<sweep>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DELAYED = {  # name: optimizer overrides; each trained with every_step and with delayed
    "lr 3e-3, warm-up 5 (defaults)": {},
    "lr 3e-3, warm-up 100": {"optim.warmup_steps": 100},
    "lr 1e-3, warm-up 5": {"optim.lr": 1e-3},
    "lr 2e-3, warm-up 5": {"optim.lr": 2e-3},
    "lr 6e-3, warm-up 5": {"optim.lr": 6e-3},
    "lr 3e-3, beta1 0.5": {"optim.beta1": 0.5},
    "lr 3e-3, beta1 0.99": {"optim.beta1": 0.99},
}
OUTER = {"local_sgd": {"sync.strategy": "local_sgd"},
         "diloco (0.7, 0.9)": {"sync.strategy": "diloco"},
         "diloco (1.0, 0.5)": {"sync.strategy": "diloco", "sync.outer_lr": 1.0,
                               "sync.outer_momentum": 0.5}}


def final_val(run_dir: Path, over: dict, args) -> float:
    if not (run_dir / "summary.json").exists():
        base = {"model.preset": args.preset, "train.steps": args.steps, "train.global_batch": 16,
                "train.micro_batch": 8, "train.seq_len": args.seq_len, "train.val_every": 0,
                "train.val_samples": 64, "train.seed": 1337, "log.progress": "false",
                "log.plots": "false", "parallel.dp": 2}
        cmd = [sys.executable, "-m", "plait", "train",
               *(f"{k}={v}" for k, v in {**base, **over}.items()), "--run-dir", str(run_dir),
               "--nproc", "2"]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())["final_val_loss"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", choices=["delayed", "diloco"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--every", default="5,10,25,50", help="diloco: the H values")
    ap.add_argument("--runs", default="runs/sync_sweep")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    root, rows = Path(args.runs) / args.sweep, []
    if args.sweep == "delayed":
        for i, (name, over) in enumerate(DELAYED.items()):
            dense = final_val(root / f"{i}-every_step", over, args)
            delayed = final_val(root / f"{i}-delayed", {**over, "sync.strategy": "delayed"}, args)
            rows.append({"setting": name, "overrides": over, "every_step": dense,
                         "method": delayed, "gap": delayed / dense - 1})
    else:
        dense = final_val(root / "every_step", {}, args)
        for h in map(int, args.every.split(",")):
            for name, over in OUTER.items():
                run = f"{over['sync.strategy']}-{over.get('sync.outer_momentum', 0.9)}-h{h}"
                loss = final_val(root / run, {**over, "sync.every": h}, args)
                rows.append({"setting": f"H = {h}, {name}", "overrides": {**over, "sync.every": h},
                             "every_step": dense, "method": loss, "gap": loss / dense - 1})
    out = Path(args.out) / f"sync_sweep_{args.sweep}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "rows": rows},
                              indent=1))
    print(f"| setting | every_step | {args.sweep} | gap |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['every_step']:.4f} | {r['method']:.4f} | {r['gap']:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
