"""One rank of `plait bench hf`: every side on the same weights and batch, the alternating timing
loop, the byte and op counts, the per-phase times, the profile (plait.bench.hf describes the
output).

plait's side: `build_for_training(DIR)` and `parallelize()` with parallel.tp = n, as
`plait train model.hf=DIR parallel.tp=n` builds it; a step is `train_step`, `optimizer.step()`,
`zero_grad()`. transformers' side: `AutoModelForCausalLM.from_pretrained(DIR,
distributed_config=DistributedConfig(tp_size=n))` (the model's own `base_model_tp_plan` on DTensor,
the head `colwise_gather_output`); a step is its forward, `F.cross_entropy` on the gathered logits,
backward, AdamW step, `zero_grad`. The reference run "hf_sharded": the head's rule `colwise`, its
logits a `Shard(-1)` DTensor and the loss under torch's `loss_parallel`.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# collective name prefixes (functional and c10d spellings) -> plait.comm's op names
_COLLECTIVES = (("all_reduce", "all_reduce"), ("allreduce", "all_reduce"),
                ("all_gather", "all_gather"), ("allgather", "all_gather"),
                ("reduce_scatter", "reduce_scatter"), ("all_to_all", "all_to_all"),
                ("alltoall", "all_to_all"), ("broadcast", "broadcast"))
_COMM_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")


def _nbytes(x) -> int:
    """Bytes of a tensor or of the tensors in a (nested) list; 0 for anything else."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(e) for e in x)
    return 0


def _first_tensor(x) -> torch.Tensor:
    while isinstance(x, (list, tuple)):
        x = x[0]
    return x


class CountOps(TorchDispatchMode):
    """Counts, per step, what reaches the dispatcher: every collective (functional ones, which
    DTensor issues, and the in-place c10d ones, which plait.comm issues) with its bytes by plait's
    formulas and as gloo sends them (plait.comm.wire_bytes), the local ops run, and the ops that
    DTensor dispatches (each then lowered to local ops and collectives, counted as those)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.formula = 0.0
        self.wire = 0.0
        self.calls: Counter = Counter()
        self.bytes_by_op: Counter = Counter()
        self.sizes: Counter = Counter()
        self.other: Counter = Counter()
        self.local_ops = 0
        self.dtensor_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(issubclass(t, DTensor) for t in types):
            # DTensor lowers the op to local ops and collectives, which come back here
            self.dtensor_ops += 1
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func.namespace not in _COMM_NAMESPACES:
            self.local_ops += 1
            return out
        self._collective(func, args)
        return out

    def _collective(self, func, args) -> None:
        from plait.comm import wire_bytes

        name = func._overloadpacket.__name__.lstrip("_")
        op = next((o for prefix, o in _COLLECTIVES if name.startswith(prefix)), None)
        if op is None:
            # wait_tensor, _wrap_tensor_autograd, a barrier: no bytes
            self.other[func._overloadpacket.__name__] += 1
            return
        if func.namespace == "c10d":
            # in-place ops hold both buffers (lists for the per-device forms): the larger is the
            # whole array the formula wants (gathered output, unscattered input)
            whole = max(_nbytes(a) for a in args)
        else:
            # functional ops take the input: all_gather's is this rank's shard of the whole
            whole = _nbytes(args[0]) * (self.n if op == "all_gather" else 1)
        first = _first_tensor(args[0])
        # gloo's ring skips empty segments: the reduced array's element count
        count = whole // first.element_size() if op in ("all_reduce", "reduce_scatter") else None
        w = wire_bytes(op, whole, self.n, "gloo", count)
        self.formula += w.formula
        self.wire += float(w)
        self.calls[op] += 1
        self.bytes_by_op[op] += w.formula
        self.sizes[f"{op} {'x'.join(map(str, first.shape))}"] += 1

    def result(self) -> dict:
        return {"formula_bytes": self.formula, "wire_bytes": self.wire,
                "collectives": dict(self.calls), "formula_bytes_by_op": dict(self.bytes_by_op),
                "collective_shapes": dict(self.sizes), "other_comm_ops": dict(self.other),
                "local_ops": self.local_ops, "dtensor_ops": self.dtensor_ops}


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): the CPU time leaves out waits and the time the
    process is not scheduled, which on a shared machine the wall clock does not."""
    return time.perf_counter(), time.process_time()


def _record(t: dict, marks: list) -> None:
    for name, a, b in zip(("forward", "loss", "backward", "optimizer"), marks, marks[1:]):
        t.setdefault(name, []).append(b[0] - a[0])
        t.setdefault(f"{name}_cpu", []).append(b[1] - a[1])


