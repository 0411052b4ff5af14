"""Quality of the sync strategies against every-step data parallelism, at equal samples and seeds.

    # the recorded run (10M GPT, 4 replicas)
    .venv/bin/python scripts/sync_quality.py
    .venv/bin/python scripts/sync_quality.py --preset tiny --steps 8 --every 4 --global-batch 8 \
        --seq-len 32

The default (10M-parameter GPT, 500 steps of 16 × 128 tokens, H = 50) should take on the order
of 15 minutes per configuration on two CPU cores (an estimate from `make demo`'s speed), seven
configurations in all; finished runs are reused, so an interrupted run resumes with the next one.

Each configuration is one `plait train` run (4 worker processes: 4 replicas) with the same model,
seed, data order, global batch, steps, inner AdamW and schedule; only the `sync.*` settings differ.
From each run folder it reads `summary.json` (final validation loss, bytes per step per rank) and
`metrics.jsonl` (the validation curve, each step's bytes), then writes

- docs/sync_quality.png: validation loss against samples and against cumulative bytes per rank;
- docs/sync_quality.json: every number, and the checks below with their verdicts;

and prints a Markdown table for docs/benchmarks.md. The checks (issue "Asynchronous and
low-communication updates"): DiLoCo within 3% of every_step's final validation loss with at most
1/40 of its bytes; DiLoCo's Nesterov outer step better than plain averaging (local_sgd) at the same
H; streaming (τ = 1) within 1% of DiLoCo; int8 outer gradients within 0.5% of fp32; delayed within
1% of every_step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def configs(every: int, fragments: int) -> dict[str, dict]:
    d = {"sync.every": every}
    return {
        "every_step": {},
        "diloco": {"sync.strategy": "diloco", **d},
        "local_sgd": {"sync.strategy": "local_sgd", **d},
        "streaming_diloco": {"sync.strategy": "streaming_diloco", "sync.fragments": fragments,
                             "sync.delay": 1, **d},
        "diloco_int8": {"sync.strategy": "diloco", "sync.quantize": "int8", **d},
        "diloco_fp4": {"sync.strategy": "diloco", "sync.quantize": "fp4", **d},
        "delayed": {"sync.strategy": "delayed"},
    }


def run(name: str, sync: dict, args, root: Path) -> dict:
    run_dir = root / name
    # finished runs are reused: rerun by deleting the folder
    if not (run_dir / "summary.json").exists():
        over = {"model.preset": args.preset, "train.steps": args.steps,
                "train.global_batch": args.global_batch,
                "train.micro_batch": args.micro_batch, "train.seq_len": args.seq_len,
                "train.val_every": args.val_every, "train.val_samples": args.val_samples,
                "train.log_every": 1, "train.seed": args.seed, "log.progress": "false",
                "log.plots": "false", **sync}
        cmd = [sys.executable, "-m", "plait", "train", *(f"{k}={v}" for k, v in over.items()),
               "--nproc", str(args.nproc), "--run-dir", str(run_dir)]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    total, curve = 0.0, []
    for r in recs:
        total += r["comm_bytes"]
        if r.get("val_loss") is not None:
            curve.append({"step": r["step"], "samples": r["samples"], "bytes": total,
                          "val_loss": r["val_loss"]})
    return {"sync": sync, "final_val_loss": summary["final_val_loss"],
            "comm_bytes_per_step": summary["comm_bytes_per_step"], "total_bytes": total,
            "curve": curve, "wall_s": summary["wall_s"], "run_dir": str(run_dir)}


def checks(res: dict) -> list[dict]:
    def val(n):
        return res[n]["final_val_loss"]

    def rel(a, b):
        return (val(a) - val(b)) / val(b)

    return [
        {"check": "diloco within 3% of every_step", "value": rel("diloco", "every_step"),
         "ok": rel("diloco", "every_step") <= 0.03},
        {"check": "diloco sends at most 1/40 of every_step's bytes",
         "value": res["diloco"]["total_bytes"] / res["every_step"]["total_bytes"],
         "ok": res["diloco"]["total_bytes"] <= res["every_step"]["total_bytes"] / 40},
        {"check": "Nesterov outer step better than plain averaging",
         "value": rel("diloco", "local_sgd"), "ok": val("diloco") < val("local_sgd")},
        {"check": "streaming (tau=1) within 1% of diloco",
         "value": rel("streaming_diloco", "diloco"),
         "ok": rel("streaming_diloco", "diloco") <= 0.01},
        {"check": "int8 outer gradients within 0.5% of fp32", "value": rel("diloco_int8", "diloco"),
         "ok": abs(rel("diloco_int8", "diloco")) <= 0.005},
        {"check": "delayed within 1% of every_step", "value": rel("delayed", "every_step"),
         "ok": rel("delayed", "every_step") <= 0.01},
    ]


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in res.items():
        xs = [c["samples"] for c in r["curve"]]
        ys = [c["val_loss"] for c in r["curve"]]
        a.plot(xs, ys, marker=".", label=name)
        b.plot([max(c["bytes"], 1.0) for c in r["curve"]], ys, marker=".", label=name)
    a.set_xlabel("samples")
    b.set_xlabel("bytes sent per rank (cumulative)")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=4, help="replicas (worker processes)")
    ap.add_argument("--preset", default="10m")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=50, help="H")
    ap.add_argument("--fragments", type=int, default=4, help="P (streaming)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--val-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--runs", default="runs/sync_quality",
                    help="run folders (reused when complete)")
    ap.add_argument("--out", default="docs", help="where the PNG and JSON go")
    args = ap.parse_args(argv)
    root = Path(args.runs)
    res = {name: run(name, sync, args, root)
           for name, sync in configs(args.every, args.fragments).items()}
    verdicts = checks(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.nproc} replicas, preset {args.preset}, {args.steps} steps × "
             f"{args.global_batch} samples, H = {args.every}")
    plot(res, out / "sync_quality.png", title)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "settings": vars(args), "results": res, "checks": verdicts}
    (out / "sync_quality.json").write_text(json.dumps(doc, indent=1))
    base = res["every_step"]
    print(f"\n{title}\n")
    print("| strategy | final val loss | vs every_step | bytes/step/rank | bytes vs every_step |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        vs = (r["final_val_loss"] / base["final_val_loss"] - 1) * 100
        print(f"| {name} | {r['final_val_loss']:.4f} | {vs:+.2f}% | "
              f"{r['comm_bytes_per_step']:,.0f} | {r['total_bytes'] / base['total_bytes']:.4f} |")
    print()
    for c in verdicts:
        print(f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']} ({c['value']:+.4f})")
    print(f"\nwrote {out / 'sync_quality.png'} and {out / 'sync_quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
