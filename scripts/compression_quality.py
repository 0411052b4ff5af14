"""Quality of compressed data parallelism: final validation loss per compressor,
same steps and seeds.

    # 4 dp ranks, small GPT, docs/
    .venv/bin/python scripts/compression_quality.py
    # smoke
    .venv/bin/python scripts/compression_quality.py --preset tiny --steps 4 --out-dir /tmp/q

Every configuration trains the same GPT from the same weights on the same samples (plait's
Trainer, `--ranks` data-parallel ranks, gloo): uncompressed, fp16, bf16, int8, top-k, sign,
PowerSGD, and 1-bit Adam; the biased ones with and without error feedback (the ablation).
Writes OUT_DIR/compression_quality.json (curves and finals), OUT_DIR/compression_quality.png
(validation and training loss curves) and prints a Markdown table with each configuration's
final validation loss, its gap to the uncompressed run and the target it is held to:
fp16 / bf16 within 0.5%, PowerSGD within 3%, top-k and sign (with error feedback) within 5%;
without error feedback the biased compressors should end measurably worse than with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# tag: (overrides, target gap to uncompressed or None, its error-feedback twin or None)
CONFIGS: dict[str, tuple[dict, float | None, str | None]] = {
    "none": ({"compression": {"name": "none"}}, None, None),
    "fp16": ({"compression": {"name": "fp16"}}, 0.005, None),
    "bf16": ({"compression": {"name": "bf16"}}, 0.005, None),
    "int8": ({"compression": {"name": "int8"}}, None, None),
    "powersgd": ({"compression": {"name": "powersgd", "rank": 4}}, 0.03, None),
    "topk": ({"compression": {"name": "topk", "topk_fraction": 0.01}}, 0.05, None),
    "sign": ({"compression": {"name": "sign"}}, 0.05, None),
    "onebit_adam": ({"optim": {"name": "onebit_adam"}}, None, None),
    "int8_no_ef": ({"compression": {"name": "int8", "error_feedback": False}}, None, "int8"),
    "powersgd_no_ef": ({"compression": {"name": "powersgd", "rank": 4, "error_feedback": False}},
                       None, "powersgd"),
    "topk_no_ef": ({"compression": {"name": "topk", "topk_fraction": 0.01,
                                    "error_feedback": False}}, None, "topk"),
    "sign_no_ef": ({"compression": {"name": "sign", "error_feedback": False}}, None, "sign"),
    "onebit_adam_no_ef": ({"optim": {"name": "onebit_adam"},
                           "compression": {"error_feedback": False}}, None, "onebit_adam"),
}


def _train(cfg_dict: dict) -> dict:
    """One rank's run: training loss every step, validation loss every val_every steps."""
    from plait.config import from_dict
    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, Mesh.build(dp=cfg.parallel.dp, device="cpu"))
    train, val, bytes_ = [], [], []
    t0 = time.perf_counter()
    for _ in range(cfg.train.steps):
        train.append(float(tr.train_step()["loss"]))
        bytes_.append(tr.mesh.comm.stats.reset_step()["comm_bytes"])
        if tr.state.step % cfg.train.val_every == 0 or tr.state.step == cfg.train.steps:
            val.append((tr.state.step, tr.evaluate()))
            tr.mesh.comm.stats.reset_step()
    return {"train": train, "val": val, "final_val": val[-1][1], "wall_s": time.perf_counter() - t0,
            "comm_bytes_per_step": sum(bytes_) / len(bytes_)}


def base_config(args) -> dict:
    return {
        "model": {"preset": args.preset},
        "parallel": {"dp": args.ranks},
        "train": {"steps": args.steps, "global_batch": args.global_batch,
                  "micro_batch": args.micro_batch, "seq_len": args.seq_len, "seed": args.seed,
                  "val_every": max(1, args.steps // 20), "val_samples": args.val_samples,
                  "threads": max(1, (os.cpu_count() or 1) // args.ranks)},
        "compression": {"warmup_steps": max(1, args.steps // 10)},
        "log": {"progress": False, "plots": False},
        # the 1-bit Adam configurations set optim.name themselves
        "optim": {"name": args.optim, **({"lr": args.lr} if args.lr else {})},
    }


def merged(base: dict, over: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for sec, body in over.items():
        out.setdefault(sec, {}).update(body)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ablation = {t for t, (_, _, twin) in CONFIGS.items() if twin}
    for tag, r in results.items():
        style = "--" if tag in ablation else "-"
        steps, vals = zip(*r["val"])
        ax = axes[1] if tag in ablation else axes[0]
        ax.plot(steps, vals, style, label=tag)
        if tag in ablation:  # its twin with error feedback beside it
            twin = CONFIGS[tag][2]
            if twin in results:
                s2, v2 = zip(*results[twin]["val"])
                axes[1].plot(s2, v2, "-", label=twin, alpha=0.6)
        k = max(1, len(r["train"]) // 50)  # a moving average of the training loss
        sm = [sum(r["train"][i: i + k]) / len(r["train"][i: i + k])
              for i in range(0, len(r["train"]), k)]
        axes[2].plot([i + k for i in range(0, len(r["train"]), k)], sm, style, label=tag,
                     linewidth=1)
    for ax, title in zip(axes, ("validation loss", "error-feedback ablation (dashed: off)",
                                "training loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    base = results["none"]["final_val"] if "none" in results else None
    lines = ["| configuration | final val loss | vs none | target | met | bytes/step/rank |",
             "|---|---|---|---|---|---|"]
    for tag, r in results.items():
        over, target, twin = CONFIGS[tag]
        gap = (r["final_val"] - base) / base if base else None
        met = "-"
        if target is not None and gap is not None:
            met = "yes" if gap <= target else "no"
        if twin and twin in results:
            worse = r["final_val"] - results[twin]["final_val"]
            met = f"{'worse' if worse > 0 else 'not worse'} than with feedback by {worse:+.4f}"
        gap_s = f"{gap * 100:+.2f}%" if gap is not None else "-"
        tgt = f"≤ {target * 100:.1f}%" if target is not None else ("ablation" if twin else "-")
        lines.append(f"| {tag} | {r['final_val']:.4f} | {gap_s} | {tgt} | {met} | "
                     f"{r['comm_bytes_per_step']:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--preset", default="10m")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--optim", default="adamw", choices=["adamw", "sgd", "lamb", "lars"],
                    help="the optimizer of every configuration but 1-bit Adam's "
                         "(sgd: momentum 0.9)")
    ap.add_argument("--lr", type=float, default=0.0, help="optim.lr (default: the config default)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--out-dir", default="docs")
    args = ap.parse_args()
    from plait.testing import run_ranks

    tags = [t.strip() for t in args.configs.split(",") if t.strip()]
    unknown = [t for t in tags if t not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    base = base_config(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for tag in tags:
        cfg = merged(base, CONFIGS[tag][0])
        r = run_ranks(_train, args.ranks, args=(cfg,), timeout=3600.0 * 6,
                      threads=cfg["train"]["threads"])[0]
        results[tag] = r
        print(f"{tag:>18}: final val {r['final_val']:.4f}, {r['comm_bytes_per_step']:,.0f} "
              f"B/step/rank, {r['wall_s']:.0f} s", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "machine": f"{platform.node()}, {os.cpu_count()} cores", "command": " ".join(sys.argv),
            "config": base}
    (out_dir / "compression_quality.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out_dir / "compression_quality.png")
    print()
    print(table(results))
    print(f"\nwrote {out_dir / 'compression_quality.json'} and "
          f"{out_dir / 'compression_quality.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
