"""`plait bench hf`: plait's tensor parallelism beside transformers' own, on a transformers Llama.

The model: a `LlamaForCausalLM` of the flags' sizes (plait.models.hf.tiny_config), initialized
from seed 0 and written by `save_pretrained` to a temporary directory (or `--model-dir`), so both
sides load identical weights from the same files. The same batch on every rank and every step,
fp32, AdamW with the same hyperparameters on both sides, no clipping, one thread per rank.

plait: `build_for_training(DIR)` + `parallelize()` with parallel.tp = n (what `plait train
model.hf=DIR parallel.tp=n` builds: Megatron regions, vocab-parallel embedding, head and loss);
a step is `train_step`, `optimizer.step()`, `zero_grad()`. transformers:
`from_pretrained(DIR, distributed_config=DistributedConfig(tp_size=n))` (its own plan on DTensor;
the head's logits gathered, `colwise_gather_output`; it needs `accelerate`), a step is its
forward, `F.cross_entropy` on the logits, backward, AdamW step, `zero_grad`. A third run, for
reference (`--no-sharded-head` leaves it out): transformers with the head's rule overridden to
`colwise` (logits left sharded) and torch's `loss_parallel` cross-entropy.

All sides run in the same n processes. After one untimed warm-up step each (its losses must
agree), one step each runs under a dispatch-mode counter (plait.bench.hf_worker.CountOps):
bytes per step per rank of every collective by plait's formulas (all-reduce 2(n−1)/n·size,
all-gather (n−1)/n·whole, ...) and as gloo sends them, the number of collectives, local ops and
DTensor ops. Then `--reps` repetitions of `--steps` timed steps alternate the sides, the order
reversed every other repetition; reported: the median over repetitions of each side's mean step
time (wall clock, and rank 0's CPU time, which waits and descheduling do not inflate), ratio =
plait / transformers of the medians (below 1: plait is faster) and the median of the repetitions'
paired ratios. Last, `--phase-steps` steps per side time forward, loss, backward and optimizer
apart, and `--profile TOP` runs one step per side under torch.profiler.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile

import torch


def model_config(args):
    """The transformers Llama config of the flags."""
    from plait.models.hf import tiny_config

    return tiny_config("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=max(256, args.seq_len))


def write_model(args, path: str) -> int:
    """The model of the flags, initialized from seed 0, saved to `path`; its parameter count."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(model_config(args), dtype=torch.float32)
    lm.save_pretrained(path)
    return sum(p.numel() for p in lm.parameters())


def add_arguments(ap) -> None:
    """plait bench hf: plait's tensor parallelism beside transformers' on a transformers Llama."""
    ap.add_argument("--ranks", default="2", help="comma-separated tp sizes (the world size)")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions per tp size")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    ap.add_argument("--phase-steps", type=int, default=8,
                    help="steps per side timed phase by phase, after the repetitions")
    ap.add_argument("--profile", type=int, default=15, metavar="TOP",
                    help="profile one more step per side (torch.profiler) and keep its TOP ops "
                         "by self CPU time; 0: no profile")
    ap.add_argument("--no-sharded-head", dest="sharded_head", action="store_false",
                    help="leave out the third run: transformers with its head's logits kept "
                         "sharded (tp_plan lm_head = colwise) and torch's loss_parallel")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (every rank)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768, help="intermediate_size")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--model-dir", default=None,
                    help="write the model here (kept) instead of a temporary directory")
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def _missing() -> str | None:
    """Why transformers' side cannot run here, or None."""
    import importlib.util

    for name, why in (("transformers", "the model"),
                      ("accelerate", "transformers' from_pretrained with a tensor-parallel plan "
                                     "(its check_and_set_device_map refuses without it)")):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed ({why}); install plait's `hf` extra: pip install " \
                   f"-e '.[hf]'"
    return None


