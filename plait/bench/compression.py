"""`plait bench compression`: compressed data parallelism on an emulated slow network.

    plait bench compression --bandwidth 100mbit --ranks 4 --steps 200 --reps 3 --json out.json

As root, the ranks run inside a private network namespace whose loopback is rate-limited
(docs/architecture.md, "Slow networks": `ip netns add`, `lo` up with MTU 1500, `tc qdisc ... tbf
rate R burst 256kb latency 50ms`); the namespace is deleted afterwards, also on failure or Ctrl-C.
Without root (or without `ip` / `tc`) it says so and exits with status 2. `--bandwidth none` runs on
the machine's unthrottled loopback instead.

Configurations, alternating within each repetition so machine noise hits all alike: plait with
compression.name = none / fp16 / powersgd / topk / sign, then torch DDP with its fp16 hook and
with its PowerSGD hook (one bucket: the configuration that works on gloo). Every run trains the
same GPT from the same weights on the same samples with the same AdamW, schedule and clipping,
for `--steps` steps, evaluating every steps/20.

Reported per configuration (medians over repetitions): step time (median step, training only),
bytes per step per rank (plait: its own accounting by the algorithm's formula; all: what the
namespace's loopback carried, TCP/IP headers included, divided by ranks and steps), final
validation loss, and the training time until the validation loss first reaches the final
validation loss of the uncompressed plait run of the same repetition (None: not reached).
"""

from __future__ import annotations

import os
import platform
import time

import torch

from plait.bench.netns import drive, median, setup, time_to, timed_training

CONFIGS = ("none", "fp16", "powersgd", "topk", "sign", "ddp_fp16", "ddp_powersgd")
# PowerSGD rank and warm-up, top-k fraction: the same for plait and torch
RANK, TOPK, WARMUP = 4, 0.01, 10


# -- the network namespace ---------------------------------------------------------------------


def _argv(args) -> list[str]:
    out = ["bench", "compression", "--bandwidth", args.bandwidth, "--ranks", args.ranks, "--reps",
           str(args.reps), "--steps", str(args.steps), "--preset", args.preset, "--batch",
           str(args.batch), "--seq-len", str(args.seq_len), "--bucket-mb", str(args.bucket_mb)]
    return out + (["--json", os.path.abspath(args.json)] if args.json else [])


# -- one run (every rank) ----------------------------------------------------------------------

