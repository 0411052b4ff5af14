"""`plait bench sync`: the sync strategies on an emulated slow network,
beside torch's post-local SGD.

    plait bench sync --bandwidth 10mbit --json runs/bench_sync.json

As root, the ranks run inside a private network namespace whose loopback is rate-limited
(docs/architecture.md, "Slow networks": `ip netns add`, `lo` up with MTU 1500, `tc qdisc ... tbf
rate R burst 256kb latency 50ms`); the namespace is deleted afterwards, also on failure or Ctrl-C.
Without root (or without `ip` / `tc`) it says so and exits with status 2; `--bandwidth none` runs on
the unthrottled loopback.

Configurations, alternating within each repetition: plait with sync.strategy = every_step,
local_sgd, diloco, diloco with int8 outer gradients, streaming_diloco (τ = 1, P = 4 fragments) and
delayed; then torch's `PostLocalSGDOptimizer` (`PeriodicModelAverager` every H steps over the
world) on DDP with `post_localSGD_hook`, given an explicit subgroup per rank (the default one
needs CUDA) and no dense warm-up, so it is local SGD as torch ships it. Every run trains the same
GPT from the same weights on the same samples with the same AdamW, schedule and clipping. Then
the straggler run: every configuration again with rank 1 made 2× slower (sync.slow_rank /
sync.slow_factor; the torch loop sleeps the same way).

Reported per configuration (medians over repetitions): median step time (training only), bytes
per step per rank (plait: its own accounting; all: what the namespace's loopback carried, TCP/IP
headers included, divided by ranks and steps), final validation loss (each replica evaluates the
whole validation set with its own weights; the mean over replicas), training time until that
loss first reaches every_step's final validation loss, the fraction of training time the loop
waited on the network (plait: its Comm's blocked time; torch: time in the averager), and the
straggler run's throughput in samples per second.

Defaults (plait.bench.OWN): --ranks 4, --steps 300, --preset tiny, --reps 1, --batch 4
(sequences per rank per step); --every (H) defaults to steps / 10.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from plait.bench.netns import drive, median, setup, time_to, timed_training

CONFIGS = ("every_step", "local_sgd", "diloco", "diloco_int8", "streaming_diloco", "delayed",
           "torch_postlocal")
SYNC = {  # config -> SyncConfig fields beyond strategy / every
    "diloco_int8": {"strategy": "diloco", "quantize": "int8"},
    # fragments: at most H
    "streaming_diloco": {"strategy": "streaming_diloco", "fragments": 4, "delay": 1},
}
SLOW_RANK, SLOW_FACTOR = 1, 2.0


# -- one run (every rank) ----------------------------------------------------------------------
def _run(spec: dict) -> dict:
    import torch.distributed as dist

    from plait.config import OptimConfig, ParallelConfig, SyncConfig
    from plait.mesh import Mesh
    from plait.models.gpt import lm_loss
    from plait.optim import optimizer_factory

    world, rank = dist.get_world_size(), dist.get_rank()
    B, T, steps, H = spec["batch"], spec["seq_len"], spec["steps"], spec["every"]
    model, train, val = setup(spec)
    ocfg = OptimConfig()
    name, slow = spec["name"], spec["slow"] and rank == SLOW_RANK
    waited = [0.0]
    if name == "torch_postlocal":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        mesh = None
        # each replica alone
        own, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])
        net = DDP(model)
        net.register_comm_hook(
            PostLocalSGDState(process_group=None, subgroup=own, start_localSGD_iter=0),
            post_localSGD_hook)
        averager = PeriodicModelAverager(period=H, warmup_steps=0)
        inner_avg = averager.average_parameters

        def timed_average(params):
            t0 = time.perf_counter()
            inner_avg(params)
            waited[0] += time.perf_counter() - t0

        averager.average_parameters = timed_average
        opt = PostLocalSGDOptimizer(
            optimizer_factory(ocfg, torch.device("cpu"))(list(net.parameters())), averager)
        module = net.module
        last = [None]

        def step(x, y):
            lm_loss(net(x), y).backward()  # its own replica's mean gradient
            if slow and last[0] is not None:  # the same straggler as plait's sync.slow_factor
                time.sleep((SLOW_FACTOR - 1.0) * (time.perf_counter() - last[0]))
            torch.nn.utils.clip_grad_norm_(net.parameters(), ocfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            last[0] = time.perf_counter()

        def allreduce(t):
            dist.all_reduce(t)
    else:
        from plait.parallelize import ParallelOptions, parallelize

        mesh = Mesh.build(dp=world, device="cpu")
        fields = {"strategy": name, **SYNC.get(name, {}), "every": H,
                  "slow_rank": SLOW_RANK if spec["slow"] else -1, "slow_factor": SLOW_FACTOR}
        fields["fragments"] = min(fields.get("fragments", 1), H)
        sync = SyncConfig(**fields)
        net, opt = parallelize(model, optimizer_factory(ocfg, mesh.device), mesh,
                               ParallelOptions(parallel=ParallelConfig(dp=world),
                                               grad_clip=ocfg.grad_clip, sync=sync,
                                               total_steps=steps))
        module = net.module

        def step(x, y):
            (net.loss(net(x), y, reduction="sum") / (world * B * T)).backward()  # summed over dp
            opt.step()
            opt.zero_grad()

        def allreduce(t):
            mesh.comm.all_reduce(t, mesh.world)

    @torch.no_grad()
    def evaluate() -> float:
        module.eval()
        x, y = val.batch(0, spec["val_samples"])  # the whole set on every replica, its own weights
        loss = lm_loss(module(x), y).double().reshape(1)
        allreduce(loss)
        module.train()
        return float(loss) / world

    counted = [0.0]

    # every rank is ready: the clock starts together, and the barrier is no step's traffic
    def start():
        allreduce(torch.zeros(1))
        if mesh is not None:
            mesh.comm.stats.reset_step()

    def count_step():
        if mesh is not None:
            st = mesh.comm.stats.reset_step()
            counted[0] += st["comm_bytes"]
            waited[0] += st["comm_s"]

    def after_eval():
        if mesh is not None:
            mesh.comm.stats.reset_step()  # validation is not a training step's traffic
            opt.sync.reset_clock()  # nor is it a step the straggler stretches
        else:
            last[0] = time.perf_counter() if last[0] is not None else None

    out = timed_training(step, evaluate, opt, train, spec, world, rank, start, count_step,
                         after_eval)
    out.update(samples_per_s=steps * world * B / out["train_s"],
               wait_fraction=waited[0] / out["train_s"],
               comm_bytes_per_step=counted[0] / steps if mesh is not None else None)
    return out


# -- the driver ----------------------------------------------------------------------------------


def _resolve(args) -> None:
    args.every = getattr(args, "every", 0) or max(1, args.steps // 10)


def _argv(args) -> list[str]:
    out = ["bench", "sync", "--bandwidth", args.bandwidth, "--ranks", str(args.ranks), "--reps",
           str(args.reps), "--steps", str(args.steps), "--preset", args.preset, "--batch",
           str(args.batch), "--seq-len", str(args.seq_len), "--every", str(args.every)]
    return out + (["--json", os.path.abspath(args.json)] if args.json else [])


def run_all(args) -> dict:
    from plait.testing import run_ranks

    world = int(str(args.ranks).split(",")[-1])
    out = {"bandwidth": args.bandwidth, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "torch": torch.__version__,
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores",
           "command": "plait " + " ".join(_argv(args)), "ranks": world, "every": args.every,
           "slow_rank": SLOW_RANK, "slow_factor": SLOW_FACTOR, "results": {}}
    spec = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
            "steps": args.steps, "every": args.every, "seed": 1337, "val_samples": 32,
            "threads": max(1, (os.cpu_count() or 1) // world)}
    reps: dict[tuple[str, bool], list] = {(c, s): [] for c in CONFIGS for s in (False, True)}
    for rep in range(args.reps):
        for slow in (False, True):
            for name in CONFIGS:
                res = run_ranks(_run, world, args=({**spec, "name": name, "slow": slow},),
                                threads=spec["threads"], timeout=max(900.0, 30.0 * args.steps))
                reps[(name, slow)].append(res)
                print(f"rep {rep + 1}/{args.reps} {'straggler ' if slow else ''}{name:>17}: step "
                      f"{res[0]['step_s'] * 1e3:8.1f} ms, val {res[0]['final_val']:.4f}, "
                      f"{res[0]['samples_per_s']:.1f} samples/s", flush=True)
    rows = {}
    for name in CONFIGS:
        runs = [r[0] for r in reps[(name, False)]]
        ttt = [time_to(r["curve"], base[0]["final_val"])
               for r, base in zip(runs, reps[("every_step", False)])]
        rows[name] = {
            "step_s": median([r["step_s"] for r in runs]),
            "comm_bytes_per_step": median([r["comm_bytes_per_step"] for r in runs]),
            "loopback_bytes_per_step": median([r["loopback_bytes_per_step"] for r in runs]),
            "final_val_loss": median([r["final_val"] for r in runs]),
            "time_to_target_s": median(ttt) if all(t is not None for t in ttt) else None,
            "wait_fraction": median([r["wait_fraction"] for r in runs]),
            "samples_per_s": median([r["samples_per_s"] for r in runs]),
            # the straggler run: rank 1 slowed 2×;
            # each rank's own throughput, the slowest one reported
            "straggler_samples_per_s": median(
                [min(x["samples_per_s"] for x in r) for r in reps[(name, True)]]),
            "curves": [r["curve"] for r in runs],
        }
    out["results"] = rows
    _print_table(rows, args.bandwidth, world)
    return out


def _fmt(v, scale=1.0, spec=".1f") -> str:
    return "-" if v is None else format(v * scale, spec)


def _print_table(rows: dict, bandwidth: str, world: int) -> None:
    base = rows["every_step"]["time_to_target_s"]
    print(f"\n{world} replicas, bandwidth {bandwidth}: medians over repetitions; straggler: rank "
          f"{SLOW_RANK} {SLOW_FACTOR:g}× slower")
    print(f"{'config':>17} {'step ms':>8} {'plait KB/step':>13} {'lo KB/step':>10} "
          f"{'final val':>9} {'to target s':>11} {'speed-up':>8} {'wait %':>7} {'samples/s':>9} "
          f"{'straggler':>9}")
    for name, r in rows.items():
        t = r["time_to_target_s"]
        speed = f"{base / t:.1f}x" if base and t else "-"
        print(f"{name:>17} {_fmt(r['step_s'], 1e3):>8} {_fmt(r['comm_bytes_per_step'], 1e-3):>13} "
              f"{_fmt(r['loopback_bytes_per_step'], 1e-3):>10} "
              f"{_fmt(r['final_val_loss'], 1, '.4f'):>9} {_fmt(t, 1, '.2f'):>11} {speed:>8} "
              f"{_fmt(r['wait_fraction'], 100):>7} {_fmt(r['samples_per_s']):>9} "
              f"{_fmt(r['straggler_samples_per_s']):>9}")


def add_arguments(ap) -> None:
    """plait bench sync: each sync strategy beside post-local SGD, over an emulated network."""
    ap.add_argument("--bandwidth", default="100mbit",
                    help="emulated network rate (tc rate, e.g. 10mbit; needs "
                    "root), or none for the plain loopback")
    ap.add_argument("--ranks", default="4", help="world size")
    ap.add_argument("--reps", type=int, default=1, help="repetitions")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--preset", default="tiny", help="model preset")
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--every", type=int, default=0, help="H, steps between syncs (0: steps / 10)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    _resolve(args)
    return drive("sync", args, _argv(args), run_all)
