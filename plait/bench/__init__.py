"""Benchmarks: plait beside its torch peer, alternating, in one run. Results as medians and ratios.

Each benchmark is a module here with `add_arguments(parser)` (its own flags and defaults) and
`main(args) -> int`; `plait bench NAME ...` hands the rest of its command line to that module.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("dp", "tp", "pp", "zero", "compression", "sync", "gpu", "hf")


def run_bench(what: str, argv: list[str]) -> int:
    """`plait bench WHAT ARGV...`: parse ARGV with the benchmark's own flags and run it."""
    if what not in BENCHMARKS:
        raise SystemExit(f"plait bench: unknown benchmark {what!r}; choose one of "
                         f"{', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"plait.bench.{what}")
    ap = argparse.ArgumentParser(prog=f"plait bench {what}",
                                 description=(module.add_arguments.__doc__ or "").strip())
    module.add_arguments(ap)
    return module.main(ap.parse_args(argv))