def _load() -> float:
    """The 1-minute load average (nan where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


LABELS = {"plait": "plait", "hf": "transformers", "hf_sharded": "transformers, sharded logits"}


def _print_row(r: dict) -> None:
    from plait.train.metrics import human_bytes

    ms = lambda s: f"{s * 1e3:8.1f} ms/step"  # noqa: E731
    print(f"  plait {ms(r['plait_step_s'])}   transformers {ms(r['hf_step_s'])}   ratio "
          f"{r['ratio']:.3f} (paired {r['paired_ratio']:.3f})", flush=True)
    print(f"  CPU time of rank 0: plait {ms(r['plait_cpu_s'])}   transformers "
          f"{ms(r['hf_cpu_s'])}   ratio {r['cpu_ratio']:.3f}")
    if (a := r.get("hf_sharded")) is not None:
        print(f"  transformers with sharded logits (loss_parallel) {ms(a['step_s'])}, CPU "
              f"{ms(a['cpu_s'])}: plait / it {a['ratio']:.3f} (paired {a['paired_ratio']:.3f}, "
              f"CPU {a['cpu_ratio']:.3f}); first loss rel. diff {a['first_loss_rel_diff']:.1e}")
    for k, c in r["counted"].items():
        print(f"  {LABELS[k]}: {human_bytes(c['formula_bytes'])}/step/rank by formula "
              f"({human_bytes(c['wire_bytes'])} as gloo sends it), collectives "
              f"{c['collectives']}, {c['local_ops']} local ops, {c['dtensor_ops']} through DTensor")
    for k, d in r["phases_median_s"].items():
        ph = "  ".join(f"{n} {d[n] * 1e3:.1f} ({d[n + '_cpu'] * 1e3:.1f})"
                       for n in ("forward", "loss", "backward", "optimizer"))
        print(f"  phases ms, wall (CPU), {LABELS[k]}: {ph}")
    for k, pr in r["profile"].items():
        top = ", ".join(f"{t['op']} {t['count']}× {t['self_s'] * 1e3:.1f}" for t in pr["top"][:6])
        print(f"  profile, {LABELS[k]}: {pr['events']} events, {pr['wall_s'] * 1e3:.1f} ms; top "
              f"self ms: {top}")
    f = r["first_loss"]
    print(f"  first loss plait {f['plait']:.6f} transformers {f['hf']:.6f} (rel. diff "
          f"{r['first_loss_rel_diff']:.1e}: {'same' if r['same_loss'] else 'DIFFERENT'}); last "
          f"plait {r['final_loss']['plait']:.6f} transformers {r['final_loss']['hf']:.6f} "
          f"(rel. diff {r['final_loss_rel_diff']:.1e})", flush=True)


def main(args) -> int:
    from plait.bench.hf_worker import worker
    from plait.testing import run_ranks

    if (why := _missing()) is not None:
        raise SystemExit(f"plait bench hf: {why}")
    import accelerate
    import transformers

    sizes = [int(r) for r in str(args.ranks).split(",") if r]
    tmp = None if args.model_dir else tempfile.mkdtemp(prefix="plait-bench-hf-")
    model_dir = args.model_dir or tmp
    rows = []
    try:
        n_params = write_model(args, model_dir)
        adamw = {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}
        for tp in sizes:
            opts = {"tp": tp, "dir": model_dir, "vocab": args.vocab, "batch": args.batch,
                    "seq_len": args.seq_len, "reps": args.reps, "steps": args.steps,
                    "phase_steps": args.phase_steps, "adamw": adamw,
                    "profile": args.profile > 0, "profile_top": args.profile,
                    "sharded_head": args.sharded_head}
            print(f"bench hf: tp={tp} gloo ranks, Llama {n_params / 1e6:.1f}M parameters (hidden "
                  f"{args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, ffn "
                  f"{args.ffn}, vocab {args.vocab}), {args.batch}×{args.seq_len} tokens (the same "
                  f"on every rank), {args.reps} alternating reps × {args.steps} steps, "
                  f"{args.threads} thread(s) per rank, load average {_load():.2f}", flush=True)
            load_before = _load()
            res = run_ranks(worker, tp, args=(opts,), timeout=3600, threads=args.threads)[0]
            res.update(model=model_config(args).to_dict() | {"parameters": n_params},
                       batch=args.batch, seq_len=args.seq_len, reps=args.reps, steps=args.steps,
                       adamw=adamw, threads_per_rank=args.threads, torch=torch.__version__,
                       transformers=transformers.__version__, python=platform.python_version(),
                       load_avg_1min=[load_before, _load()],
                       accelerate=accelerate.__version__,
                       same_loss=max(res["first_loss_rel_diff"], res.get("hf_sharded", {}).get(
                           "first_loss_rel_diff", 0.0)) <= 1e-5)
            rows.append(res)
            _print_row(res)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0 if all(r["same_loss"] for r in rows) else 1
