"""`plait plan`: the command line of the planner (mounted by plait.cli as a subcommand).

plait plan [CONFIG] [key=value ...] --world N --cluster FILE|PROFILE [--layout ...] [--top K]
           [--json PATH] [--write PATH] [--gantt PATH] [--calibrate] [--validate] [--published]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plait.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "rest",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="the training config (TOML) and section.key=value overrides, as for plait train",
    )
    parser.add_argument(
        "--world",
        type=int,
        default=0,
        help="ranks to plan for (default: the config's dp·tp·pp when parallel.dp is set)",
    )
    parser.add_argument(
        "--cluster",
        default="local",
        help="a cluster TOML file, or a profile: dgx-a100-80gb, "
        "dgx-h100, h200, local (this machine, after --calibrate), auto (this machine's GPU "
        "profile, else local)",
    )
    parser.add_argument(
        "--layout",
        default=None,
        help="evaluate one layout: dp=..,tp=..,pp=..,zero=..,"
        "micro_batch=..,schedule=..,virtual_stages=..,ac=..,sp=..,compression=..,sync=..",
    )
    parser.add_argument(
        "--low-comm",
        action="store_true",
        help="also try compressors and sync strategies where the dp group crosses nodes (they "
        "change the loss per step: ranked by throughput only, flagged)",
    )
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument("--json", default=None, help="write the ranked layouts here")
    parser.add_argument(
        "--write", default=None, help="write the chosen layout as a config plait train runs"
    )
    parser.add_argument(
        "--gantt", default=None, help="draw the chosen layout's simulated pipeline step (PNG)"
    )
    parser.add_argument(
        "--hf-config", default=None, help="take the model shape from a Hugging Face config.json"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="measure this machine for the local profile"
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="predict and run layouts of a small model here, compare (about 10 minutes on 2 cores)",
    )
    parser.add_argument(
        "--published", action="store_true", help="predict published large runs, compare"
    )


def _config(rest: list[str]):
    from plait.config import load, split_args

    return load(*split_args(rest))


def _row(r: dict) -> str:
    from plait.planner.layout import Layout

    lay = Layout(**{k: r[k] for k in Layout.__dataclass_fields__})
    fit = "" if r.get("fits", True) else "  (does not fit)"
    fit += "  (changes the optimization)" if r.get("changes_optimization") else ""
    return (
        f"{lay.short():<46} {r['step_s']:>9.3f} s {r['tokens_per_s']:>12,.0f} tok/s  "
        f"MFU {100 * r['mfu']:5.1f}%"
        f"  {r['memory_bytes'] / 2**30:8.2f} GiB{fit}"
    )


def main(args) -> int:
    try:
        return _main(args)
    except ConfigError as e:
        print(f"plait plan: {e}")
        return 2


def _main(args) -> int:
    if args.calibrate:
        from plait.planner.calibrate import calibrate

        calibrate()
        if not (args.rest or args.layout or args.validate or args.published or args.world):
            return 0
    if args.published:
        from plait.planner.published import compare, table

        rows = compare()
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.validate:
        from plait.planner.validate import validate

        out = validate(log=print)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 0
    return plan(args)


def plan(args) -> int:
    from plait.config import to_toml
    from plait.planner.cluster import load_cluster
    from plait.planner.layout import apply, parse
    from plait.planner.search import Planner, job_from_config
    from plait.planner.shape import shape_from_hf_config

    cfg = _config(args.rest)
    if cfg.parallel.replicas > 1:
        raise ConfigError(f"plait plan with parallel.replicas = {cfg.parallel.replicas}: the "
                          "planner does not model replicas yet; plan one replica "
                          "(parallel.replicas=1, --world = its ranks)")
    shape = shape_from_hf_config(args.hf_config) if args.hf_config else None
    world = args.world or (
        cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp if cfg.parallel.dp else 0
    )
    if world < 1:
        raise ConfigError("plait plan needs --world N (or a config with parallel.dp set)")
    from plait.planner import detect_cluster

    clus = detect_cluster() if args.cluster == "auto" else load_cluster(args.cluster)
    planner = Planner(job_from_config(cfg, shape), clus, world, low_comm=args.low_comm)
    sh, c = planner.shape, planner.cluster
    print(
        f"plait plan: {sh.n_params() / 1e9:.3g}B-parameter GPT (L={sh.n_layers}, D={sh.d_model}, "
        f"H={sh.n_heads}, "
        f"K={sh.kv_heads}, F={sh.ffn}, V={sh.vocab}), "
        f"batch {planner.job.global_batch}×{planner.job.seq_len}, "
        f"{planner.job.dtype}, {world} ranks on {c.name} ({c.nodes}×{c.gpus_per_node}, "
        f"{c.gpu_memory_gb:g} GiB each)"
    )
    if args.layout:
        res = {
            "layouts": [planner.evaluate(parse(args.layout, world, cfg.train.micro_batch))],
            "fitting": None,
            "simulated": 1,
        }
    else:
        res = planner.search(top=args.top)
        print(f"{res['fitting']} layouts fit, {res['simulated']} simulated")
    for r in res["layouts"]:
        print(_row(r))
    if not res["layouts"]:
        print("no layout fits: lower train.global_batch or train.seq_len, or plan for more ranks")
        return 1
    best = res["layouts"][0]
    if args.json:
        doc = {
            "world": world,
            "cluster": c.name,
            "model": sh.__dict__,
            "fitting": res["fitting"],
            "simulated": res["simulated"],
            "layouts": res["layouts"],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {args.json}")
    from plait.planner.layout import Layout

    layout = Layout(**{k: best[k] for k in Layout.__dataclass_fields__})
    if args.write:
        Path(args.write).write_text(to_toml(apply(cfg, layout)))
        print(f"wrote {args.write}: plait train {args.write} --nproc {world}")
    if args.gantt:
        if layout.pp == 1:
            print("--gantt: the chosen layout has no pipeline (pp = 1); nothing to draw")
        else:
            planner.evaluate(layout, timeline_path=args.gantt)
            print(f"wrote {args.gantt}")
    return 0
