"""Shared pieces of the slow-network benchmarks (compression, sync).

A slow network is emulated as docs/architecture.md, "Slow networks" says: a private network
namespace whose loopback has MTU 1500 and a token-bucket rate limit (the burst above the MTU
matters: with lo's 64 KiB MTU tbf drops packets and gloo times out), plait.netem.Namespace. The
benchmark re-executes itself inside the namespace, which is deleted on every way out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import time

import torch


def cannot(bench: str, bandwidth: str) -> str | None:
    """Why `plait bench <bench> --bandwidth <bandwidth>` cannot run here, or None."""
    if not re.fullmatch(r"\d+(\.\d+)?[kmg]?bit", bandwidth):
        return (f"--bandwidth {bandwidth!r}: give a tc rate such as 10mbit, 100mbit or 1gbit, "
                "or none")
    if os.geteuid() != 0:
        return (f"plait bench {bench}: emulating a network needs root (a private network namespace "
                "with a rate-limited loopback); run it as root, or pass --bandwidth none for the "
                "unthrottled loopback")
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return (f"plait bench {bench}: {' and '.join(missing)} not found (package iproute2); "
                f"install it, or pass --bandwidth none for the unthrottled loopback")
    return None


def run_in_namespace(bench: str, bandwidth: str, argv: list[str]) -> int:
    """Run `python -m plait *argv` inside a fresh namespace whose loopback is limited to
    `bandwidth` (plait.netem.Namespace: deleted on every way out, success, failure, Ctrl-C)."""
    from plait.netem import Namespace

    try:
        with Namespace(mtu=1500, rate=bandwidth, tag=f"{os.getpid()}-{bench}") as ns:
            env = dict(os.environ, PLAIT_BENCH_NETNS=ns.name)
            env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d: the namespace has no hostname
            return ns.run([sys.executable, "-m", "plait", *argv], env=env).returncode
    except RuntimeError as e:  # the namespace or its qdisc could not be made
        print(f"plait bench {bench}: cannot create a network namespace ({e}); "
              f"pass --bandwidth none for the unthrottled loopback", file=sys.stderr)
        return 2


def loopback_tx_bytes() -> int:
    """Bytes sent on `lo` in this process's network namespace."""
    from plait.netem import loopback_counters

    return loopback_counters()[0]


def setup(spec: dict):
    """(model, train sampler, validation sampler) on the default corpus, seeded from spec."""
    from plait.config import DataConfig, ModelConfig
    from plait.data import ChunkSampler, load_corpus
    from plait.models import GPT
    from plait.train import model_config

    torch.set_num_threads(spec["threads"])
    corpus = load_corpus(DataConfig(), 0)
    mcfg = model_config(ModelConfig(preset=spec["preset"]), corpus.vocab_size, spec["seq_len"])
    torch.manual_seed(spec["seed"])
    model = GPT(mcfg)
    train = ChunkSampler(corpus.train, spec["seq_len"], spec["seed"])
    val = ChunkSampler(corpus.val, spec["seq_len"], spec["seed"], shuffle=False, what="validation")
    return model, train, val


def time_to(curve: list, target: float) -> float | None:
    """First elapsed time at which a (step, elapsed, val_loss) curve reaches `target`."""
    for _, elapsed, v in curve:
        if v <= target * (1 + 1e-9):
            return elapsed
    return None


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def timed_training(step, evaluate, opt, train, spec: dict, world: int, rank: int, sync_point,
                   after_step=None, after_eval=None) -> dict:
    """The slow-network benchmarks' loop, the same for every contestant.

    Each rank reads its own B samples of step s (disjoint across ranks); the LR follows the default
    warm-up + cosine schedule; `step(x, y)` is timed alone, and the validation loss is taken 20
    times (not timed). `after_step()` / `after_eval()` let a contestant account its own traffic.
    Returns the median steady step time, the (step, training seconds, val loss) curve and the
    loopback bytes per step per rank (inside a benchmark namespace).
    """
    from plait.config import OptimConfig
    from plait.optim import lr_factor

    ocfg = OptimConfig()
    B, steps = spec["batch"], spec["steps"]
    base = [g["lr"] for g in opt.param_groups]
    sync_point()  # every rank is ready: the clock starts together
    tx0 = loopback_tx_bytes()
    times, curve, elapsed = [], [], 0.0
    every = max(1, steps // 20)
    for s in range(steps):
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * lr_factor(s, steps, ocfg.warmup_steps, ocfg.schedule, ocfg.min_lr_ratio)
        x, y = train.batch(s * world * B + rank * B, B)
        t0 = time.perf_counter()
        step(x, y)
        dt = time.perf_counter() - t0
        times.append(dt)
        elapsed += dt
        if after_step is not None:
            after_step()
        if (s + 1) % every == 0 or s + 1 == steps:
            curve.append((s + 1, elapsed, evaluate()))
            if after_eval is not None:
                after_eval()
    sync_point()
    tx = loopback_tx_bytes() - tx0
    steady = times[2:] or times
    return {"step_s": statistics.median(steady), "curve": curve, "final_val": curve[-1][2],
            "train_s": elapsed,
            "loopback_bytes_per_step": (tx / world / steps if os.environ.get("PLAIT_BENCH_NETNS")
                                        else None)}


def drive(bench: str, args, argv: list[str], run_all) -> int:
    """A slow-network benchmark's entry: re-run inside a rate-limited namespace when a bandwidth is
    asked for (and this is not that run already), else run here and write --json."""
    if args.bandwidth != "none" and "PLAIT_BENCH_NETNS" not in os.environ:
        why = cannot(bench, args.bandwidth)
        if why:
            print(why, file=sys.stderr)
            return 2
        return run_in_namespace(bench, args.bandwidth, argv)
    out = run_all(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0
