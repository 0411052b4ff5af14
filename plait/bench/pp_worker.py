"""One pp rank of `plait bench pp`: the runs (plait's schedules and torch's on the same stages),
the alternating timing loop, and what each run measured (plait.bench.pp describes the output).

torch's side. Single-stage schedules (ScheduleGPipe, Schedule1F1B) run on plait's whole stage
module; multi-stage ones (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble) get one torch
`PipelineStage` per plait chunk, holding exactly that chunk's layers (stage c·p + rank of p·v,
plait's interleaved placement). torch's ZB1P with one stage per rank is the counterpart of
plait's ZB-H1. ScheduleZBVZeroBubble (two stages per rank in a V: rank r holds stages r and
2p−1−r) has no plait counterpart; it runs on a V split of the same blocks, for reference.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

from plait.bench.pp_model import RopeBlock, mse_sum


def _chunk_modules(stage, v: int) -> list[nn.Module]:
    return [nn.Sequential(*[stage.get_submodule(n) for n in stage.layer_names(c)])
            for c in range(v)]


def _torch_run(name: str, v: int, model, mesh, x, y, m: int, sgd, blocks: int):
    """A torch.distributed.pipelining step function on plait's split of `model` (a copy)."""
    from torch.distributed import pipelining as tp

    from plait.config import ParallelConfig
    from plait.pipeline.build import build_pipeline

    p, rank = mesh.pp_size, mesh.pp_index
    cpu = torch.device("cpu")
    loss = lambda out, tgt: mse_sum(out, tgt, "mean")  # noqa: E731
    if name == "zbv":  # V placement: rank r holds stages r and 2p − 1 − r
        k = blocks // (2 * p)
        layers = copy.deepcopy(model)
        chunks = [layers[s * k:(s + 1) * k] for s in (rank, 2 * p - 1 - rank)]
        stages = [tp.PipelineStage(c, s, 2 * p, cpu, group=mesh.pp.pg)
                  for c, s in zip(chunks, (rank, 2 * p - 1 - rank))]
        sched = tp.ScheduleZBVZeroBubble(stages, n_microbatches=m, loss_fn=loss)
        first = last = rank == 0
        params = [q for c in chunks for q in c.parameters()]
    else:
        schedule = "interleaved_1f1b" if name == "interleaved_1f1b" else "1f1b"
        stage, _, _ = build_pipeline(copy.deepcopy(model), mesh,
                                     ParallelConfig(pp=p, schedule=schedule, virtual_stages=v),
                                     mse_sum)
        params = list(stage.parameters())
        if name in ("gpipe", "1f1b"):
            cls = tp.ScheduleGPipe if name == "gpipe" else tp.Schedule1F1B
            sched = cls(tp.PipelineStage(stage, rank, p, cpu, group=mesh.pp.pg),
                        n_microbatches=m, loss_fn=loss)
        else:
            cls = (tp.ScheduleInterleaved1F1B if name == "interleaved_1f1b"
                   else tp.ScheduleInterleavedZeroBubble)
            stages = [tp.PipelineStage(c, ci * p + rank, p * v, cpu, group=mesh.pp.pg)
                      for ci, c in enumerate(_chunk_modules(stage, v))]
            sched = cls(stages, n_microbatches=m, loss_fn=loss)
        first, last = mesh.is_first_stage, mesh.is_last_stage
    opt = sgd(params)

    def step() -> float:
        losses: list = []
        kw = {"target": y, "losses": losses} if last else {}
        sched.step(x, **kw) if first else sched.step(**kw)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(torch.stack(losses).detach().mean()) if losses else float("nan")

    return step


