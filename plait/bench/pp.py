"""`plait bench pp`: plait's pipeline beside torch.distributed.pipelining, on equal-cost stages.

Model: a stack of identical transformer blocks (plait's GPT `Block`, with its RoPE tables) of the
preset's width, k blocks per stage with k = max(1, n_layers div p), so every stage costs the same
and the measured bubble can be held against the theory. The input is a random hidden state, the
loss the mean squared error against a random target, per micro-batch of one sequence; `--batch`
sequences per step make m = --batch micro-batches.

Per pp size p (p gloo ranks, cores / p threads each): plait under GPipe, 1F1B, interleaved 1F1B
(v = 2, when m is a multiple of p and there are enough blocks) and ZB-H1; torch's ScheduleGPipe
and Schedule1F1B on the very same stage modules (plait's split). SGD steps. Repetitions alternate
the runs; each times `--steps` steps after one untimed warm-up step. Reported per run: the median
over repetitions of the mean step time, the ratio plait / torch (GPipe and 1F1B), the measured
bubble (idle fraction, mean over ranks, from plait's per-instruction clock) against the theory
(p−1)/(m+p−1) for GPipe and 1F1B (interleaved: (p−1)/(vm+p−1); ZB-H1: (p−1)/(3m+p−1)), the
peak number of micro-batches whose activations are alive per stage and their saved bytes
(counted by the runtime), and the first step's loss of plait and torch (they must match).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn as nn

from plait.models.gpt import Block, build_config, rope_tables


class RopeBlock(nn.Module):
    """A GPT block that carries its own RoPE tables, so it maps one hidden state to the next."""

    def __init__(self, cfg, seq_len: int):
        super().__init__()
        self.block = Block(cfg)
        cos, sin = rope_tables(cfg.head_dim, seq_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        T = x.shape[1]
        return self.block(x, self.cos[:T], self.sin[:T])


def mse_sum(out: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    return nn.functional.mse_loss(out.float(), target.float(), reduction=reduction)


def _worker(opts: dict) -> dict:
    import copy

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from plait.config import ParallelConfig
    from plait.mesh import Mesh
    from plait.pipeline.build import build_pipeline
    from plait.pipeline.schedules import theoretical_bubble

    p, m, T = opts["pp"], opts["m"], opts["seq_len"]
    mesh = Mesh.build(dp=1, tp=1, pp=p, device="cpu")
    cfg = build_config(opts["preset"], vocab_size=8, max_seq_len=max(T, 8))
    torch.manual_seed(0)
    model = nn.Sequential(*[RopeBlock(cfg, T) for _ in range(opts["blocks"])])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, T, cfg.d_model, generator=g)
    y = torch.randn(m, T, cfg.d_model, generator=g)
    batches = [(x[i: i + 1], y[i: i + 1]) for i in range(m)]
    divisor = m * y[0].numel()  # mean over micro-batches of each one's mean: torch's scale_grads
    sgd = lambda params: torch.optim.SGD(params, lr=opts["lr"])

    runs, plait_runners = {}, {}
    schedules = [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1)]
    if m % p == 0 and opts["blocks"] >= 2 * p:
        schedules.insert(2, ("interleaved_1f1b", 2))
    for name, v in schedules:
        stage, runner, _ = build_pipeline(copy.deepcopy(model), mesh,
                                          ParallelConfig(pp=p, schedule=name, virtual_stages=v),
                                          mse_sum, measure_memory=True)
        opt = sgd(stage.parameters())

        def step(runner=runner, opt=opt) -> float:
            loss = runner.train_step(batches, divisor)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        runs[f"plait/{name}"] = step
        plait_runners[f"plait/{name}"] = runner
    for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        stage, _, _ = build_pipeline(copy.deepcopy(model), mesh,
                                     ParallelConfig(pp=p, schedule=name), mse_sum)
        tstage = PipelineStage(stage, mesh.pp_index, p, torch.device("cpu"), group=mesh.pp.pg)
        sched = cls(tstage, n_microbatches=m, loss_fn=lambda out, tgt: mse_sum(out, tgt, "mean"))
        opt = sgd(stage.parameters())

        def step(sched=sched, opt=opt) -> float:
            losses: list = []
            if mesh.is_first_stage:
                sched.step(x)
            elif mesh.is_last_stage:
                sched.step(target=y, losses=losses)
            else:
                sched.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(torch.stack(losses).detach().mean()) if losses else float("nan")

        runs[f"torch/{name}"] = step

    first = {k: fn() for k, fn in runs.items()}  # warm-up: every run starts from the same weights
    times: dict[str, list[float]] = {k: [] for k in runs}
    bubbles: dict[str, list[list[float]]] = {k: [] for k in plait_runners}
    names = list(runs)
    for rep in range(opts["reps"]):
        for name in (names if rep % 2 == 0 else names[::-1]):  # alternate who goes first
            mesh.comm.barrier(mesh.pp)
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / opts["steps"])
            if name in plait_runners:
                recent = list(plait_runners[name].history)[-opts["steps"]:]
                bubbles[name] += [[s["bubble"] for s in step] for step in recent]
    out = {"pp": p, "m": m, "blocks": opts["blocks"], "runs": {}}
    for name in runs:
        row = {"step_s": statistics.median(times[name]), "times": times[name],
               "first_loss": first[name]}
        if name in plait_runners:
            r = plait_runners[name]
            per_rank = [statistics.median(b[i] for b in bubbles[name]) for i in range(p)]
            theory = theoretical_bubble(r.schedule, p, m, r.v)
            row.update(bubble_per_rank=per_rank, bubble=sum(per_rank) / p, bubble_theory=theory,
                       bubble_rel_err=abs(sum(per_rank) / p - theory) / theory if theory else 0.0,
                       peak_in_flight_per_stage=[int(s["peak_in_flight"]) for s in r.stats],
                       peak_saved_bytes_per_stage=[int(s["peak_saved_bytes"]) for s in r.stats])
        out["runs"][name] = row
    return out


def add_arguments(ap) -> None:
    """plait bench pp: plait's pipeline schedules beside torch.distributed.pipelining."""
    ap.add_argument("--ranks", default="2,4", help="comma-separated pipeline sizes")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--preset", default="10m", help="model preset of the blocks")
    ap.add_argument("--batch", type=int, default=0,
                    help="micro-batches per step (0: the benchmark's choice)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    from plait.models import build_config
    from plait.testing import run_ranks

    sizes = [int(r) for r in str(args.ranks).split(",") if r]
    m = args.batch or 8
    layers = build_config(args.preset).n_layers
    rows = []
    ok = True
    for p in sizes:
        blocks = p * max(1, layers // p)
        threads = max(1, (os.cpu_count() or 1) // p)
        opts = {"pp": p, "m": m, "preset": args.preset, "seq_len": args.seq_len, "blocks": blocks,
                "reps": args.reps, "steps": args.steps, "lr": 1e-3}
        print(f"bench pp: p={p} gloo ranks × {threads} threads, {blocks} identical {args.preset} "
              f"blocks ({blocks // p} per stage), m={m} micro-batches of 1×{args.seq_len}, "
              f"{args.reps} alternating reps × {args.steps} steps", flush=True)
        res = run_ranks(_worker, p, args=(opts,), timeout=3600, threads=threads)
        last = res[-1]  # the last stage holds torch's losses
        runs = last["runs"]
        for name, row in runs.items():
            if name.startswith("plait/"):
                peer = runs.get("torch/" + name.split("/")[1])
                if peer is not None:
                    row["torch_step_s"] = peer["step_s"]
                    row["ratio"] = row["step_s"] / peer["step_s"]
                    row["same_loss"] = (abs(row["first_loss"] - peer["first_loss"])
                                        <= 1e-5 * abs(peer["first_loss"]))
                    ok &= row["same_loss"]
        last.update(preset=args.preset, seq_len=args.seq_len, threads_per_rank=threads,
                    torch=torch.__version__)
        rows.append(last)
        for name, row in runs.items():
            line = f"  {name:<24} {row['step_s'] * 1e3:9.1f} ms/step"
            if "ratio" in row:
                line += (f"   ratio {row['ratio']:.3f}   "
                         f"loss {'same' if row['same_loss'] else 'DIFFERENT'}")
            if "bubble" in row:
                saved = "/".join(f"{b / 2**20:.1f}" for b in row["peak_saved_bytes_per_stage"])
                line += (f"   bubble {100 * row['bubble']:.1f}% (theory "
                         f"{100 * row['bubble_theory']:.1f}%)   in flight per stage "
                         f"{row['peak_in_flight_per_stage']}   saved MiB {saved}")
            print(line, flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if ok else 1
