"""`plait bench pp`: plait's pipeline beside torch.distributed.pipelining, on equal-cost stages.

Model (plait.bench.pp_model): a stack of identical transformer blocks (plait's GPT `Block`, with
its RoPE tables) of the preset's width, k blocks per stage (`--blocks-per-stage`; default the
even k nearest n_layers / p, at least 2, so interleaved 1F1B with v = 2 has equal chunks). The
input is a random hidden state, the loss the mean squared error against a random target; m =
`--batch` micro-batches of `--micro-batch` sequences of `--seq-len` tokens per step.

Per pp size p (p gloo ranks, cores / p threads each): plait under GPipe, 1F1B, interleaved 1F1B
(v = 2, when m is a multiple of p) and ZB-H1; torch's ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B (v = 2) and ScheduleInterleavedZeroBubble (ZB1P, one stage per rank: the
counterpart of ZB-H1) on the very same stage modules (plait's split; plait.bench.pp_worker), and
ScheduleZBVZeroBubble on a V split of the same blocks (no plait counterpart; for reference). SGD
steps. Repetitions alternate the runs (the order reversed every other repetition); each times
`--steps` steps after one untimed warm-up step, which alone counts the saved activation bytes.
Reported per run: the median over repetitions of the mean step time, the ratio plait / torch,
the measured bubble (idle fraction, mean over ranks, from the runtime's per-instruction clock)
against the theory (plait.pipeline.schedules.theoretical_bubble), the peak number of
micro-batches whose activations are alive per stage and their saved bytes, and the first step's
loss of plait and torch (they must match).

`--simulate` also times the last step of every repetition with plait's simulator fed the
measured costs (plait.bench.pp_sim): the bubble it predicts beside the measured one.
`--profile DIR` profiles every run instead of timing it (plait.bench.pp_profile).
"""

from __future__ import annotations

import json
import os

import torch

from plait.bench.pp_model import RopeBlock, mse_sum  # noqa: F401  (the benchmark's model)


def add_arguments(ap) -> None:
    """plait bench pp: plait's pipeline schedules beside torch.distributed.pipelining."""
    ap.add_argument("--ranks", default="2,4", help="comma-separated pipeline sizes")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--preset", default="10m", help="model preset of the blocks")
    ap.add_argument("--batch", type=int, default=0,
                    help="micro-batches per step m (0: the benchmark's choice, 8)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--blocks-per-stage", type=int, default=0,
                    help="blocks per pipeline rank (0: the benchmark's choice)")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b,zb_h1",
                    help="plait's schedules to run (torch's counterparts run beside them)")
    ap.add_argument("--no-torch", action="store_true", help="plait's runs only")
    ap.add_argument("--simulate", action="store_true",
                    help="also simulate each step with its measured costs")
    ap.add_argument("--profile", default=None,
                    help="profile the runs instead of timing them; traces go to this folder")
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def plan(args, p: int, layers: int) -> dict:
    """The worker options of pp size p."""
    m = args.batch or 8
    k = args.blocks_per_stage or 2 * max(1, round(layers / (2 * p)))
    blocks = p * k
    chosen = [s for s in str(args.schedules).split(",") if s]
    inter = m % p == 0 and k % 2 == 0
    schedules = [(s, 2 if s == "interleaved_1f1b" else 1) for s in chosen
                 if s != "interleaved_1f1b" or inter]
    torch_runs = [] if args.no_torch else [(s, v) for s, v in schedules]
    if not args.no_torch and "zb_h1" in chosen and k % 2 == 0 and m >= p:
        torch_runs.append(("zbv", 2))
    return {"pp": p, "m": m, "mb_size": args.micro_batch, "preset": args.preset,
            "seq_len": args.seq_len, "blocks": blocks, "reps": args.reps, "steps": args.steps,
            "lr": 1e-3, "schedules": schedules, "torch": torch_runs,
            "simulate": args.simulate, "profile": args.profile}


