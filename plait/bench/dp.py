"""`plait bench dp`: plait's bucketed reducer beside torch's DistributedDataParallel.

Per world size: the same GPT, batch, bucket size and data on every rank; both start from the same
weights; repetitions alternate plait / DDP so machine noise hits both alike. Each repetition times
`--steps` optimizer steps after one untimed warm-up step; the reported time is the median over
repetitions of the mean step time, and ratio = plait / DDP (below 1: plait is faster).
Bytes per step: plait's from its own accounting; DDP's from the same ring formula over its gradient
bytes (DDP reduces every gradient once per step).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch


def _step_fn(model, opt, batch, reducer=None):
    x, y = batch

    def step():
        from plait.models import lm_loss

        loss = lm_loss(model(x), y)
        loss.backward()
        if reducer is not None:
            reducer.finish()
        opt.step()
        if reducer is not None:
            reducer.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _worker(opts: dict) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from plait.comm import wire_bytes
    from plait.data_parallel import GradReducer
    from plait.mesh import Mesh
    from plait.models import GPT, build_config

    mesh = Mesh.build(dp=dist.get_world_size())
    cfg = build_config(opts["preset"], max_seq_len=max(opts["seq_len"], 256))
    torch.manual_seed(0)
    ref = GPT(cfg)
    g = torch.Generator().manual_seed(100 + mesh.rank)
    x = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["seq_len"]), generator=g)
    batch = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
    bucket = int(opts["bucket_mb"] * 2**20)

    pm = GPT(cfg)
    pm.load_state_dict(ref.state_dict())
    reducer = GradReducer(list(pm.parameters()), mesh.dp, mesh.comm, bucket_bytes=bucket,
                          average=True)
    popt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    dm = GPT(cfg)
    dm.load_state_dict(ref.state_dict())
    ddp = DDP(dm, bucket_cap_mb=opts["bucket_mb"])
    dopt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    runs = {"plait": _step_fn(pm, popt, batch, reducer), "ddp": _step_fn(ddp, dopt, batch)}

    first = {k: fn() for k, fn in runs.items()}  # warm-up, and the same first loss on both
    times = {k: [] for k in runs}
    losses = {k: [] for k in runs}
    mesh.comm.stats.reset_step()
    plait_bytes = []
    for _ in range(opts["reps"]):
        for name, fn in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                losses[name].append(fn())
            times[name].append((time.perf_counter() - t0) / opts["steps"])
            if name == "plait":
                plait_bytes.append(mesh.comm.stats.reset_step()["comm_bytes"] / opts["steps"])
    grad_bytes = sum(p.numel() * p.element_size() for p in dm.parameters())
    n = mesh.dp_size
    return {
        "ranks": n,
        "plait_step_s": statistics.median(times["plait"]),
        "ddp_step_s": statistics.median(times["ddp"]),
        "ratio": statistics.median(times["plait"]) / statistics.median(times["ddp"]),
        "plait_times": times["plait"],
        "ddp_times": times["ddp"],
        "plait_bytes_per_step": statistics.median(plait_bytes),
        "ddp_bytes_per_step": wire_bytes("all_reduce", grad_bytes, n),
        "n_buckets": len(reducer.buckets),
        "first_loss": first,
        "final_loss": {k: v[-1] for k, v in losses.items()},
    }


def add_arguments(ap) -> None:
    """plait bench dp: plait's reducer beside DDP."""
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions per world size")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--preset", default="10m", help="model preset")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    from plait.testing import run_ranks
    from plait.train.metrics import human_bytes

    world_sizes = [int(r) for r in str(args.ranks).split(",") if r]
    threads = lambda n: max(1, (os.cpu_count() or 1) // n)
    rows = []
    for n in world_sizes:
        opts = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len + 1,
                "bucket_mb": args.bucket_mb, "reps": args.reps, "steps": args.steps}
        print(f"bench dp: {n} gloo ranks, preset {args.preset}, {args.batch}×{args.seq_len} tokens "
              f"per rank, bucket {args.bucket_mb} MiB, {args.reps} alternating reps × {args.steps} "
              "steps", flush=True)
        res = run_ranks(_worker, n, args=(opts,), timeout=3600, threads=threads(n))[0]
        res.update(preset=args.preset, batch_per_rank=args.batch, seq_len=args.seq_len,
                   bucket_mb=args.bucket_mb, threads_per_rank=threads(n), torch=torch.__version__)
        rows.append(res)
        print(f"  plait {res['plait_step_s'] * 1e3:8.1f} ms/step   DDP "
              f"{res['ddp_step_s'] * 1e3:8.1f} ms/step   ratio {res['ratio']:.3f}   bytes/step "
              f"plait {human_bytes(res['plait_bytes_per_step'])} DDP "
              f"{human_bytes(res['ddp_bytes_per_step'])}   final loss plait "
              f"{res['final_loss']['plait']:.4f} DDP {res['final_loss']['ddp']:.4f}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0