def build_runs(opts: dict, mesh, model, x, y, sgd):
    """{name: step function}, {name: plait runner}: plait's schedules, then torch's."""
    from plait.config import ParallelConfig
    from plait.pipeline.build import build_pipeline

    p, m = opts["pp"], opts["m"]
    batches = [(x[i: i + 1], y[i: i + 1]) for i in range(m)] if opts["mb_size"] == 1 else [
        (x[i: i + opts["mb_size"]], y[i: i + opts["mb_size"]])
        for i in range(0, m * opts["mb_size"], opts["mb_size"])]
    divisor = m * y[:opts["mb_size"]].numel()  # mean of micro-batch means: torch's scale_grads
    runs, runners = {}, {}
    for name, v in opts["schedules"]:
        stage, runner, _ = build_pipeline(copy.deepcopy(model), mesh,
                                          ParallelConfig(pp=p, schedule=name, virtual_stages=v),
                                          mse_sum, measure_memory=True)
        opt = sgd(stage.parameters())

        def step(runner=runner, opt=opt) -> float:
            loss = runner.train_step(batches, divisor)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        runs[f"plait/{name}"] = step
        runners[f"plait/{name}"] = runner
    xs = x[:m * opts["mb_size"]]
    ys = y[:m * opts["mb_size"]]
    for name, v in opts["torch"]:
        runs[f"torch/{name}"] = _torch_run(name, v, model, mesh, xs, ys, m, sgd, opts["blocks"])
    return runs, runners


def worker(opts: dict) -> dict:
    from plait.mesh import Mesh
    from plait.models.gpt import build_config

    p, m, T, b = opts["pp"], opts["m"], opts["seq_len"], opts["mb_size"]
    mesh = Mesh.build(dp=1, tp=1, pp=p, device="cpu")
    cfg = build_config(opts["preset"], vocab_size=8, max_seq_len=max(T, 8))
    torch.manual_seed(0)
    model = nn.Sequential(*[RopeBlock(cfg, T) for _ in range(opts["blocks"])])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m * b, T, cfg.d_model, generator=g)
    y = torch.randn(m * b, T, cfg.d_model, generator=g)
    sgd = lambda params: torch.optim.SGD(params, lr=opts["lr"])  # noqa: E731
    runs, runners = build_runs(opts, mesh, model, x, y, sgd)

    first = {k: fn() for k, fn in runs.items()}  # warm-up: every run starts from the same weights
    for r in runners.values():  # saved bytes are counted in the warm-up step only (hooks cost)
        r.measure_memory = False
    if opts.get("profile"):
        from plait.bench.pp_profile import profile_runs

        return {"profile": profile_runs(runs, mesh, opts["profile"], opts["steps"],
                                            opts["reps"])}
    times: dict[str, list[float]] = {k: [] for k in runs}
    timelines: dict[str, list] = {k: [] for k in runners}
    # each plait run next to its torch peer, so that a repetition's pair is close in time
    names = sorted(runs, key=lambda k: (k.split("/")[1], k))
    for rep in range(opts["reps"]):
        for name in (names if rep % 2 == 0 else names[::-1]):  # alternate who goes first
            mesh.comm.barrier(mesh.pp)
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / opts["steps"])
            if name in runners and opts.get("simulate"):
                tl = runners[name].gather_timeline()
                timelines[name].append((tl.ranks, tl.bubbles))
    out = {"pp": p, "m": m, "blocks": opts["blocks"], "runs": {}}
    for name in runs:
        row = {"step_s": statistics.median(times[name]), "times": times[name],
               "first_loss": first[name]}
        if name in runners:
            row.update(_plait_row(runners[name], opts, timelines[name]))
        out["runs"][name] = row
    return out


def _plait_row(r, opts: dict, timelines: list) -> dict:
    """Bubbles (measured; theory; simulated with the measured costs), in-flight peaks."""
    from plait.pipeline.schedules import theoretical_bubble

    p, m = opts["pp"], opts["m"]
    hist = list(r.history)
    timed = hist[1:]  # the warm-up step (memory hooks on) is not a timed step
    per_rank = [statistics.median(s[i]["bubble"] for s in timed) for i in range(p)]
    theory = theoretical_bubble(r.schedule, p, m, r.v)
    row = {"bubble_per_rank": per_rank, "bubble": sum(per_rank) / p, "bubble_theory": theory,
           "peak_in_flight_per_stage": [int(s["peak_in_flight"]) for s in hist[0]],
           "peak_saved_bytes_per_stage": [int(s["peak_saved_bytes"]) for s in hist[0]]}
    if timelines:
        from plait.bench.pp_sim import simulated_bubble

        row.update(simulated_bubble(timelines, r.schedule, p, m, r.v))
    return row
