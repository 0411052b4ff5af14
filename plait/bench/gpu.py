"""`plait bench gpu`: plait at world size 1 beside a plain PyTorch loop, one process, one GPU.

Both train the same GPT code with the same batch, bf16 autocast, fused AdamW and the same compile
setting (torch.compile of each block). plait runs its whole trainer step (data sampling from the
corpus, loss normalization, gradient clipping, LR schedule, metrics); the plain loop does
forward, backward, clip, step on a fixed batch. Repetitions alternate; each is timed with CUDA
synchronization around `--steps` steps after warm-up. Reported: tokens/s, MFU against the
device's bf16 peak, peak allocated memory, ratio plait / plain (above 1: plait is faster).

Two diagnostics per side explain a ratio below 1 without a profiler: `host_s`, the time the CPU
takes to enqueue one step when the device queue is empty (a step whose host time approaches its
device time is launch-bound, and every extra Python operation shows), and `syncs`, the
synchronizing CUDA calls one step makes (torch.cuda.set_sync_debug_mode), with where they come
from. A step that synchronizes lets the GPU idle while the CPU launches the next kernels.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings

import torch

# sequences per step at T = 1024. 350m at 8 was launch-bound on an H200 (the CPU's enqueue time,
# 57-61 ms, equalled the device step, so both sides' times followed CPU jitter: 55-67 ms); at 16 the
# device sets the pace
PRESET_BATCH = {"tiny": 8, "10m": 16, "124m": 16, "350m": 16, "1.3b": 4}


def _plain(cfg, batch, seq_len, compile_blocks, device):
    from plait.models import GPT, lm_loss

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if compile_blocks:
        for b in model.blocks:
            b.compile()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, seq_len + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(inp)
        loss = lm_loss(logits, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model


def _plait(preset, vocab, batch, seq_len, compile_blocks, device, data_path):
    from plait.config import from_dict
    from plait.mesh import Mesh
    from plait.train import Trainer
    from plait.train.metrics import Metrics

    cfg = from_dict({
        "model": {"preset": preset, "vocab_size": vocab},
        "data": {"path": data_path},
        "train": {"global_batch": batch, "micro_batch": batch, "seq_len": seq_len, "dtype": "bf16",
                  "compile": compile_blocks, "steps": 10**6, "val_samples": 0},
        "optim": {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant"},
    })
    tr = Trainer(cfg, Mesh.single(device))
    # `plait train`'s own loop body: the step guard's agreement, logging every train.log_every steps
    # (the host reads of loss, gradient norm and critical batch happen there), metrics, no files
    metrics = Metrics(None, total_steps=cfg.train.steps, log_every=cfg.train.log_every,
                      seq_len=seq_len, world=1, flops_per_token=tr.flops_per_token, peak_flops=1.0,
                      progress=False, tensorboard=False)
    return lambda: tr.step(metrics), tr


def _time(fn, steps, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def _host_time(fn, device) -> float:
    """Seconds the CPU spends enqueueing one step that starts on an idle device."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return dt


def _syncs(fn, device) -> list[str]:
    """The synchronizing CUDA calls of one step, as 'file:line: message' (empty: none)."""
    if device.type != "cuda":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch warns "called a synchronizing CUDA operation" per sync; its one-time notice that the
    # mode is a prototype also mentions synchronizing, and is not a sync
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:120]}" for w in caught
            if "called a synchronizing" in str(w.message)]


def bench_preset(preset: str, args, device: torch.device) -> dict:
    from plait.flops import peak_flops
    from plait.models import build_config, flops_per_token

    seq_len = args.seq_len
    batch = args.batch or PRESET_BATCH[preset]
    vocab = 50304
    cfg = build_config(preset, vocab_size=vocab, max_seq_len=max(seq_len, 1024))
    compile_blocks = not args.no_compile
    plain_step, plain_model = _plain(cfg, batch, seq_len, compile_blocks, device)
    plait_step, trainer = _plait(preset, vocab, batch, seq_len, compile_blocks, device, args.data)
    runs = {"plain": plain_step, "plait": plait_step}
    for fn in runs.values():  # warm-up: compilation, allocator, autotuning
        for _ in range(args.warmup):
            fn()
    diag = {name: {"host_s": statistics.median(_host_time(fn, device) for _ in range(3)),
                   "syncs": _syncs(fn, device)} for name, fn in runs.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            times[name].append(_time(fn, args.steps, device))
    tokens = batch * seq_len
    fpt = flops_per_token(cfg, seq_len)
    peak = peak_flops(device, "bf16")
    row = {"preset": preset, "batch": batch, "seq_len": seq_len, "compile": compile_blocks,
           "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "peak_flops": peak}
    for name in runs:
        med = statistics.median(times[name])
        row[f"{name}_step_s"] = med
        row[f"{name}_tokens_per_s"] = tokens / med
        row[f"{name}_mfu"] = fpt * tokens / med / peak
        row[f"{name}_times"] = times[name]
        row[f"{name}_host_s"] = diag[name]["host_s"]
        row[f"{name}_syncs"] = diag[name]["syncs"]
    row["ratio"] = row["plait_tokens_per_s"] / row["plain_tokens_per_s"]
    row["peak_memory_bytes_both_models"] = (torch.cuda.max_memory_allocated(device)
                                            if device.type == "cuda" else 0)
    del plain_model, trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_arguments(ap) -> None:
    """plait bench gpu: plait's training loop beside a plain PyTorch loop on one GPU."""
    ap.add_argument("--presets", default="124m,350m,1.3b",
                    help="model presets to run (tiny runs in seconds on CPU)")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0: per preset)")
    ap.add_argument("--seq-len", type=int, default=128, help="pass 1024 for the GPT-2 setting")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    ap.add_argument("--no-compile", action="store_true", help="eager mode")
    ap.add_argument("--data", default="",
                    help="data.path for plait's trainer (default corpus if empty)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print(f"plait bench gpu: no CUDA device here, so the presets {args.presets} run on the CPU"
              f"{'' if args.no_compile else ', compiled'} (minutes to hours for 124m and up); "
              f"`--presets tiny --no-compile` runs in seconds", flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for preset in args.presets.split(","):
        torch._dynamo.reset()  # each preset compiles for its own static shapes
        print(f"bench gpu: {preset} on {device} ({'compiled' if not args.no_compile else 'eager'})",
              flush=True)
        row = bench_preset(preset, args, device)
        rows.append(row)
        print(f"  plain {row['plain_tokens_per_s']:,.0f} tok/s (MFU "
              f"{100 * row['plain_mfu']:.1f}%)   plait {row['plait_tokens_per_s']:,.0f} tok/s (MFU "
              f"{100 * row['plait_mfu']:.1f}%)   ratio {row['ratio']:.3f}", flush=True)
        for name in ("plain", "plait"):
            print(f"  {name}: device step {1e3 * row[f'{name}_step_s']:.1f} ms, host enqueue "
                  f"{1e3 * row[f'{name}_host_s']:.1f} ms, {len(row[f'{name}_syncs'])} "
                  "synchronizing calls"
                  + "".join(f"\n    {w}" for w in row[f"{name}_syncs"][:8]), flush=True)
        if args.json:  # write as we go: a later preset may not fit the time or memory
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    return 0
