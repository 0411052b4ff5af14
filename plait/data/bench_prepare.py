"""How fast `plait data prepare` is, beside a plain `tokenizers` loop, and what data costs a step.

    python -m plait.data.bench_prepare [INPUT...] [--reps 3] [--json out.json]

1. Preparation. A BPE is trained once (untimed, `train:VOCAB`; this run also warms the page
   cache), then, alternating and `--reps` times each: `plait data prepare` with that
   tokenizer.json (every stage: reading, split, encoding, shards, hashes, meta.json), and the
   peers: one process reading the same documents in the same order and calling `encode_batch`
   (and `encode_batch_fast`) on batches of about 1 MB with tokenizers' own threads on all cores,
   keeping each document's ids as a list. Medians of MB/s (input bytes) and tokens/s, and their
   ratios; also CPU seconds (this process, its threads and its finished workers), which a
   machine shared with other work disturbs less than wall time.
2. Training. Time to cut one step's batches (global batch x seq_len of the config, 10m preset
   defaults) from the memory-mapped shards of the prepared folder, beside the time of one
   training step of plait's Trainer on the same data (single process, CPU unless a GPU is
   there): the data's share of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from plait.data.prepare import add_arguments, cores
from plait.data.prepare import main as prepare_main
from plait.data.sources import discover, plan_tasks, read_documents


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its children that have been waited for."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _prepare(inputs: list[str], out: Path, extra: list[str]) -> tuple[float, dict]:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args([*inputs, "--out", str(out), "--no-progress", *extra])
    t0 = time.perf_counter()
    if prepare_main(args) != 0:
        raise SystemExit(f"bench: plait data prepare {' '.join(inputs)} failed")
    dt = time.perf_counter() - t0
    return dt, json.loads((out / "meta.json").read_text())


def _peer(inputs: list[str], tokenizer: Path, method: str) -> tuple[float, int]:
    """A plain loop: the same documents, one tokenizers call per ~1 MB, its threads on all cores."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    encode = getattr(tok, method)
    tasks = plan_tasks(discover(inputs), 1 << 30)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t0 = time.perf_counter()
    tokens, batch, size = 0, [], 0

    def flush():
        nonlocal tokens
        ids = [e.ids for e in encode(batch, add_special_tokens=False)]
        tokens += sum(len(i) + 1 for i in ids)  # + 1: the separator plait writes

    for task in tasks:
        for doc in read_documents(task, "text", lambda n: None):
            batch.append(doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc)
            size += len(batch[-1])
            if size >= 1 << 20:
                flush()
                batch, size = [], 0
    if batch:
        flush()
    return time.perf_counter() - t0, tokens


def bench_prepare(inputs: list[str], reps: int, vocab: int, workers: int, work: Path) -> dict:
    t, meta = _prepare(inputs, work / "trained", [f"--tokenizer=train:{vocab}", "--shard-mb=4"])
    tokenizer = work / "trained" / "tokenizer.json"
    total = meta["inputs"]["bytes"]
    print(f"bench: {total / 1e6:.1f} MB of input, tokenizer train:{vocab} (trained and prepared "
          f"once in {t:.1f} s, untimed)", flush=True)
    rows: dict[str, list[tuple[float, int, float]]] = {"plait": [], "encode_batch": [],
                                                       "encode_batch_fast": []}
    extra = [f"--tokenizer={tokenizer}", *([f"--workers={workers}"] if workers else [])]
    for rep in range(reps):
        order = list(rows) if rep % 2 == 0 else list(reversed(rows))
        for name in order:
            cpu = _cpu()
            if name == "plait":
                out = work / f"rep{rep}"
                dt, m = _prepare(inputs, out, extra)
                n = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
                shutil.rmtree(out)
            else:
                dt, n = _peer(inputs, tokenizer, name)
            cpu = _cpu() - cpu
            rows[name].append((dt, n, cpu))
            print(f"bench: rep {rep} {name:>17}: {dt:6.2f} s  {total / 1e6 / dt:5.2f} MB/s  "
                  f"{n / dt / 1e3:7.1f} k tokens/s  CPU {cpu:6.2f} s", flush=True)
    res = {"input_bytes": total, "vocab": vocab, "reps": reps,
           "cores": cores()}
    for name, runs in rows.items():
        med = statistics.median(r[0] for r in runs)
        res[name] = {"median_s": med, "mb_per_s": total / 1e6 / med,
                     "tokens_per_s": runs[0][1] / med, "tokens": runs[0][1],
                     "cpu_s": statistics.median(r[2] for r in runs),
                     "runs_s": [round(r[0], 3) for r in runs],
                     "runs_cpu_s": [round(r[2], 3) for r in runs]}
    for peer in ("encode_batch", "encode_batch_fast"):
        res[f"ratio_vs_{peer}"] = res[peer]["median_s"] / res["plait"]["median_s"]
        res[f"cpu_ratio_vs_{peer}"] = res[peer]["cpu_s"] / res["plait"]["cpu_s"]
    res["prepared"] = str(work / "trained")
    return res


