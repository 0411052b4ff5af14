"""`plait bench tp`: plait's tensor parallelism beside torch's DTensor tensor parallelism.

Per tp size: the same GPT (same weights), the same batch on every rank (tp ranks share their
input), AdamW on both. plait: `parallelize()` with parallel.tp = t (the built-in GPT plan:
Megatron layout, one all-reduce per region, vocab-parallel loss). torch: `parallelize_module`
with ColwiseParallel on q/k/v and gate/up, RowwiseParallel on o and down, the embedding
row-wise (vocab-sharded), the head column-wise with its logits kept sharded and the loss under
`loss_parallel()`. Repetitions alternate plait / torch; each times `--steps` optimizer steps after
one untimed warm-up step; reported: the median over repetitions of the mean step time, ratio =
plait / torch (below 1: plait is faster), bytes per step per rank (plait: its own accounting;
torch: its functional collectives counted in one extra step by the same ring formulas), and the
losses of both (the first step's must match).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountCollectives(TorchDispatchMode):
    """Bytes on the wire (ring formulas, plait.comm.wire_bytes) of DTensor's functional
    collectives."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.bytes = 0.0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        from plait.comm import wire_bytes

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t is DTensor for t in types):
            # let DTensor lower the op to local ops and collectives, seen next
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func.namespace not in ("_c10d_functional", "c10d_functional"):
            return out
        name = func._overloadpacket.__name__
        t = args[0]
        size = t.numel() * t.element_size()
        for prefix, op, whole in (("all_reduce", "all_reduce", size),
                                  ("all_gather", "all_gather", size * self.n),
                                  ("reduce_scatter", "reduce_scatter", size),
                                  ("all_to_all", "all_to_all", size),
                                  ("broadcast", "broadcast", size)):
            # all_gather's input is this rank's shard: the whole is n times it
            if name.startswith(prefix):
                self.bytes += wire_bytes(op, whole, self.n)
                self.calls[name] = self.calls.get(name, 0) + 1
        return out


