"""Inner-step time of `plait train` on two emulated nodes against one node's loopback (root).

    .venv/bin/python scripts/two_nodes_step_time.py                  # the recorded table
    .venv/bin/python scripts/two_nodes_step_time.py --reps 1 --steps 40 --every 10 --json out.json

Four `plait train` runs of the same model, data, seed and world size (4 ranks):

- diloco, 2 nodes × 2 ranks, link of --delay-ms one way and --rate per direction (plait.netem);
- diloco, 1 node × 4 ranks, this machine's loopback, unthrottled;
- every-step dp on the same two layouts, for comparison.

For each it reads the run's metrics.jsonl and reports the median `step_s` of the inner steps
(DiLoCo: steps with step % sync.every != 0, the first step left out: it pays one-off warm-up), of
the sync steps, and of all steps (every-step dp). A sync strategy that communicates every H steps
should make no collective in between (docs/architecture.md, "Contracts"), so its inner steps
should cost the same on both layouts; the difference between the two inner-step medians is what
the link still costs per step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from plait.netem import ADDRS, Link, TwoNodes, cannot


def train_argv(args, sync: dict, run_dir: Path) -> list[str]:
    over = [f"model.preset={args.preset}", f"train.steps={args.steps}",
            f"train.seq_len={args.seq_len}", f"train.global_batch={args.global_batch}",
            f"train.micro_batch={args.micro_batch}",
            "log.progress=false", "log.plots=false", "train.val_every=0"]
    over += [f"{k}={v}" for k, v in sync.items()]
    return [sys.executable, "-m", "plait", "train", *over, "--run-dir", str(run_dir)]


def run_case(args, name: str, sync: dict, two_nodes: bool, root: Path, rep: int) -> dict:
    run_dir = root / f"{name}-{rep}"
    argv = train_argv(args, sync, run_dir)
    if two_nodes:
        link = Link(args.delay_ms, args.rate)
        with TwoNodes(link) as nodes:
            # static rendezvous, node 0 hosts the store: c10d's cannot tell that an address
            # inside a namespace is local
            endpoint = f"{ADDRS[0]}:{args.port}"
            cmds = [argv + ["--nnodes", "2", "--node-rank", str(i), "--nproc", "2",
                            "--rdzv-backend", "static", "--rdzv-endpoint", endpoint]
                    for i in range(2)]
            codes = nodes.run(cmds, timeout_s=args.timeout_s)
    else:
        codes = [subprocess.run(argv + ["--nproc", "4"], timeout=args.timeout_s).returncode]
    if any(codes):
        raise SystemExit(f"{name}: plait train failed with exit codes {codes}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    every = sync.get("sync.every")
    steady = [r for r in recs if r["step"] > 1]
    inner = [r["step_s"] for r in steady if not every or r["step"] % every]
    sync_steps = [r["step_s"] for r in steady if every and r["step"] % every == 0]
    return {"name": name, "rep": rep, "two_nodes": two_nodes, "sync": sync,
            "inner_step_s": statistics.median(inner),
            "sync_step_s": statistics.median(sync_steps) if sync_steps else None,
            "inner_comm_bytes": statistics.median(r["comm_bytes"] for r in steady
                                                  if not every or r["step"] % every),
            "steps": len(recs)}


def summary(runs: list[dict]) -> dict:
    """Median over repetitions of each run's medians (the machine is shared: runs vary)."""
    def med(key):
        xs = [r[key] for r in runs if r[key] is not None]
        return statistics.median(xs) if xs else None

    return {"name": runs[0]["name"], "inner_step_s": med("inner_step_s"),
            "inner_step_s_runs": [r["inner_step_s"] for r in runs],
            "sync_step_s": med("sync_step_s"), "inner_comm_bytes": med("inner_comm_bytes")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=10.0)
    ap.add_argument("--rate", default="30mbit")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10, help="DiLoCo's H")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--port", type=int, default=29531)
    ap.add_argument("--reps", type=int, default=3, help="runs of each case, interleaved")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args()
    why = cannot()
    if why:
        print(f"two_nodes_step_time: {why}", file=sys.stderr)
        return 2
    root = Path(args.keep or tempfile.mkdtemp(prefix="plait-two-nodes-"))
    if args.keep:
        shutil.rmtree(root, ignore_errors=True)
    diloco = {"sync.strategy": "diloco", "sync.every": args.every}
    cases = [("diloco-2nodes", diloco, True), ("diloco-1node", diloco, False),
             ("dp-2nodes", {}, True), ("dp-1node", {}, False)]
    load0 = os.getloadavg()[0]
    try:  # interleaved, so that a change in the machine's load hits every case alike
        runs = [run_case(args, *c, root, rep) for rep in range(args.reps) for c in cases]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = [summary([r for r in runs if r["name"] == c[0]]) for c in cases]
    link = f"{args.rate} per direction, {args.delay_ms:g} ms one way"
    print(f"\n{args.preset} GPT, 4 ranks, {args.steps} steps of "
          f"{args.global_batch}×{args.seq_len} tokens; 2 nodes: {link}; 1 node: loopback; "
          f"{args.reps} runs each; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| run | inner step (median) | each run (ms) | sync step | B / inner step / rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        sync = f"{r['sync_step_s'] * 1e3:.1f} ms" if r["sync_step_s"] is not None else "—"
        each = ", ".join(f"{x * 1e3:.1f}" for x in r["inner_step_s_runs"])
        print(f"| {r['name']} | {r['inner_step_s'] * 1e3:.1f} ms | {each} | {sync} | "
              f"{r['inner_comm_bytes']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
