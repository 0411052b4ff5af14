"""Why one-step-stale gradients (sync.strategy = delayed) cost more than they should: the gap to
every_step at equal samples, across the learning rate, the warm-up and Adam's beta1.

    .venv/bin/python scripts/delayed_gap.py                  # tiny GPT, 300 steps, ~8 min
    .venv/bin/python scripts/delayed_gap.py --preset 10m --steps 100

Each setting trains every_step and delayed with the same seed, data and schedule through
`plait train --nproc 2` (two data-parallel replicas) and compares their final validation losses.
That delayed itself is what it says (each gradient applied one step later, nothing else) is
tested against plain PyTorch in tests/test_sync.py; this script measures what the delay costs.
Finished runs are reused (delete a run folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTINGS = {  # name: optimizer overrides
    "lr 3e-3, warm-up 5 (defaults)": {},
    "lr 3e-3, warm-up 100": {"optim.warmup_steps": 100},
    "lr 1e-3, warm-up 5": {"optim.lr": 1e-3},
    "lr 2e-3, warm-up 5": {"optim.lr": 2e-3},
    "lr 6e-3, warm-up 5": {"optim.lr": 6e-3},
    "lr 3e-3, beta1 0.5": {"optim.beta1": 0.5},
    "lr 3e-3, beta1 0.99": {"optim.beta1": 0.99},
}


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
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--runs", default="runs/delayed_gap")
    ap.add_argument("--out", default="docs/results/delayed_gap.json")
    args = ap.parse_args()
    root, rows = Path(args.runs), []
    for i, (name, over) in enumerate(SETTINGS.items()):
        dense = final_val(root / f"{i}-every_step", over, args)
        delayed = final_val(root / f"{i}-delayed", {**over, "sync.strategy": "delayed"}, args)
        rows.append({"setting": name, "overrides": over, "every_step": dense, "delayed": delayed,
                     "gap": delayed / dense - 1})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "steps": args.steps,
                                          "rows": rows}, indent=1))
    print("| setting | every_step | delayed | gap |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['every_step']:.4f} | {r['delayed']:.4f} | {r['gap']:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