def bench_training(folder: Path, cache: Path, steps: int) -> dict:
    """Data cost of one step (its micro-batches cut from the shards) against a whole step."""
    import numpy as np
    import torch

    from plait.config import load
    from plait.data import ChunkSampler, load_corpus, micro_batches
    from plait.mesh import Mesh

    try:
        from plait.train import Trainer
    except ImportError:  # the trainer's module before plait.train
        from plait.trainer import Trainer

    cfg = load(None, [f"data.path={folder}", f"data.cache_dir={cache}", "train.val_samples=0"])
    t = cfg.train
    corpus = load_corpus(cfg.data, cfg.model.vocab_size)
    def batches_s(tokens) -> float:
        sampler = ChunkSampler(tokens, t.seq_len, t.seed)
        times = []
        for i in range(200):
            t0 = time.perf_counter()
            for _ in micro_batches(sampler, i * t.global_batch, t.global_batch, t.micro_batch):
                pass
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    s = batches_s(corpus.train)
    # the same sampling from one in-memory array: what the shard view itself costs
    in_memory = batches_s(np.asarray(corpus.train[0: len(corpus.train)]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = Trainer(cfg, Mesh.single(device), corpus=corpus)
    step = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps pay one-off allocation
            step.append(time.perf_counter() - t0)
    st = statistics.median(step)
    return {"preset": cfg.model.preset, "global_batch": t.global_batch, "seq_len": t.seq_len,
            "device": device, "threads": torch.get_num_threads(), "sample_ms": s * 1e3,
            "sample_ms_in_memory": in_memory * 1e3, "step_ms": st * 1e3, "share": s / st,
            "train_shards": len(getattr(corpus.train, "parts", [corpus.train]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plait.data.bench_prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", default=["python:stdlib"], help="default python:stdlib")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=0, help="plait's workers (0: one per core)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plait-bench-prepare-") as d:
        work = Path(d)
        res = bench_prepare(args.inputs, args.reps, args.vocab, args.workers, work)
        res["training"] = bench_training(Path(res.pop("prepared")), work / "cache", args.steps)
    p, tr = res["plait"], res["training"]
    print(f"prepare: plait {p['mb_per_s']:.2f} MB/s {p['tokens_per_s'] / 1e3:.0f} k tokens/s; "
          f"ratio to encode_batch {res['ratio_vs_encode_batch']:.3f}, to encode_batch_fast "
          f"{res['ratio_vs_encode_batch_fast']:.3f} (target >= 0.9); CPU-time ratios "
          f"{res['cpu_ratio_vs_encode_batch']:.3f} / {res['cpu_ratio_vs_encode_batch_fast']:.3f}")
    print(f"training: one step's batches {tr['sample_ms']:.3f} ms ({tr['train_shards']} shards; "
          f"{tr['sample_ms_in_memory']:.3f} ms from one in-memory array) of a "
          f"{tr['step_ms']:.1f} ms {tr['preset']} step on {tr['device']} = "
          f"{100 * tr['share']:.3f}% (target < 1%)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