def _plait_side(model_dir: str, mesh, adamw, x, y):
    """plait's tp = n of the model in `model_dir`: (step, phases), each returning the loss."""
    from plait.config import ParallelConfig
    from plait.models.hf import build_for_training
    from plait.parallelize import ParallelOptions, parallelize

    model, init_weights = build_for_training(model_dir, seed=0)
    pm, popt = parallelize(model, adamw, mesh,
                           ParallelOptions(parallel=ParallelConfig(dp=1, tp=mesh.tp_size)),
                           init_weights=init_weights)
    tokens = y.numel()

    def step() -> float:
        loss = pm.train_step([(x, y)], tokens)
        popt.step()
        popt.zero_grad()
        return float(loss)

    def phases(t: dict) -> float:
        # train_step's body for one micro-batch, split where the time is taken
        marks = [_now()]
        logits = pm(x)
        marks.append(_now())
        loss = pm.loss(logits, y, reduction="sum") / tokens
        marks.append(_now())
        loss.backward()
        marks.append(_now())
        popt.step()
        popt.zero_grad()
        marks.append(_now())
        _record(t, marks)
        return float(loss.detach())

    return step, phases


def _hf_side(model_dir: str, n: int, adamw, x, y, sharded_head: bool = False):
    """transformers' own tp = n of the model in `model_dir`: (step, phases, info). With
    `sharded_head`, its plan's head rule is overridden to `colwise` (logits left sharded over the
    vocabulary) and the loss is torch's `loss_parallel` cross-entropy on them."""
    import contextlib

    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    plan = {"lm_head": "colwise"} if sharded_head else None
    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_size=n, tp_plan=plan),
        dtype=torch.float32, attn_implementation="sdpa", local_files_only=True)
    lm.train()
    opt = adamw(list(lm.parameters()))
    mesh, vocab = lm.lm_head.weight.device_mesh, lm.lm_head.out_features
    in_loss = loss_parallel if sharded_head else contextlib.nullcontext

    def forward():
        logits = lm(input_ids=x, use_cache=False).logits
        if not sharded_head:
            return logits
        shape = (*logits.shape[:-1], vocab)
        return DTensor.from_local(logits, mesh, [Shard(-1)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def value(loss) -> float:
        loss = loss.detach()
        return float(loss.full_tensor() if isinstance(loss, DTensor) else loss)

    def step() -> float:
        with in_loss():
            loss = F.cross_entropy(forward().flatten(0, 1), y.flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value(loss)

    def phases(t: dict) -> float:
        marks = [_now()]
        logits = forward()
        marks.append(_now())
        with in_loss():
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            marks.append(_now())
            loss.backward()
        marks.append(_now())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(_now())
        _record(t, marks)
        return value(loss)

    params = list(lm.parameters())
    info = {"parameters": len(params),
            "dtensor_parameters": sum(isinstance(p, DTensor) for p in params),
            "tp_plan": dict(lm.tp_plan or {})}
    return step, phases, info


def profile_step(fn, top: int) -> dict:
    """One step of `fn` under torch.profiler (CPU): its wall time, the events recorded and the
    `top` ops by self CPU time (an op that DTensor dispatches shows twice, as the DTensor-level op
    and as the local op inside it, each with its own self time)."""
    import contextlib
    import os

    from torch.profiler import ProfilerActivity, profile

    # the profiler's start / stop lines on stderr would fill the benchmark's log
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.ExitStack() as stack:
            os.dup2(null.fileno(), 2)
            stack.callback(os.dup2, saved, 2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                loss = fn()
                wall = time.perf_counter() - t0
    finally:
        os.close(saved)
    rows = sorted(((e.key, e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()),
                  key=lambda r: -r[2])
    return {"wall_s": wall, "events": sum(r[1] for r in rows),
            "self_cpu_s": sum(r[2] for r in rows), "loss": loss,
            "top": [{"op": k, "count": c, "self_s": t} for k, c, t in rows[:top]]}


def worker(opts: dict) -> dict:
    from plait.mesh import Mesh

    n = opts["tp"]
    mesh = Mesh.build(dp=1, tp=n, device="cpu")
    g = torch.Generator().manual_seed(100)  # the same batch on every rank and every step
    data = torch.randint(0, opts["vocab"], (opts["batch"], opts["seq_len"] + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    o = opts["adamw"]
    adamw = lambda ps: torch.optim.AdamW(ps, lr=o["lr"], betas=tuple(o["betas"]),  # noqa: E731
                                         eps=o["eps"], weight_decay=o["weight_decay"])
    sides = {"plait": _plait_side(opts["dir"], mesh, adamw, x, y)}
    sides["hf"] = _hf_side(opts["dir"], n, adamw, x, y)
    if opts["sharded_head"]:
        sides["hf_sharded"] = _hf_side(opts["dir"], n, adamw, x, y, sharded_head=True)
    names = list(sides)
    losses: dict[str, list[float]] = {k: [s[0]()] for k, s in sides.items()}  # warm-up step

    # bytes and ops of one step each: plait's own accounting, and the same counter on all sides
    counts = {}
    mesh.comm.stats.reset_step()
    for k, side in sides.items():
        with CountOps(n) as c:
            losses[k].append(side[0]())
        counts[k] = c.result()
        if k == "plait":
            counts[k]["own_accounting"] = mesh.comm.stats.reset_step()

    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    phases: dict[str, dict[str, list[float]]] = {k: {} for k in names}
    for rep in range(opts["reps"]):
        # alternate who goes first
        for k in (names if rep % 2 == 0 else names[::-1]):
            mesh.comm.barrier(mesh.tp)
            t0, c0 = _now()
            for _ in range(opts["steps"]):
                losses[k].append(sides[k][0]())
            t1, c1 = _now()
            times[k].append((t1 - t0) / opts["steps"])
            cpu[k].append((c1 - c0) / opts["steps"])
    for i in range(opts["phase_steps"]):
        for k in (names if i % 2 == 0 else names[::-1]):
            mesh.comm.barrier(mesh.tp)
            losses[k].append(sides[k][1](phases[k]))
    profiles = {}
    for k in (names if opts["profile"] else ()):
        mesh.comm.barrier(mesh.tp)
        profiles[k] = profile_step(sides[k][0], opts["profile_top"])
        losses[k].append(profiles[k]["loss"])
    mesh.comm.stats.reset_step()

    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    first = {k: v[0] for k, v in losses.items()}
    last = {k: v[-1] for k, v in losses.items()}
    rel = lambda d, k="hf": abs(d["plait"] - d[k]) / abs(d[k])  # noqa: E731
    out = {
        "tp": n,
        "plait_step_s": med["plait"],
        "hf_step_s": med["hf"],
        "ratio": med["plait"] / med["hf"],
        "paired_ratio": statistics.median(a / b for a, b in zip(times["plait"], times["hf"])),
        "plait_times": times["plait"],
        "hf_times": times["hf"],
        "plait_cpu_s": cpu_med["plait"],
        "hf_cpu_s": cpu_med["hf"],
        "cpu_ratio": cpu_med["plait"] / cpu_med["hf"],
        "plait_cpu_times": cpu["plait"],
        "hf_cpu_times": cpu["hf"],
        "plait_bytes_per_step": counts["plait"]["own_accounting"]["formula_bytes"],
        "plait_wire_bytes_per_step": counts["plait"]["own_accounting"]["comm_bytes"],
        "hf_bytes_per_step": counts["hf"]["formula_bytes"],
        "hf_wire_bytes_per_step": counts["hf"]["wire_bytes"],
        "counted": counts,
        "phases_median_s": {k: {ph: statistics.median(v) for ph, v in d.items()}
                            for k, d in phases.items()},
        "profile": profiles,
        "losses": losses,
        "first_loss": first,
        "first_loss_rel_diff": rel(first),
        "final_loss": last,
        "final_loss_rel_diff": rel(last),
        "hf_model": sides["hf"][2],
    }
    if "hf_sharded" in sides:
        out["hf_sharded"] = {
            "step_s": med["hf_sharded"], "times": times["hf_sharded"],
            "cpu_s": cpu_med["hf_sharded"], "cpu_times": cpu["hf_sharded"],
            "ratio": med["plait"] / med["hf_sharded"],
            "paired_ratio": statistics.median(
                a / b for a, b in zip(times["plait"], times["hf_sharded"])),
            "cpu_ratio": cpu_med["plait"] / cpu_med["hf_sharded"],
            "bytes_per_step": counts["hf_sharded"]["formula_bytes"],
            "wire_bytes_per_step": counts["hf_sharded"]["wire_bytes"],
            "first_loss_rel_diff": rel(first, "hf_sharded"),
            "final_loss_rel_diff": rel(last, "hf_sharded"), "model": sides["hf_sharded"][2]}
    return out
