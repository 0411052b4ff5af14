"""`plait bench zero`: plait's ZeRO beside torch's peers, and what fits per rank in a memory cap.

Per world size (every rank data parallel): the same GPT (same weights), the same batch per rank,
AdamW, fp32. Contestants, all in one process per rank, repetitions alternating over all of them:
  plait_z0          plait's plain data parallelism (the reference for what ZeRO saves)
  plait_z1, z2      plait's ZeRO-1 / ZeRO-2 (reduce-scatter in backward, all-gather after the step)
  plait_z3          plait's ZeRO-3: FSDP2 through `parallelize()` (exact sums, byte records)
  torch_zero1       DDP (gradient_as_bucket_view) + torch's ZeroRedundancyOptimizer over AdamW
  fsdp2_noreshard   FSDP2, reshard_after_forward=False (ZeRO-2-like), blocks + root
  fsdp2             FSDP2 as it comes (reshard_after_forward=True): ZeRO-3
Each repetition times `--steps` optimizer steps (after one untimed warm-up step per contestant);
reported: the median over repetitions of the mean step time and the ratios plait_z1 / torch_zero1,
plait_z1 / fsdp2_noreshard, plait_z2 / the same two, plait_z3 / fsdp2 (below 1: plait is faster).

Memory per rank. `model_state_bytes`: parameters + gradients + optimizer state, measured from the
tensors each contestant holds right after its first optimizer step (distinct storages,
plait.data_parallel.zero_memory). `peak_memory_bytes`: a separate pass per contestant in fresh
processes running only it for two steps: the CUDA allocator's peak on GPU, the increase of the
process's peak RSS over its value before the model was built on CPU.

What fits (method). With a cap of M bytes per rank (`--mem-cap-gb`), ZeRO stage k and a GPT
preset of Ψ parameters: model state S_k = b_k·Ψ, where b_k = plait_zk's measured model-state bytes
per parameter at this dp size (16 for k = 0; ZeRO shrinks it with dp); activations A bytes per
sequence of `--seq-len` tokens, the distinct storages autograd saves in one forward + loss of that
preset (saved-tensor hooks, parameters excluded, fp32 on CPU), measured on real 1- and 2-layer
copies and extrapolated to the preset's depth (blocks are identical; checked against the whole
benchmarked model in the JSON). Largest micro-batch = ⌊(M − S_k)/A⌋ (0: does not
fit); largest model = the biggest preset with room for one sequence, and M/b_k parameters as the
bound with no activations at all. Not counted: temporary buffers (all-gather / reduce-scatter
staging, unsharded FSDP units, the allocator's fragmentation), so real limits are somewhat lower.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

import torch

NAMES = ("plait_z0", "plait_z1", "plait_z2", "plait_z3", "torch_zero1", "fsdp2_noreshard", "fsdp2")
RATIOS = (("plait_z1", "torch_zero1"), ("plait_z1", "fsdp2_noreshard"), ("plait_z2", "torch_zero1"),
          ("plait_z2", "fsdp2_noreshard"), ("plait_z3", "fsdp2"))


def _contestant(name: str, opts: dict, mesh, dev_mesh):
    """(step, model-state bytes, zero_grad) functions of one contestant,
    built from the shared weights."""
    from plait.config import ParallelConfig
    from plait.data_parallel.zero_memory import memory_breakdown, optimizer_bytes, storage_bytes
    from plait.models import GPT, build_config, lm_loss
    from plait.parallelize import ParallelOptions, parallelize

    cfg = build_config(opts["preset"], max_seq_len=max(opts["seq_len"], 256))
    torch.manual_seed(0)
    model = GPT(cfg).to(mesh.device)
    n = mesh.dp_size
    g = torch.Generator().manual_seed(100 + mesh.rank)
    ids = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["seq_len"] + 1),
                        generator=g).to(mesh.device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    if name.startswith("plait"):
        par = ParallelConfig(dp=n, zero=int(name[-1]), bucket_mb=opts["bucket_mb"])
        pm, po = parallelize(model, adamw, mesh, ParallelOptions(parallel=par))
        # plait's contract: each rank divides its summed loss by the global count
        tokens = x.numel() * n

        def step():
            (lm_loss(pm(x), y, reduction="sum") / tokens).backward()
            po.step()

        return step, lambda: memory_breakdown(pm, po)["model_state"], po.zero_grad
    if name == "torch_zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, bucket_cap_mb=opts["bucket_mb"], gradient_as_bucket_view=True)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
        # the local optimizer over this rank's parameters
        state = lambda: opt.optim.state  # noqa: E731
    else:
        from torch.distributed.fsdp import fully_shard

        raf = name == "fsdp2"
        for b in model.blocks:
            fully_shard(b, mesh=dev_mesh, reshard_after_forward=raf)
        net = fully_shard(model, mesh=dev_mesh, reshard_after_forward=raf)
        opt = adamw(net.parameters())
        state = lambda: opt.state  # noqa: E731

    def step():
        lm_loss(net(x), y).backward()  # the peers average over dp: the same gradient as plait's sum
        opt.step()

    def measure():
        params = list(net.parameters())
        elem, scalar = optimizer_bytes(state())
        return storage_bytes(params) + storage_bytes([p.grad for p in params]) + elem + scalar

    return step, measure, lambda: opt.zero_grad(set_to_none=True)


def _timing_worker(opts: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from plait.mesh import Mesh

    mesh = Mesh.build(dp=dist.get_world_size())
    dev_mesh = init_device_mesh(mesh.device.type, (mesh.dp_size,))
    runs, state_bytes = {}, {}
    for name in opts["names"]:
        step, measure, zero_grad = _contestant(name, opts, mesh, dev_mesh)
        step()  # warm-up: lazy initialization, first allocations
        state_bytes[name] = measure()
        zero_grad()
        runs[name] = (step, zero_grad)
    sync = ((lambda: torch.cuda.synchronize(mesh.device)) if mesh.device.type == "cuda"
            else (lambda: None))
    times = {k: [] for k in runs}
    for _ in range(opts["reps"]):
        for name, (step, zero_grad) in runs.items():
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                step()
                zero_grad()
            sync()
            times[name].append((time.perf_counter() - t0) / opts["steps"])
    return {"times": times, "model_state_bytes": state_bytes, "device": str(mesh.device)}


def _peak_worker(opts: dict, name: str) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from plait.mesh import Mesh

    mesh = Mesh.build(dp=dist.get_world_size())
    dev_mesh = init_device_mesh(mesh.device.type, (mesh.dp_size,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mesh.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(mesh.device)
    step, _, zero_grad = _contestant(name, opts, mesh, dev_mesh)
    for _ in range(2):
        step()
        zero_grad()
    if mesh.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(mesh.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def saved_bytes(cfg, seq_len: int, device) -> int:
    """Bytes autograd saves in one sequence's forward + loss:
    distinct storages, parameters excluded."""
    from plait.models import GPT, lm_loss

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), device=device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
    del loss
    return total[0]


def activation_bytes(preset: str, seq_len: int, device="cpu") -> int:
    """Activation bytes per sequence of a preset, from real 1- and 2-layer copies (same width,
    heads, vocabulary): blocks are identical, so A(L) = A(1) + (L − 1)·(A(2) − A(1)) exactly."""
    from plait.models import build_config

    cfg = build_config(preset, max_seq_len=max(seq_len, 256))
    one = saved_bytes(build_config(preset, max_seq_len=cfg.max_seq_len, n_layers=1), seq_len,
                      device)
    two = saved_bytes(build_config(preset, max_seq_len=cfg.max_seq_len, n_layers=2), seq_len,
                      device)
    return one + (cfg.n_layers - 1) * (two - one)


def fits(state_per_param: dict[str, float], cap: float, seq_len: int) -> dict:
    """The table of the module docstring: per preset and ZeRO stage,
    the largest micro-batch in `cap`."""
    from plait.models import GPT, build_config, count_params
    from plait.models.gpt import PRESETS

    rows = {}
    for preset in PRESETS:
        with torch.device("meta"):
            psi = count_params(GPT(build_config(preset, max_seq_len=max(seq_len, 256))))
        act = activation_bytes(preset, seq_len)  # on CPU: plain SDPA's saved tensors
        rows[preset] = {"params": psi, "activation_bytes_per_seq": act,
                        "max_micro_batch": {k: max(0, int((cap - b * psi) // act))
                                            for k, b in state_per_param.items()}}
    largest = {k: max((p for p in rows if rows[p]["max_micro_batch"][k] > 0),
                      key=lambda p: rows[p]["params"], default=None) for k in state_per_param}
    bound = {k: int(cap // b) for k, b in state_per_param.items()}
    return {"presets": rows, "largest_preset": largest, "max_params_no_activations": bound}


def add_arguments(ap) -> None:
    """plait bench zero: ZeRO-1/2/3 beside ZeroRedundancyOptimizer and FSDP2."""
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    ap.add_argument("--preset", default="10m", help="model preset")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--mem-cap-gb", type=float, default=80.0,
                    help="memory per rank for the what-fits table")
    ap.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    from plait.testing import run_ranks
    from plait.train.metrics import human_bytes

    world_sizes = [int(r) for r in str(args.ranks).split(",") if r]
    batch = args.batch or 8
    cap = float(getattr(args, "mem_cap_gb", 80.0)) * 2**30
    threads = lambda n: max(1, (os.cpu_count() or 1) // n)  # noqa: E731
    rows = []
    for n in world_sizes:
        opts = {"preset": args.preset, "batch": batch, "seq_len": args.seq_len,
                "bucket_mb": args.bucket_mb, "reps": args.reps, "steps": args.steps, "names": NAMES}
        print(f"bench zero: {n} gloo ranks, preset {args.preset}, {batch}×{args.seq_len} tokens "
              f"per rank, {args.reps} alternating reps × {args.steps} steps of {len(NAMES)} "
              "contestants", flush=True)
        res = run_ranks(_timing_worker, n, args=(opts,), timeout=3600, threads=threads(n))[0]
        med = {k: statistics.median(v) for k, v in res["times"].items()}
        peaks = {name: max(run_ranks(_peak_worker, n, args=(opts, name), timeout=3600,
                                     threads=threads(n)))
                 for name in NAMES}
        from plait.models import GPT, build_config, count_params

        with torch.device("meta"):
            psi = count_params(GPT(build_config(args.preset, max_seq_len=max(args.seq_len, 256))))
        per_param = {f"zero{k}": res["model_state_bytes"][f"plait_z{k}"] / psi for k in range(4)}
        row = {"ranks": n, "preset": args.preset, "params": psi, "batch_per_rank": batch,
               "seq_len": args.seq_len, "bucket_mb": args.bucket_mb, "device": res["device"],
               "torch": torch.__version__, "threads_per_rank": threads(n), "step_s": med,
               "times": res["times"], "ratio": {f"{a}/{b}": med[a] / med[b] for a, b in RATIOS},
               "model_state_bytes": res["model_state_bytes"],
               "model_state_bytes_per_param": per_param,
               "peak_memory_bytes": peaks, "mem_cap_bytes": cap,
               # the extrapolation of the fit table, checked against the whole benchmarked model
               "activation_bytes_per_seq_measured": saved_bytes(build_config(
                   args.preset, max_seq_len=max(args.seq_len, 256)), args.seq_len, "cpu"),
               "fit": fits(per_param, cap, args.seq_len)}
        rows.append(row)
        for name in NAMES:
            state = human_bytes(res["model_state_bytes"][name])
            print(f"  {name:16s} {med[name] * 1e3:9.1f} ms/step  model state {state}  peak "
                  f"{human_bytes(peaks[name])}",
                  flush=True)
        print("  " + "   ".join(f"{k} {v:.3f}" for k, v in row["ratio"].items()), flush=True)
        f = row["fit"]
        print(f"  fits in {human_bytes(cap)} per rank (max micro-batch of {args.seq_len} tokens; "
              "largest preset): " + "   ".join(
                  f"ZeRO-{k[-1]}: {f['largest_preset'][k]} "
                  f"({', '.join(str(r['max_micro_batch'][k]) for r in f['presets'].values())})"
                  for k in per_param), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
        print(f"wrote {args.json}")
    return 0
