"""Command line: `plait train`, `plait data prepare`, `plait plan`, `plait bench`, `plait export`,
`plait report`.

`plait train` run by hand is the launcher: it validates the config, picks the run folder, then
either trains in this process (one rank) or starts the workers through torch's elastic launcher
(torch.distributed.run), which re-enters here as `python -m plait train ...` with RANK set.
Under torchrun (RANK in the environment) it is a worker and trains directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from plait.bench import BENCHMARKS
from plait.data import prepare as data_prepare
from plait.errors import ConfigError
from plait.planner import cli as planner_cli


def _is_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ
                                                   and "WORLD_SIZE" in os.environ)


def default_nproc(cfg) -> int:
    import torch

    p = cfg.parallel
    if p.dp > 0:
        return p.replicas * p.dp * p.tp * p.pp
    machine = (torch.cuda.device_count() if torch.cuda.is_available()
               else min(2, os.cpu_count() or 1))
    mp = p.replicas * p.tp * p.pp
    return mp * max(1, machine // mp)


def cmd_train(args) -> int:
    from plait.config import load, split_args, validate_layout

    config_path, overrides = split_args(args.rest)
    cfg = load(config_path, overrides)
    if _is_worker():
        from plait.train import train

        if cfg.parallel.auto:  # started under torchrun by hand: every worker makes the same plan
            cfg = _plan_in_worker(cfg, args)
        train(cfg, args.run_dir)
        return 0
    nproc = args.nproc or default_nproc(cfg)
    world = nproc * (args.nnodes if isinstance(args.nnodes, int) else 1)
    planned, plan = [], None
    if cfg.parallel.auto:
        from plait.planner.auto import resolve

        cfg, planned, plan = resolve(cfg, world, args.cluster, nnodes=args.nnodes)
    validate_layout(cfg, world)
    from plait.train.model_setup import preflight

    preflight(cfg)  # the model-dependent checks, before the launcher starts anyone
    run_dir = args.run_dir or cfg.log.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    from plait.train.metrics import prepare_run_dir

    prepare_run_dir(Path(run_dir), create=False,
                    checkpoints=Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None)
    if plan is not None:  # summary.json puts the prediction beside the measurement
        from plait.planner.auto import write_plan

        write_plan(Path(run_dir), plan)
    if nproc == 1 and args.nnodes == 1 and not args.max_restarts:  # restarts need the elastic agent
        from plait.train import train

        train(cfg, run_dir)
        return 0
    from plait.launch import launch

    # options before the positionals: argparse takes no positionals after an option once
    # `rest` has matched
    worker_args = (["train", "--run-dir", run_dir] + ([config_path] if config_path else [])
                   + overrides + planned)
    return launch(worker_args, nproc=nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                  rdzv_backend=args.rdzv_backend, rdzv_endpoint=args.rdzv_endpoint,
                  rdzv_id=args.rdzv_id, max_restarts=args.max_restarts)


def _plan_in_worker(cfg, args):
    from plait.planner.auto import resolve, write_plan

    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    lead = os.environ.get("RANK", "0") == "0"
    cfg, _, plan = resolve(cfg, world, args.cluster, nnodes=max(1, world // max(1, local)),
                           log=print if lead else (lambda *a: None))
    run_dir = args.run_dir or cfg.log.run_dir
    if lead and run_dir:
        write_plan(Path(run_dir), plan)
    return cfg


def cmd_export(args) -> int:
    if args.format == "hf":  # a transformers directory: model knowledge, under plait.models
        from plait.models.hf_export import export_hf

        written = export_hf(args.checkpoint, args.out, args.max_shard_size or "5GB",
                            args.source or None)
    else:
        from plait.checkpoint import export_safetensors

        if args.source or args.max_shard_size:
            raise ConfigError("--source and --max-shard-size apply to --format hf only")
        written = export_safetensors(args.checkpoint, args.out)
    for out in written:
        print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    import json

    from plait.train.metrics import human, plot_run

    run = Path(args.run_dir)
    outs = plot_run(run)
    summ = run / "summary.json"
    if summ.exists():
        s = json.loads(summ.read_text())
        for k in ("final_train_loss", "final_val_loss", "steps", "tokens", "tokens_per_s", "mfu",
                  "comm_bytes_per_step", "peak_memory_bytes", "wall_s", "layout"):
            print(f"{k:>22}: {human(k, s.get(k))}")
    for o in outs:
        print(f"wrote {o}")
    return 0


def cmd_data_prepare(args) -> int:
    return data_prepare.main(args)


def cmd_bench(args) -> int:
    from plait.bench import run_bench

    return run_bench(args.what, args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plait",
                                 description="Distributed training of PyTorch models.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train",
                        help="train a model (config file and/or section.key=value overrides)")
    tr.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
    tr.add_argument("--nproc", type=int, default=0,
                    help="worker processes on this node (default: what the "
                    "layout needs, else one per GPU, else 2 on CPU)")
    tr.add_argument("--run-dir", default=None, help="run folder (default runs/<date>-<time>)")
    tr.add_argument("--nnodes", type=int, default=1)
    tr.add_argument("--node-rank", type=int, default=0)
    tr.add_argument("--rdzv-backend", default="c10d")
    tr.add_argument("--rdzv-endpoint", default="")
    tr.add_argument("--rdzv-id", default="plait")
    tr.add_argument("--max-restarts", type=int, default=0)
    tr.add_argument("--cluster", default="auto",
                    help="with parallel.auto=true: the cluster to plan for, a TOML file or a "
                    "profile of `plait plan` (default: this machine's GPU profile, else `local`)")
    tr.set_defaults(fn=cmd_train)

    be = sub.add_parser("bench", help="benchmarks: plait beside torch's peer, in one run",
                        description="plait bench NAME [flags]; `plait bench NAME --help` lists "
                                    "NAME's own flags")
    be.add_argument("what", choices=list(BENCHMARKS))
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    be.set_defaults(fn=cmd_bench)

    da = sub.add_parser("data",
                        help="data preparation: text in, packed token shards + meta.json out")
    dsub = da.add_subparsers(dest="data_cmd", required=True)
    pr = dsub.add_parser("prepare",
                         help="tokenize text / jsonl / parquet inputs into packed shards "
                              "(docs/data.md)")
    data_prepare.add_arguments(pr)
    pr.set_defaults(fn=cmd_data_prepare)

    pl = sub.add_parser("plan", help="choose the layout: step time and memory of each layout",
                        description="plait plan [CONFIG] [key=value ...] --world N --cluster "
                                    "FILE|PROFILE (docs/planner.md)")
    planner_cli.add_arguments(pl)
    pl.set_defaults(fn=planner_cli.main)

    ex = sub.add_parser("export",
                        help="a checkpoint (any layout) as one safetensors file plus a config "
                             "JSON, or (model.hf runs, --format hf) as a transformers directory")
    ex.add_argument("checkpoint",
                    help="a checkpoint folder (step-NNNNNNNN), or a run / checkpoints folder "
                         "(latest)")
    ex.add_argument("out",
                    help="OUT.safetensors (config: OUT.json), or a folder (model.safetensors, "
                         "config.json); --format hf: a new folder")
    ex.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                    help="hf: what transformers' from_pretrained loads (docs/hf.md)")
    ex.add_argument("--max-shard-size", default="",
                    help="--format hf: the largest weights file, e.g. 5GB (default), 500MB")
    ex.add_argument("--source", default="",
                    help="--format hf: the transformers directory whose config.json and "
                         "tokenizer files to copy (default: the run's model.hf)")
    ex.set_defaults(fn=cmd_export)

    rp = sub.add_parser("report", help="plots and summary of a run folder")
    rp.add_argument("run_dir")
    rp.set_defaults(fn=cmd_report)
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `plait train` takes its options and overrides in any order."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    # argparse ends a positional list at the first option: the rest lands here
    if args.cmd == "train":
        args.rest += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as e:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"plait: error: {e}", file=sys.stderr, flush=True)
        else:
            # local rank 0 prints the same message: exiting first would let the launcher stop it
            # before it does
            time.sleep(5)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
