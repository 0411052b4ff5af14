"""Large-batch experiment: base global batch B against kB (k = 8, 32) at equal samples.

For each multiple k the run sees the same samples (same data order) as the base run, in 1/k of
the optimizer steps, with
  (a) AdamW at the base learning rate,
  (b) AdamW with the linear scaling rule (lr × k, optim.scale_lr_with_batch) and a longer warm-up,
  (c) LAMB (a few learning rates, the best one reported with the others listed).
Every run logs its training loss, learning rate and the gradient-noise-scale estimate
(`critical_batch`) per step, and the validation loss at the same sample counts.

    python scripts/large_batch.py run --out runs/large_batch          # train (GPU if present)
    python scripts/large_batch.py report runs/large_batch              # docs/large_batch.md + PNG

Large batches are formed by gradient accumulation on one process (the parity tests show that
data-parallel replicas compute the same run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from plait.config import DataConfig, from_dict
from plait.data import load_corpus
from plait.data.batching import samples_after
from plait.mesh import Mesh
from plait.optim import metric_value
from plait.train import Trainer


def plan(args) -> list[dict]:
    """The runs, most important first (a cut-short job still answers the 8B question)."""
    runs = [dict(name="base-adamw", k=1, optim="adamw", lr=args.lr, warmup=args.warmup)]
    for k in args.multiples:
        runs += [
            dict(name=f"{k}x-a-adamw-same-lr", k=k, optim="adamw", lr=args.lr, warmup=args.warmup),
            dict(name=f"{k}x-b-adamw-scaled", k=k, optim="adamw", lr=args.lr,
                 warmup=args.warmup_scaled, scale=True)]
        runs += [
            dict(name=f"{k}x-c-lamb-lr{lr:g}", k=k, optim="lamb", lr=lr, warmup=args.warmup_scaled)
            for lr in args.lamb_lrs]
    if args.sqrt_rule:  # not one of (a)-(c): Adam's square-root rule, run last, when time is left
        runs += [dict(name=f"{k}x-b2-adamw-sqrt", k=k, optim="adamw", lr=args.lr * math.sqrt(k),
                      warmup=args.warmup_scaled) for k in args.multiples]
    # (b) and (c) again with the global batch ramped up from one micro-batch (more steps)
    if args.rampup:
        for k in args.multiples:
            runs += [dict(name=f"{k}x-d-adamw-scaled-rampup", k=k, optim="adamw", lr=args.lr,
                          warmup=args.warmup_scaled, scale=True, rampup=args.rampup),
                     dict(name=f"{k}x-e-lamb-lr{args.rampup_lamb_lr:g}-rampup", k=k, optim="lamb",
                          lr=args.rampup_lamb_lr, warmup=args.warmup_scaled, rampup=args.rampup)]
    return runs


def one_run(spec: dict, args, corpus, device: str) -> dict:
    batch = args.base_batch * spec["k"]
    micro = min(args.micro, batch)
    ramp = int(spec.get("rampup", 0.0) * args.samples)
    # enough steps to see every sample of the budget (a ramp-up's small batches take more)
    steps = 0
    while samples_after(steps, batch, micro, ramp) < args.samples:
        steps += 1
    warmup = max(1, round(spec["warmup"] * steps))
    optim = {"name": spec["optim"], "lr": spec["lr"], "warmup_steps": warmup, "schedule": "cosine",
             "weight_decay": 0.1, "grad_clip": 1.0}
    if spec.get("scale"):
        optim.update(scale_lr_with_batch=True, reference_batch=args.base_batch)
    cfg = from_dict({
        "model": {"preset": args.preset, "n_layers": args.n_layers, "d_model": args.d_model,
                  "n_heads": args.n_heads},
        "train": {"steps": steps, "global_batch": batch, "micro_batch": micro,
                  "batch_rampup_samples": ramp, "seq_len": args.seq_len,
                  "val_samples": args.val_samples, "seed": args.seed,
                  "dtype": args.dtype, "device": "cuda" if device.startswith("cuda") else "cpu"},
        "optim": optim,
        "log": {"progress": False, "plots": False},
    })
    tr = Trainer(cfg, Mesh.single(device), corpus=corpus)
    evals = max(1, args.evals)
    # equal sample counts across runs
    eval_at = [args.samples * (i + 1) // evals for i in range(evals)]
    recs, vals = [], [{"step": 0, "samples": 0, "val_loss": tr.evaluate()}]
    t0 = time.perf_counter()
    for _ in range(steps):
        out = tr.train_step()
        recs.append({"step": tr.state.step, "samples": tr.state.samples, "loss": float(out["loss"]),
                     "lr": out["lr"], "critical_batch": metric_value(out.get("critical_batch"))})
        if not math.isfinite(recs[-1]["loss"]):
            break
        if eval_at and tr.state.samples >= eval_at[0]:
            del eval_at[0]
            vals.append(
                {"step": tr.state.step, "samples": tr.state.samples, "val_loss": tr.evaluate()})
    wall = time.perf_counter() - t0
    res = {**spec, "batch": batch, "steps": steps, "warmup_steps": warmup,
           "micro_batch": cfg.train.micro_batch,
           "peak_lr": spec["lr"] * (spec["k"] if spec.get("scale") else 1),
           "records": recs, "evals": vals,
           "final_val_loss": (vals[-1]["val_loss"] if recs and math.isfinite(recs[-1]["loss"])
                              else float("nan")),
           "wall_s": wall, "params": tr.n_params, "samples": tr.state.samples,
           "rampup_samples": ramp}
    print(f"{spec['name']}: batch {batch}, {steps} steps, final val {res['final_val_loss']:.4f}, "
          f"{wall:.1f} s", flush=True)
    return res


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    corpus = load_corpus(DataConfig(path=args.data))
    call = {"command": "python " + " ".join(sys.argv), "args": vars(args)}
    # more runs into the same folder (e.g. --only ...): keep every command
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        meta["invocations"] = _invocations(meta) + [call]
    else:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "corpus": corpus.source, "invocations": [call]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    t_start = time.perf_counter()
    for spec in plan(args):
        if args.only and spec["name"] not in args.only:
            continue
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"time budget spent: {spec['name']} and later runs skipped", flush=True)
            break
        res = one_run(spec, args, corpus, device)
        (out / f"{spec['name']}.json").write_text(json.dumps(res))


# -- report ------------------------------------------------------------------------------------
def report(args) -> None:
    """One section per run folder: setup, table, plot,
    and the 8B / 32B target against the base run."""
    lines = ["# Large-batch training: measured", "",
             "Generated by `python scripts/large_batch.py report " + " ".join(args.dirs) + "` from "
             "the runs' JSON; each section gives the command that trained it.", ""]
    for i, d in enumerate(args.dirs):
        title = args.titles[i] if i < len(args.titles) else Path(d).name
        png = Path(args.png_dir) / f"large_batch_{i + 1}.png"
        lines += section(Path(d), title, png)
    md = Path(args.md)
    # the hand-written interpretation below the generated sections survives a regeneration
    old = md.read_text() if md.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    md.write_text("\n".join(lines) + "\n" + notes)
    print(f"wrote {args.md}")


NOTES = "## Reading the numbers"


def section(src: Path, title: str, png: Path) -> list[str]:
    meta = json.loads((src / "meta.json").read_text())
    calls = _invocations(meta)
    defaults = {"sqrt_rule": 0, "n_layers": 0, "d_model": 0, "n_heads": 0, "rampup": 0.0,
                "rampup_lamb_lr": 0.05}
    planned = []
    for c in calls:
        ca = {**defaults, **c["args"]}
        planned += [s["name"] for s in plan(argparse.Namespace(**ca))
                    if (not ca.get("only") or s["name"] in ca["only"]) and s["name"] not in planned]
    a = {**defaults, **calls[0]["args"]}
    runs = [json.loads(p.read_text()) for p in sorted(src.glob("*.json")) if p.name != "meta.json"]
    base = next(r for r in runs if r["name"] == "base-adamw")
    order = {n: i for i, n in enumerate(planned)}
    runs.sort(key=lambda r: order.get(r["name"], 99))
    best = {}  # the best LAMB learning rate of each multiple (the plot shows only that one)
    for r in runs:
        if r["optim"] == "lamb" and not r.get("rampup") and math.isfinite(r["final_val_loss"]):
            if r["k"] not in best or r["final_val_loss"] < best[r["k"]]["final_val_loss"]:
                best[r["k"]] = r
    plot([r for r in runs if r["optim"] != "lamb" or r.get("rampup") or best.get(r["k"]) is r], png)
    b0 = base["final_val_loss"]
    lines = [
        f"## {title}", "",
        f"Date {meta['date']}, device {meta['device']}, torch {meta['torch']}, corpus: "
        f"{meta['corpus']}.", "",
        "```", *[c["command"] for c in calls], "```", "",
        f"Model preset `{a['preset']}`{_overrides(a)} ({base['params'] / 1e6:.2f}M parameters), "
        f"sequence length {a['seq_len']}, {a['dtype']}, base global batch B = {a['base_batch']} "
        f"sequences, micro-batch {a['micro']}, every run {a['samples']} samples "
        f"({a['samples'] * a['seq_len'] / 1e6:.1f}M tokens) in the same order, cosine decay to "
        "0.1× after a linear warm-up, weight decay 0.1, clip 1.0. Validation loss (nats/byte) on "
        f"{a['val_samples']} held-out sequences. critical_batch: the smoothed B_simple estimate "
        "(sequences) at the end of the run.", "",
        "| run | global batch | samples | steps | warm-up steps | peak lr | final val loss | "
        "vs base | critical_batch (end) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        crit = next((x["critical_batch"] for x in reversed(r["records"])
                     if x["critical_batch"] is not None), None)
        v = r["final_val_loss"]
        rel = f"{100 * (v / b0 - 1):+.1f}%" if math.isfinite(v) else "diverged"
        ramp = f" (ramp-up over {r['rampup_samples']})" if r.get("rampup_samples") else ""
        lines.append(f"| {r['name']} | {r['batch']}{ramp} | {r.get('samples', a['samples'])} | "
                     f"{r['steps']} | {r['warmup_steps']} | {r['peak_lr']:g} | {v:.4f} | {rel} | "
                     f"{'' if crit is None else f'{crit:.0f}'} | {r['wall_s']:.0f} |")
    missing = [n for n in planned if n not in {r["name"] for r in runs}]
    if missing:
        lines += ["", "Planned but not run (the job's --time-budget ran out first): "
                      f"{', '.join(missing)}."]
    lines += ["", "![validation loss against samples and steps; critical_batch against "
                  f"samples]({png.name})", "",
              "Target (at equal samples, (b) or (c) within 3% of the base run's final validation "
              "loss in 1/k of the steps):", ""]
    for k in a["multiples"]:
        cands = [r for r in runs if r["k"] == k and (r.get("scale") or r["optim"] == "lamb")
                 and not r.get("rampup") and math.isfinite(r["final_val_loss"])]
        if not cands:
            lines.append(f"- {k}B: no finished run with the scaling rule or LAMB.")
            continue
        r = min(cands, key=lambda x: x["final_val_loss"])
        gap = 100 * (r["final_val_loss"] / b0 - 1)
        lines.append(f"- {k}B: best of (b)/(c) is {r['name']}, {r['final_val_loss']:.4f} against "
                     f"{b0:.4f} ({gap:+.1f}%) in {r['steps']} steps instead of {base['steps']}: "
                     f"{'met' if gap <= 3.0 else 'missed'}.")
        for r in runs:
            if r["k"] == k and r.get("rampup") and math.isfinite(r["final_val_loss"]):
                lines.append(f"- {k}B with ramp-up (not 1/{k} of the steps): {r['name']}, "
                             f"{r['final_val_loss']:.4f} "
                             f"({100 * (r['final_val_loss'] / b0 - 1):+.1f}%) in {r['steps']} "
                             "steps.")
    return lines + [""]


def _invocations(meta: dict) -> list[dict]:
    return meta.get("invocations") or [{"command": meta["command"], "args": meta["args"]}]


def _overrides(a: dict) -> str:
    over = [f"{k}={a[k]}" for k in ("n_layers", "d_model", "n_heads") if a.get(k)]
    return f" with {', '.join(over)}" if over else ""


def plot(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.cm.tab20.colors
    for i, r in enumerate(runs):
        ev = [e for e in r["evals"] if e["val_loss"] is not None and math.isfinite(e["val_loss"])]
        style = {"adamw": "-", "lamb": "--"}[r["optim"]]
        label = f"{r['name']} (B={r['batch']})"
        (line,) = axes[0].plot([e["samples"] for e in ev], [e["val_loss"] for e in ev], style,
                               marker=".", label=label,
                               color=colors[2 * i % 20 + (2 * i // 20) % 2])
        axes[1].plot([e["step"] for e in ev if e["step"]], [e["val_loss"] for e in ev if e["step"]],
                     style, marker=".",
                     color=line.get_color())  # step 0 has no place on the log axis
        crit = [(x["samples"], x["critical_batch"]) for x in r["records"]
                if x["critical_batch"] is not None]
        if crit:
            axes[2].plot(*zip(*crit), style, color=line.get_color(), label=label)
    axes[0].set_xlabel("samples")
    axes[1].set_xlabel("optimizer steps")
    axes[1].set_xscale("log")
    for a in axes[:2]:
        a.set_ylabel("validation loss (nats/byte)")
        a.grid(alpha=0.3)
    axes[2].set_xlabel("samples")
    axes[2].set_ylabel("critical_batch estimate (B_simple, sequences)")
    axes[2].set_yscale("log")
    axes[2].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="runs/large_batch")
    r.add_argument("--preset", default="10m")
    r.add_argument("--n-layers", type=int, default=0, help="0: the preset's")
    r.add_argument("--d-model", type=int, default=0, help="0: the preset's")
    r.add_argument("--n-heads", type=int, default=0, help="0: the preset's")
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--base-batch", type=int, default=32)
    r.add_argument("--micro", type=int, default=16)
    r.add_argument("--samples", type=int, default=65536,
                   help="samples per run (all runs see the same ones)")
    r.add_argument("--multiples", type=int, nargs="+", default=[8, 32])
    r.add_argument("--lr", type=float, default=1e-3, help="base AdamW learning rate")
    # LAMB's step is lr × ‖w‖ per layer: with weights of rms ~0.02, lr 0.05 moves them about as far
    # as Adam's lr 1e-3 does
    r.add_argument("--lamb-lrs", type=float, nargs="+", default=[0.025, 0.05, 0.1])
    r.add_argument("--sqrt-rule", type=int, default=1,
                   help="also run AdamW with lr × sqrt(k), last")
    r.add_argument("--rampup", type=float, default=0.0,
                   help="also run (b) and LAMB with a batch ramp-up over this fraction of the "
                        "samples, last")
    r.add_argument("--rampup-lamb-lr", type=float, default=0.05)
    r.add_argument("--warmup", type=float, default=0.02,
                   help="warm-up, fraction of steps, (a) and the base run")
    r.add_argument("--warmup-scaled", type=float, default=0.1,
                   help="warm-up fraction for (b) and (c)")
    r.add_argument("--val-samples", type=int, default=256)
    r.add_argument("--evals", type=int, default=16)
    r.add_argument("--dtype", default="bf16")
    r.add_argument("--seed", type=int, default=1337)
    r.add_argument("--data", default="", help="corpus path (default: the Python standard library)")
    r.add_argument("--only", nargs="*", default=[])
    r.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; later runs are skipped past it")
    r.add_argument("--cpu", action="store_true")
    r.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("report")
    q.add_argument("dirs", nargs="+", help="run folders, one section each")
    q.add_argument("--titles", nargs="*", default=[])
    q.add_argument("--md", default="docs/large_batch.md")
    q.add_argument("--png-dir", default="docs", help="PNGs large_batch_1.png, ... go here")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