def _run(spec: dict) -> dict:
    import torch.distributed as dist

    from plait.config import CompressionConfig, OptimConfig, ParallelConfig
    from plait.mesh import Mesh
    from plait.models.gpt import lm_loss
    from plait.optim import optimizer_factory

    world, rank = dist.get_world_size(), dist.get_rank()
    B, T, steps = spec["batch"], spec["seq_len"], spec["steps"]
    model, train, val = setup(spec)
    ocfg = OptimConfig()
    name = spec["name"]
    if name.startswith("ddp_"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        mesh = None
        net = DDP(model, bucket_cap_mb=1e6)  # one bucket
        if name == "ddp_fp16":
            net.register_comm_hook(None, default_hooks.fp16_compress_hook)
        else:
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=RANK,
                                                start_powerSGD_iter=max(2, WARMUP))
            net.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        opt = optimizer_factory(ocfg, torch.device("cpu"))(list(net.parameters()))
        module = net.module

        def step(x, y):
            lm_loss(net(x), y).backward()  # DDP averages: the mean over the global batch
            torch.nn.utils.clip_grad_norm_(net.parameters(), ocfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def allreduce(t):
            dist.all_reduce(t)

        def barrier():
            dist.barrier()
    else:
        from plait.parallelize import ParallelOptions, parallelize

        mesh = Mesh.build(dp=world, device="cpu")
        comp = CompressionConfig(name=name, rank=RANK, topk_fraction=TOPK, warmup_steps=WARMUP)
        par = ParallelConfig(dp=world, bucket_mb=spec["bucket_mb"])
        net, opt = parallelize(model, optimizer_factory(ocfg, mesh.device), mesh,
                               ParallelOptions(parallel=par, grad_clip=ocfg.grad_clip,
                                               compression=comp))
        module = net.module

        def step(x, y):
            (net.loss(net(x), y, reduction="sum") / (world * B * T)).backward()  # summed over dp
            opt.step()
            opt.zero_grad()

        def allreduce(t):
            mesh.comm.all_reduce(t, mesh.dp)

        def barrier():
            mesh.comm.barrier(mesh.world)

    @torch.no_grad()
    def evaluate() -> float:
        module.eval()
        n = spec["val_samples"]
        lo, hi = n * rank // world, n * (rank + 1) // world
        acc = torch.zeros(2, dtype=torch.float64)
        x, y = val.batch(lo, hi - lo)
        acc[0] += lm_loss(module(x), y, reduction="sum").double()
        acc[1] += y.numel()
        allreduce(acc)
        module.train()
        return float(acc[0] / acc[1])

    formula = [0.0]

    def count_step():
        if mesh is not None:
            formula[0] += mesh.comm.stats.reset_step()["comm_bytes"]

    def drop_eval():
        if mesh is not None:
            mesh.comm.stats.reset_step()  # validation is not a training step's traffic

    out = timed_training(step, evaluate, opt, train, spec, world, rank, barrier, count_step,
                         drop_eval)
    out["comm_bytes_per_step"] = formula[0] / steps if mesh is not None else None
    return out


# -- the driver ----------------------------------------------------------------------------------


def run_all(args) -> dict:
    from plait.testing import run_ranks

    out = {"bandwidth": args.bandwidth, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "torch": torch.__version__,
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores",
           "command": "plait " + " ".join(_argv(args)), "powersgd_rank": RANK,
           "topk_fraction": TOPK, "warmup_steps": WARMUP, "results": {}}
    for world in [int(w) for w in args.ranks.split(",") if w.strip()]:
        spec = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
                "steps": args.steps, "bucket_mb": args.bucket_mb, "seed": 1337, "val_samples": 32,
                "threads": max(1, (os.cpu_count() or 1) // world)}
        reps = {c: [] for c in CONFIGS}
        for rep in range(args.reps):
            for name in CONFIGS:
                res = run_ranks(_run, world, args=({**spec, "name": name},),
                                threads=spec["threads"], timeout=max(600.0, 60.0 * args.steps))[0]
                reps[name].append(res)
                print(f"ranks {world} rep {rep + 1}/{args.reps} {name:>13}: step "
                      f"{res['step_s'] * 1e3:8.1f} ms, val {res['final_val']:.4f}", flush=True)
        rows = {}
        for name in CONFIGS:
            ttt = [time_to(r["curve"], base["final_val"])
                   for r, base in zip(reps[name], reps["none"])]
            rows[name] = {
                "step_s": median([r["step_s"] for r in reps[name]]),
                "comm_bytes_per_step": median([r["comm_bytes_per_step"] for r in reps[name]]),
                "loopback_bytes_per_step": median(
                    [r["loopback_bytes_per_step"] for r in reps[name]]),
                "final_val_loss": median([r["final_val"] for r in reps[name]]),
                "time_to_target_s": median(ttt) if all(t is not None for t in ttt) else None,
                "reached_target": sum(t is not None for t in ttt), "reps": args.reps,
                "curves": [r["curve"] for r in reps[name]],
            }
        out["results"][str(world)] = rows
        _print_table(world, rows, args.bandwidth)
    return out


def _fmt(v, scale=1.0, spec=".1f") -> str:
    return "-" if v is None else format(v * scale, spec)


def _print_table(world: int, rows: dict, bandwidth: str) -> None:
    base = rows["none"]["time_to_target_s"]
    print(f"\n{world} ranks, bandwidth {bandwidth}: medians over repetitions")
    print(f"{'config':>13} {'step ms':>9} {'plait KB/step':>14} {'lo KB/step':>11} "
          f"{'final val':>10} {'to target s':>12} {'speed-up':>9}")
    for name, r in rows.items():
        t = r["time_to_target_s"]
        speed = f"{base / t:.2f}x" if base and t else "-"
        print(f"{name:>13} {_fmt(r['step_s'], 1e3):>9} {_fmt(r['comm_bytes_per_step'], 1e-3):>14} "
              f"{_fmt(r['loopback_bytes_per_step'], 1e-3):>11} "
              f"{_fmt(r['final_val_loss'], 1, '.4f'):>10} {_fmt(t, 1, '.2f'):>12} {speed:>9}")


def add_arguments(ap) -> None:
    """plait bench compression: each compressor beside DDP's hooks, over an emulated network."""
    ap.add_argument("--bandwidth", default="100mbit",
                    help="emulated network rate (tc rate, e.g. 100mbit, 1gbit; "
                    "needs root), or none for the plain loopback")
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--preset", default="10m", help="model preset")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    return drive("compression", args, _argv(args), run_all)
