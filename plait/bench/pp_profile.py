"""`plait bench pp --profile DIR`: where one pipeline step's time goes, plait's and torch's.

Each run (plait's schedules and torch's) is profiled with torch.profiler (CPU activity) for a few
steps on every rank, one Chrome trace per run and rank written to DIR. For the duration of the
profile only, the one place each side waits for its messages is wrapped in a
`record_function("pp.wait")` span: plait's `Handle.wait` (plait.comm.ops) and torch's
`_wait_batch_p2p` (torch.distributed.pipelining.schedules), so waiting is visible on both sides
the same way. The timed benchmark runs without these wrappers and without the profiler.

The main thread's top-level spans are summed per category, per step:
- forward: operators outside autograd's engine (the blocks' forward, the loss);
- backward: `autograd::engine::evaluate_function: …` (CPU backward runs on the calling thread);
- p2p post: `c10d::…` (posting isend / irecv; gloo's own `gloo:…` spans are asynchronous and
  measure a message's lifetime, so they are left out);
- wait: the `pp.wait` spans;
- alloc/copy: empty / zeros / copy / clone / contiguous / detach at the top level;
- optimizer: `Optimizer.step` / `zero_grad`;
- torch's own annotations (`Forward i`, `Backward i` of ScheduleGPipe) are containers: their
  children are counted;
- python: the rest of the step, covered by no span (the executor's own code, the profiler's
  per-op cost included: it is the same per operator on both sides).
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager

ALLOC = ("aten::empty", "aten::zeros", "aten::copy_", "aten::clone", "aten::contiguous",
         "aten::detach", "aten::to", "aten::_to_copy", "aten::empty_like", "aten::zeros_like",
         "aten::zero_", "aten::fill_")
CONTAINER = re.compile(r"^(Forward|Backward|PP:|## ).*")  # torch's schedule annotations
CATEGORIES = ("forward", "backward", "p2p post", "wait", "alloc/copy", "optimizer", "python")


def category(name: str) -> str | None:
    """A span's category; "container" for a schedule's own annotation (its children count)."""
    if name.startswith("gloo:") or name.startswith("ProfilerStep"):
        return None
    if CONTAINER.match(name):
        return "container"
    if name == "pp.wait":
        return "wait"
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    if name.startswith("c10d::") or "isend" in name or "irecv" in name:
        return "p2p post"
    if name.startswith("Optimizer."):
        return "optimizer"
    if name in ALLOC:
        return "alloc/copy"
    return "forward"


@contextmanager
def _wait_spans():
    """Wrap both sides' message waits in a `pp.wait` span (restored on exit)."""
    import torch.distributed.pipelining.schedules as ts
    from torch.profiler import record_function

    from plait.comm import ops

    plait_wait, torch_wait = ops.Handle.wait, ts._wait_batch_p2p

    def pw(self):
        if self.done:
            return plait_wait(self)
        with record_function("pp.wait"):
            return plait_wait(self)

    def tw(work):
        with record_function("pp.wait"):
            return torch_wait(work)

    ops.Handle.wait, ts._wait_batch_p2p = pw, tw
    try:
        yield
    finally:
        ops.Handle.wait, ts._wait_batch_p2p = plait_wait, torch_wait


def summarize(events, wall: float, steps: int) -> dict:
    """Milliseconds per step per category of the main thread's top-level spans."""
    tops = [e for e in events if e.cpu_parent is None and not getattr(e, "is_async", False)]
    threads: dict[int, float] = {}
    for e in tops:
        threads[e.thread] = threads.get(e.thread, 0.0) + e.cpu_time_total
    main = max(threads, key=threads.get) if threads else None
    out = dict.fromkeys(CATEGORIES, 0.0)
    counts = dict.fromkeys(CATEGORIES, 0)
    covered = 0.0
    stack = [e for e in tops if e.thread == main]
    while stack:
        e = stack.pop()
        cat = category(e.name)
        if cat == "container":
            stack.extend(e.cpu_children)
            continue
        if cat is None:
            continue
        dur = (e.time_range.end - e.time_range.start) / 1e3  # µs -> ms
        out[cat] += dur
        counts[cat] += 1
        covered += dur
    out["python"] = max(0.0, wall * 1e3 - covered)
    return {"ms_per_step": {k: v / steps for k, v in out.items()},
            "spans_per_step": {k: v / steps for k, v in counts.items()},
            "wall_ms_per_step": wall * 1e3 / steps}


def profile_runs(runs: dict, mesh, out_dir: str, steps: int, reps: int = 1) -> dict:
    """Profile `steps` steps of every run on this rank, `reps` times in alternating order (the
    medians per category are kept); the last repetition's traces go to out_dir."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    got: dict[str, list[dict]] = {k: [] for k in runs}
    names = list(runs)
    with _wait_spans():
        for fn in runs.values():
            fn()  # the wrappers' first call outside the profile
        for rep in range(reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                mesh.comm.barrier(mesh.pp)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        runs[name]()
                    wall = time.perf_counter() - t0
                got[name].append(summarize(prof.events(), wall, steps))
                if rep == reps - 1:
                    prof.export_chrome_trace(os.path.join(
                        out_dir, f"{name.replace('/', '_')}_rank{mesh.pp_index}.json"))
    res = {}
    for name, rows in got.items():
        res[name] = {"wall_ms_per_step": statistics.median(r["wall_ms_per_step"] for r in rows),
                     "ms_per_step": {c: statistics.median(r["ms_per_step"][c] for r in rows)
                                     for c in CATEGORIES},
                     "spans_per_step": rows[-1]["spans_per_step"], "reps": len(rows)}
    return res
