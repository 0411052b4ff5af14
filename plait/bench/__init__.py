"""Benchmarks: plait beside its torch peer, alternating, in one run. Results as medians and ratios."""

from __future__ import annotations


def run_bench(what: str, args) -> int:
    if what == "dp":
        from plait.bench.dp import main

        return main(args)
    if what == "gpu":
        from plait.bench.gpu import main

        return main(args)
    if what == "tp":
        from plait.bench.tp import main

        return main(args)
    if what == "compression":
        from plait.bench.compression import main

        return main(args)
    if what == "sync":
        from plait.bench.sync import main

        return main(args)
    if what == "pp":
        from plait.bench.pp import main

        return main(args)
    if what == "zero":
        from plait.bench.zero import main

        return main(args)
    raise SystemExit(f"unknown benchmark {what!r}")
