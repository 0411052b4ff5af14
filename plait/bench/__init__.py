"""Benchmarks: plait beside its torch peer, alternating, in one run. Results as medians and ratios."""

from __future__ import annotations

import importlib

# Flags shared by every `plait bench` (parsed as None when not given) take the benchmark's own default
# here, so a value the user types is always kept, even when it equals another benchmark's default.
SHARED = {"ranks": "2,4", "steps": 6, "preset": "10m", "reps": 5, "batch": 0}
OWN = {"sync": {"ranks": "4", "steps": 300, "preset": "tiny", "reps": 1, "batch": 4}}
BENCHMARKS = ("dp", "gpu", "tp", "compression", "sync", "pp", "zero")


def resolve_defaults(what: str, args) -> None:
    for key, value in {**SHARED, **OWN.get(what, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def run_bench(what: str, args) -> int:
    if what not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {what!r}; choose one of {', '.join(BENCHMARKS)}")
    resolve_defaults(what, args)
    return importlib.import_module(f"plait.bench.{what}").main(args)
