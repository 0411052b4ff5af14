"""Faults across two emulated nodes (root): a node's agent and workers killed, the link cut.

    python scripts/two_node_faults.py [--steps 12] [--out runs/two_node_faults]

Each case runs examples/two_nodes_diloco.toml (dense dp = 2 inside each node, DiLoCo across) as
two `plait train` launcher agents in two network namespaces joined by a 10 ms / 30 Mbit/s link,
with the command line of two real hosts (c10d rendezvous at `node0:29500`, one shared run
folder), checkpoints every 2 steps, `--max-restarts 2` and `train.timeout_s` 20 s:

- `uninterrupted`: the reference run;
- `kill-node`: once the run has saved its second checkpoint, every process of node 1 (agent and
  workers) is killed and, 3 s later, its agent is started again with the same command line (what
  a cluster scheduler or an operator does). It joins the rendezvous, which node 0's agent
  hosts; node 0's workers fail (their peers are gone), its agent restarts them into a new round
  with the new node 1, and all ranks resume from the newest complete checkpoint. (Node 0 hosts
  the c10d store: losing node 0 loses the rendezvous, on real hosts as here.)
- `cut-link`: once the run has saved its second checkpoint, node 1's link device goes down for
  `--cut-s` seconds (every packet dropped), then up again. The ranks' collectives time out
  after `train.timeout_s` and stop with a CommError naming the op and the group; the agents
  restart their workers, whose rendezvous completes once the link is back, and the run resumes.

A case passes when both agents exit 0 and the final train loss equals the uninterrupted run's.
Prints one line per case and writes OUT/faults.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from plait.netem.nodes import HOSTS, Link, TwoNodes, cannot

ROOT = Path(__file__).resolve().parents[1]


def _cmd(run_dir: Path, node: int, steps: int, timeout_s: int) -> list[str]:
    """What a user types on host `node`: c10d rendezvous at node 0, one shared run folder."""
    example = str(ROOT / "examples" / "two_nodes_diloco.toml")
    return [sys.executable, "-m", "plait", "train", example, f"train.steps={steps}",
            "sync.every=3", "train.val_every=0", "log.plots=false", "checkpoint.every=2",
            f"train.timeout_s={timeout_s}", "--nnodes", "2", "--node-rank", str(node),
            "--nproc", "2", "--max-restarts", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{HOSTS[0]}:29500", "--run-dir", str(run_dir)]


def _checkpoints(run_dir: Path) -> int:
    ck = run_dir / "checkpoints"
    return len([p for p in ck.glob("step-*") if (p / "manifest.json").exists()]) if ck.exists() \
        else 0


def _resumed(run_dir: Path) -> list[int]:
    """The steps the run resumed from, in order (metrics.jsonl's `resumed_from` records)."""
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    return [r["resumed_from"] for r in rows if "resumed_from" in r]


def _wait(procs, deadline: float) -> list[int | None]:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p.poll() for p in procs]


def run_case(case: str, out: Path, steps: int, cut_s: float, timeout_s: int) -> dict:
    run_dir = out / case
    logs = [open(out / f"{case}-node{i}.log", "w") for i in range(2)]
    env = {"PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    event = None
    with TwoNodes(Link(delay_ms=10, rate="30mbit")) as nodes:
        procs = [nodes.start(i, _cmd(run_dir, i, steps, timeout_s), env, stdout=logs[i],
                             stderr=subprocess.STDOUT) for i in range(2)]
        if case != "uninterrupted":
            while _checkpoints(run_dir) < 2 and all(p.poll() is None for p in procs):
                time.sleep(0.2)
            if case == "kill-node":
                nodes.kill(1)
                procs[1].wait()
                event = f"node 1 killed at {time.monotonic() - t0:.1f} s"
                time.sleep(3.0)
                procs[1] = nodes.start(1, _cmd(run_dir, 1, steps, timeout_s), env,
                                       stdout=logs[1], stderr=subprocess.STDOUT)
            else:
                nodes.set_link(1, up=False)
                event = f"link down at {time.monotonic() - t0:.1f} s for {cut_s:.0f} s"
                time.sleep(cut_s)
                nodes.set_link(1, up=True)
        codes = _wait(procs, time.monotonic() + 900)
    for f in logs:
        f.close()
    summary = run_dir / "summary.json"
    s = json.loads(summary.read_text()) if summary.exists() else {}
    return {"case": case, "exit_codes": codes, "event": event, "wall_s": time.monotonic() - t0,
            "final_train_loss": s.get("final_train_loss"), "steps": s.get("steps"),
            "resumed_from": _resumed(run_dir)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cut-s", type=float, default=30.0)
    ap.add_argument("--timeout-s", type=int, default=20, help="train.timeout_s of the runs")
    ap.add_argument("--cases", default="uninterrupted,kill-node,cut-link")
    ap.add_argument("--out", default="runs/two_node_faults")
    args = ap.parse_args()
    why = cannot()
    if why:
        print(f"two_node_faults: {why}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        row = run_case(case, out, args.steps, args.cut_s, args.timeout_s)
        rows.append(row)
    ref = next((r["final_train_loss"] for r in rows if r["case"] == "uninterrupted"), None)
    for r in rows:
        r["equal_to_uninterrupted"] = (r["final_train_loss"] is not None and ref is not None
                                       and r["final_train_loss"] == ref)
        print(f"{r['case']:<14} exit {r['exit_codes']}  steps {r['steps']}  final loss "
              f"{r['final_train_loss']}  resumed from {r['resumed_from']}  "
              f"equal {r['equal_to_uninterrupted']}  {r['event'] or ''}  ({r['wall_s']:.0f} s)")
    (out / "faults.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["exit_codes"] == [0, 0] and r["equal_to_uninterrupted"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
