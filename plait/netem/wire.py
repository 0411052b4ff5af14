"""Bytes on the wire: what plait's training steps really send, against what plait counts.

    python -m plait.netem wire                       # every engine (root; about 3 minutes)
    python -m plait.netem wire --cases dp,topk --steps 4 --json out.json

Each case trains a small GPT with `Trainer.train_step` (what `plait train` runs, minus logging
and checkpoints) on 2 (or 4) gloo ranks inside a private network namespace whose loopback has
MTU 1500: every byte the ranks exchange crosses that loopback, and nothing else does. After a
warm-up, two windows of N and 2N steps are measured between barriers; their difference is N
steps with every fixed cost (the barriers, a window edge cutting a background exchange)
cancelled. For each window:

- wire: TCP payload sent on the loopback, bytes − 52 · packets (plait.netem.namespace: the
  IPv4 + TCP + timestamp headers of each packet the loopback counts);
- plait's count: the sum over ranks of `mesh.comm.stats` (wire = what plait says the backend
  sends; formula = the algorithms' formulas), see plait.comm.accounting.

Reported per step per rank (sums / ranks / N) with wire / count, which should be within 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from plait.netem.namespace import HEADER_BYTES, Namespace, loopback_counters

# a GPT small enough for 2 CPU cores, large enough that gradients are not all framing
BASE = ["model.preset=tiny", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=4",
        "model.ffn_hidden=128", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
        "train.val_samples=0", "optim.warmup_steps=0", "data.val_fraction=0.01"]
SYNC = ["sync.every=4"]
CASES: dict[str, tuple[int, list[str]]] = {
    "dp": (2, ["parallel.dp=2"]),
    "dp4": (4, ["parallel.dp=4"]),
    "tp": (2, ["parallel.dp=1", "parallel.tp=2"]),
    "tp-sp": (2, ["parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp": (2, ["parallel.dp=1", "parallel.pp=2"]),
    "zero1": (2, ["parallel.dp=2", "parallel.zero=1"]),
    "zero2": (2, ["parallel.dp=2", "parallel.zero=2"]),
    "zero3": (2, ["parallel.dp=2", "parallel.zero=3"]),
    "fp16": (2, ["parallel.dp=2", "compression.name=fp16"]),
    "bf16": (2, ["parallel.dp=2", "compression.name=bf16"]),
    "int8": (2, ["parallel.dp=2", "compression.name=int8"]),
    "topk": (2, ["parallel.dp=2", "compression.name=topk"]),
    "sign": (2, ["parallel.dp=2", "compression.name=sign"]),
    "powersgd": (2, ["parallel.dp=2", "compression.name=powersgd", "compression.warmup_steps=0"]),
    "onebit_adam": (2, ["parallel.dp=2", "optim.name=onebit_adam", "compression.warmup_steps=1"]),
    "local_sgd": (2, ["parallel.dp=2", "sync.strategy=local_sgd", *SYNC]),
    "diloco": (2, ["parallel.dp=2", "sync.strategy=diloco", *SYNC]),
    "streaming_diloco": (2, ["parallel.dp=2", "sync.strategy=streaming_diloco", *SYNC,
                             "sync.fragments=2"]),
    "delayed": (2, ["parallel.dp=2", "sync.strategy=delayed"]),
}


def _measure_case(overrides: list[str], warmup: int, n: int) -> dict:
    """On every rank: train, and mark the loopback and plait's counts at three barriers."""
    import torch.distributed as dist

    from plait.config import load
    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = load(None, overrides)
    p = cfg.parallel
    mesh = Mesh.build(p.dp, p.tp, p.pp, replicas=p.replicas)
    tr = Trainer(cfg, mesh)
    for _ in range(warmup):
        tr.train_step()
    marks = []

    def mark():
        dist.barrier()  # every rank's sends of the window are out (and counted on the loopback)
        s = mesh.comm.stats
        marks.append((*loopback_counters(), s.total_bytes, s.total_formula_bytes))
        dist.barrier()  # nobody starts the next window before every rank has read

    mark()
    for _ in range(n):
        tr.train_step()
    mark()
    for _ in range(2 * n):
        tr.train_step()
    mark()
    return {"marks": marks}


def _world_worker(cases: list[tuple[str, list[str]]], warmup: int, n: int) -> dict:
    out = {}
    for name, overrides in cases:
        try:
            out[name] = _measure_case(overrides, warmup, n)
        except Exception:  # noqa: BLE001 - one case failing must not hide the others
            out[name] = traceback.format_exc()
    return out


def summarize(name: str, world: int, n: int, per_rank: list[dict]) -> dict:
    """wire (loopback payload) and plait's counts for N steps, per step per rank."""
    m0 = per_rank[0]["marks"]  # the loopback is shared: every rank read the same counters

    def payload(a, b):
        return (m0[b][0] - m0[a][0]) - HEADER_BYTES * (m0[b][1] - m0[a][1])

    def counted(i):
        return sum((r["marks"][2][i] - r["marks"][1][i]) - (r["marks"][1][i] - r["marks"][0][i])
                   for r in per_rank)

    wire = payload(1, 2) - payload(0, 1)
    packets = (m0[2][1] - m0[1][1]) - (m0[1][1] - m0[0][1])
    count, formula = counted(2), counted(3)
    per = n * world
    return {"case": name, "world": world, "steps": n, "wire": wire / per, "count": count / per,
            "formula": formula / per, "headers": HEADER_BYTES * packets / per,
            "ratio": wire / count if count else None,
            "ratio_formula": wire / formula if formula else None}


def measure(names: list[str], steps: int = 8, warmup: int = 4,
            timeout: float = 600.0) -> list[dict]:
    """Run the cases here (inside a namespace already): one spawn per world size."""
    from plait.testing import run_ranks

    rows = []
    for world in sorted({CASES[c][0] for c in names}):
        cases = [(c, BASE + CASES[c][1]) for c in names if CASES[c][0] == world]
        res = run_ranks(_world_worker, world, args=(cases, warmup, steps), timeout=timeout)
        for name, _ in cases:
            per_rank = [r[name] for r in res]
            if isinstance(per_rank[0], str):
                rows.append({"case": name, "world": world, "error": per_rank[0]})
            else:
                rows.append(summarize(name, world, steps, per_rank))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| engine | ranks | plait's count (B/step/rank) | formula | wire after headers | "
           "TCP/IP headers | wire / count | wire / formula |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            why = r["error"].strip().splitlines()[-1]
            out.append(f"| {r['case']} | {r['world']} | failed: {why} ||||||")
            continue
        out.append(f"| {r['case']} | {r['world']} | {r['count']:,.0f} | {r['formula']:,.0f} | "
                   f"{r['wire']:,.0f} | {r['headers']:,.0f} | {r['ratio']:.3f} | "
                   f"{r['ratio_formula']:.3f} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m plait.netem wire", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=8, help="N: the windows are N and 2N steps")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if "PLAIT_WIRE_NETNS" not in os.environ:  # re-run this command inside a namespace of its own
        from plait.netem.nodes import cannot

        why = cannot()
        if why:
            print(f"wire bytes: {why}", file=sys.stderr)
            return 2
        with Namespace(mtu=1500) as ns:
            env = dict(os.environ, PLAIT_WIRE_NETNS=ns.name)
            env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d: "the namespace has no hostname"
            cmd = [sys.executable, "-m", "plait.netem", "wire", *argv]
            return ns.run(cmd, env=env).returncode
    rows = measure(names, args.steps, args.warmup)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0