def _pair(runs: dict) -> bool:
    ok = True
    for name, row in runs.items():
        if name.startswith("plait/"):
            peer = runs.get("torch/" + name.split("/")[1])
            if peer is not None:
                row["torch_step_s"] = peer["step_s"]
                row["ratio"] = row["step_s"] / peer["step_s"]
                # per repetition, the two runs are neighbours in time: their ratio cancels drifts
                paired = sorted(a / b for a, b in zip(row["times"], peer["times"]))
                row["paired_ratio"] = paired[len(paired) // 2] if len(paired) % 2 else (
                    paired[len(paired) // 2 - 1] + paired[len(paired) // 2]) / 2
                row["same_loss"] = (abs(row["first_loss"] - peer["first_loss"])
                                    <= 1e-5 * abs(peer["first_loss"]))
                ok &= row["same_loss"]
    return ok


def _line(name: str, row: dict) -> str:
    line = f"  {name:<26} {row['step_s'] * 1e3:9.1f} ms/step"
    if "ratio" in row:
        line += (f"   ratio {row['ratio']:.3f} (paired {row['paired_ratio']:.3f})   "
                 f"loss {'same' if row['same_loss'] else 'DIFFERENT'}")
    if "bubble" in row:
        saved = "/".join(f"{b / 2**20:.1f}" for b in row["peak_saved_bytes_per_stage"])
        line += (f"   bubble {100 * row['bubble']:.1f}% (theory "
                 f"{100 * row['bubble_theory']:.1f}%)   in flight per stage "
                 f"{row['peak_in_flight_per_stage']}   saved MiB {saved}")
    if "sim_bubble" in row:
        c = row["sim_costs_ms"]
        line += (f"\n  {'':<26} simulated with measured costs: bubble "
                 f"{100 * row['sim_bubble']:.1f}% vs measured "
                 f"{100 * row['sim_measured_bubble']:.1f}%"
                 f" (same steps; rel. diff {100 * row['sim_rel_err']:.1f}%)   median ms F "
                 f"{_ms(c['F'])} B {_ms(c['B'])}" + (f" W {_ms(c['W'])}" if any(c["W"]) else "")
                 + f" overhead/instr {_ms(c['overhead'])} p2p {c['p2p']:.2f}")
    return line


def _ms(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def _print_profile(res: list) -> None:
    from plait.bench.pp_profile import CATEGORIES

    for r, out in enumerate(res):
        for name, s in out["profile"].items():
            cats = "  ".join(f"{c} {s['ms_per_step'][c]:.1f}" for c in CATEGORIES)
            print(f"  rank {r} {name:<24} {s['wall_ms_per_step']:7.1f} ms/step: {cats}",
                  flush=True)


def main(args) -> int:
    from plait.bench.pp_worker import worker
    from plait.models import build_config
    from plait.testing import run_ranks

    sizes = [int(r) for r in str(args.ranks).split(",") if r]
    layers = build_config(args.preset).n_layers
    rows = []
    ok = True
    for p in sizes:
        threads = max(1, (os.cpu_count() or 1) // p)
        opts = plan(args, p, layers)
        print(f"bench pp: p={p} gloo ranks × {threads} threads, {opts['blocks']} identical "
              f"{args.preset} blocks ({opts['blocks'] // p} per stage), m={opts['m']} "
              f"micro-batches of {args.micro_batch}×{args.seq_len}, {args.reps} alternating reps "
              f"× {args.steps} steps; load {os.getloadavg()[0]:.2f}", flush=True)
        res = run_ranks(worker, p, args=(opts,), timeout=3600, threads=threads)
        if args.profile:
            _print_profile(res)
            rows.append({"pp": p, "profile": [r["profile"] for r in res]})
            continue
        last = res[-1]  # the last stage holds the losses of every run but torch's ZBV
        last["runs"]["torch/zbv"] = res[0]["runs"].get("torch/zbv") or {}
        if not last["runs"]["torch/zbv"]:
            del last["runs"]["torch/zbv"]
        ok &= _pair(last["runs"])
        last.update(preset=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
                    threads_per_rank=threads, torch=torch.__version__,
                    load_average=os.getloadavg())
        rows.append(last)
        for name, row in last["runs"].items():
            print(_line(name, row), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if ok else 1