def torch_tp_plan() -> dict:
    """torch's DTensor plan for plait's GPT (the torchtitan layout, without sequence
    parallelism)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "tok_emb": RowwiseParallel(input_layouts=Replicate()),
        "blocks.*.attn.q_proj": ColwiseParallel(),
        "blocks.*.attn.k_proj": ColwiseParallel(),
        "blocks.*.attn.v_proj": ColwiseParallel(),
        "blocks.*.attn.o_proj": RowwiseParallel(),
        "blocks.*.mlp.gate_proj": ColwiseParallel(),
        "blocks.*.mlp.up_proj": ColwiseParallel(),
        "blocks.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }


def _worker(opts: dict) -> dict:
    import copy

    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from plait.config import ParallelConfig
    from plait.mesh import Mesh
    from plait.models import GPT, build_config
    from plait.parallelize import ParallelOptions, parallelize

    tp = opts["tp"]
    mesh = Mesh.build(dp=1, tp=tp, device="cpu")
    cfg = build_config(opts["preset"], **opts["model"])
    torch.manual_seed(0)
    ref = GPT(cfg)
    g = torch.Generator().manual_seed(100)  # the same batch on every tp rank
    data = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["seq_len"] + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-3)

    pm, popt = parallelize(copy.deepcopy(ref), adamw, mesh,
                           ParallelOptions(parallel=ParallelConfig(dp=1, tp=tp)))
    tm = parallelize_module(copy.deepcopy(ref), mesh.to_device_mesh()["tp"], torch_tp_plan())
    topt = adamw(tm.parameters())

    def plait_step() -> float:
        loss = pm.loss(pm(x), y, reduction="mean")
        loss.backward()
        popt.step()
        popt.zero_grad()
        return float(loss.detach())

    def torch_step() -> float:
        with loss_parallel():
            loss = F.cross_entropy(tm(x).flatten(0, 1), y.flatten())
            loss.backward()
        topt.step()
        topt.zero_grad(set_to_none=True)
        return float(loss.detach().full_tensor())

    runs = {"plait": plait_step, "torch": torch_step}
    first = {k: fn() for k, fn in runs.items()}  # warm-up; the same weights, so the same loss
    mesh.comm.stats.reset_step()
    plait_step()
    plait_bytes = mesh.comm.stats.reset_step()["comm_bytes"]
    counter = _CountCollectives(tp)
    with counter:
        torch_step()
    times: dict[str, list[float]] = {k: [] for k in runs}
    last: dict[str, float] = {}
    for rep in range(opts["reps"]):
        # alternate who goes first
        for name in (("plait", "torch") if rep % 2 == 0 else ("torch", "plait")):
            mesh.comm.barrier(mesh.tp)
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                last[name] = runs[name]()
            times[name].append((time.perf_counter() - t0) / opts["steps"])
    mesh.comm.stats.reset_step()
    p, t = statistics.median(times["plait"]), statistics.median(times["torch"])
    return {
        "tp": tp,
        "plait_step_s": p,
        "torch_step_s": t,
        "ratio": p / t,
        "plait_times": times["plait"],
        "torch_times": times["torch"],
        "plait_bytes_per_step": plait_bytes,
        "torch_bytes_per_step": counter.bytes,
        "torch_collectives_per_step": counter.calls,
        "first_loss": first,
        "first_loss_rel_diff": abs(first["plait"] - first["torch"]) / abs(first["torch"]),
        "final_loss": last,
        "final_loss_rel_diff": abs(last["plait"] - last["torch"]) / abs(last["torch"]),
    }


def _model_overrides(preset: str, sizes: list[int], seq_len: int) -> dict:
    """Heads that every tp size divides: the preset's, else the next multiple of lcm(sizes)
    that divides d_model (stated in the output)."""
    from plait.models import build_config

    cfg = build_config(preset)
    over = {"max_seq_len": max(cfg.max_seq_len, seq_len)}
    lcm = math.lcm(*sizes)
    if cfg.n_heads % lcm or cfg.kv_heads % lcm:
        fits = [h for h in range(cfg.n_heads, cfg.d_model + 1)
                if h % lcm == 0 and cfg.d_model % h == 0 and (cfg.d_model // h) % 2 == 0]
        if not fits:
            raise SystemExit(f"bench tp: no head count of preset {preset!r} divides by tp sizes "
                             f"{sizes}")
        over.update(n_heads=fits[0], n_kv_heads=fits[0])
    return over


def add_arguments(ap) -> None:
    """plait bench tp: plait's tensor parallelism beside DTensor's."""
    ap.add_argument("--ranks", default="2,4", help="comma-separated tp sizes")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions per tp size")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--preset", default="10m", help="model preset")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    from plait.testing import run_ranks
    from plait.train.metrics import human_bytes

    sizes = [int(r) for r in str(args.ranks).split(",") if r]
    batch = args.batch or 8
    model = _model_overrides(args.preset, sizes, args.seq_len)
    threads = lambda n: max(1, (os.cpu_count() or 1) // n)
    rows = []
    for tp in sizes:
        opts = {"tp": tp, "preset": args.preset, "model": model, "batch": batch,
                "seq_len": args.seq_len, "reps": args.reps, "steps": args.steps}
        heads = (f", n_heads = n_kv_heads = {model['n_heads']} (the preset's do not divide by "
                 "every tp size)"
                 if "n_heads" in model else "")
        print(f"bench tp: tp={tp} gloo ranks, preset {args.preset}{heads}, {batch}×{args.seq_len} "
              f"tokens (the same on every rank), {args.reps} alternating reps × {args.steps} steps",
              flush=True)
        res = run_ranks(_worker, tp, args=(opts,), timeout=3600, threads=threads(tp))[0]
        res.update(preset=args.preset, model_overrides=model, batch=batch, seq_len=args.seq_len,
                   threads_per_rank=threads(tp), torch=torch.__version__,
                   same_loss=res["first_loss_rel_diff"] <= 1e-5)
        rows.append(res)
        print(f"  plait {res['plait_step_s'] * 1e3:8.1f} ms/step   torch DTensor "
              f"{res['torch_step_s'] * 1e3:8.1f} ms/step   ratio {res['ratio']:.3f}   bytes/step "
              f"plait {human_bytes(res['plait_bytes_per_step'])} torch "
              f"{human_bytes(res['torch_bytes_per_step'])}   first loss plait "
              f"{res['first_loss']['plait']:.5f} torch {res['first_loss']['torch']:.5f} "
              f"({'same' if res['same_loss'] else 'DIFFERENT'})", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all(r["same_loss"] for r in rows) else 1
