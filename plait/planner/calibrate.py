"""`plait plan --calibrate`: measure this machine and write the `local` cluster profile.

What is measured (about a minute on two cores), each with torch on this CPU:
- matrix multiply throughput by shape: fp32 (m × k)·(k × n) for m, n, k in {32, 128, 512, 2048},
  on one thread and on all cores (the planner interpolates log(rate) between grid points);
- causal attention (SDPA) forward + backward throughput by sequence length and head dim;
- memory bandwidth: bytes read + written per second by `add` over 16M floats, one thread;
- AdamW (foreach) step cost: seconds per element (32 tensors, 8M elements) and per tensor (200
  tensors of 64 elements), one thread;
- the effective bandwidth of plait's element-wise passes, from a reference block's measured time
  (`elementwise_gbs`);
- framework time of one GPT block's forward + backward with nothing to compute (width 8, two
  tokens): the per-block overhead of eager PyTorch and autograd;
- gloo between two local processes: all-reduce time for 4 B .. 16 MB against the ring formula at
  two ranks, 2α + n/B: the link's latency α (small messages) and bandwidth B (large ones);
- peak: a 512³ fp32 matrix multiply on one thread (what plait.flops measures for MFU), per core.

The profile describes one node of `cores` cores on which any number of ranks may run (8 slots,
the planner shares the cores between them), with the machine's memory split over the slots.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from plait.planner.cluster import Cluster, local_profile_path, to_toml

GRID = (32, 128, 512, 2048)
SLOTS = 8


def _rate(fn, work: float, budget: float = 0.05, least: int = 5) -> float:
    """Rate of the fastest of repeated calls: on a shared machine other work only ever adds time,
    so the fastest call is what this machine does undisturbed (operands are made cold by the
    callers where that matters)."""
    fn()
    times, deadline = [], time.perf_counter() + budget
    while len(times) < least or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return work / min(times)


def matmul_table(threads: int) -> list[tuple]:
    """Rates of fp32 GEMMs by shape, cycling through copies of the operands (4 to 64, about 32 MiB)
    so that, as in a model, large operands come from memory rather than cache."""
    torch.set_num_threads(threads)
    rows = []
    for m in GRID:
        for n in GRID:
            for k in GRID:
                copies = max(4, min(64, -(-(32 << 20) // (4 * (m * k + k * n)))))
                ops = [(torch.randn(m, k), torch.randn(k, n)) for _ in range(copies)]
                it = iter(range(1 << 30))

                def run(ops=ops, it=it):
                    a, b = ops[next(it) % len(ops)]
                    return a @ b

                rows.append((threads, m, n, k, _rate(run, 2.0 * m * n * k, 0.03)))
    return rows


def attention_table(threads: int) -> list[tuple]:
    """Causal SDPA forward + backward, (8 heads × s × E): FLOPs counted as the MFU convention counts
    them (12·s²·E per head, the masked half included) per second, by sequence length and head
    dim."""
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    rows = []
    for s in (64, 256, 1024):
        for e in (32, 64, 128):
            q, k, v = (torch.randn(1, 8, s, e, requires_grad=True) for _ in range(3))

            def run(q=q, k=k, v=v):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

            rows.append((threads, s, e, _rate(run, 12.0 * 8 * s * s * e, 0.05, least=3)))
    return rows


def memory_gbs() -> float:
    """Bytes read + written per second by `add` over 16M floats (beyond the caches), one thread."""
    torch.set_num_threads(1)
    a, b, c = torch.randn(16 << 20), torch.randn(16 << 20), torch.empty(16 << 20)
    return _rate(lambda: torch.add(a, b, out=c), 12.0 * (16 << 20), 0.3) / 1e9


def elementwise_gbs(partial: Cluster) -> float:
    """The effective bandwidth of plait's element-wise passes, from a reference block (width 256,
    4 heads, ffn 768, 2 × 128 tokens, fp32, one thread): its measured forward + backward minus what
    the model gives its GEMMs, attention core and framework overhead (the tables just measured),
    divided into the bytes the model counts for it. Eager element-wise ops on strided, mid-sized
    tensors run far below a streaming `add`."""
    from plait.models.gpt import GPT, GPTConfig
    from plait.planner.compute import Rates, elementwise_bytes
    from plait.planner.shape import ModelShape

    torch.set_num_threads(1)
    b, s, d, f = 2, 128, 256, 768
    m = GPT(GPTConfig(vocab_size=16, n_layers=1, n_heads=4, d_model=d, ffn_hidden=f, max_seq_len=s))
    blk, cos, sin = m.blocks[0], m.rope_cos[:s], m.rope_sin[:s]
    x = torch.randn(b, s, d, requires_grad=True)
    measured = 1.0 / _rate(lambda: blk(x, cos, sin).sum().backward(), 1.0, 0.5)
    r = Rates(partial, 1, 1)
    n = b * s
    lin = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
    gemm = sum(r.gemm(n, o, i) + r.gemm(n, i, o) + r.gemm(o, i, n) for i, o in lin)
    core_f, core_b = r.attention(b * 4, s, d // 4)
    rest = measured - gemm - core_f - core_b - partial.block_overhead_s
    ew = 3 * elementwise_bytes(ModelShape(1, d, 4, 4, f, 16), b, s, 1, False, "fp32")
    return ew / max(rest, measured / 20) / 1e9


def adam_costs() -> tuple[float, float]:
    torch.set_num_threads(1)

    def step_time(params) -> float:
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        return best

    # 32 tensors, 8M elements: parameters, gradients and moments (128 MB) do not fit in cache
    big = step_time([torch.nn.Parameter(torch.randn(256 << 10)) for _ in range(32)])
    small = step_time([torch.nn.Parameter(torch.randn(64)) for _ in range(200)])
    per_tensor = small / 200
    return max(0.0, (big - 32 * per_tensor) / (8 << 20)), per_tensor


def block_overhead() -> float:
    from plait.models.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    m = GPT(
        GPTConfig(
            vocab_size=16,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            d_model=8,
            ffn_hidden=16,
            max_seq_len=4,
        )
    )
    blk, cos, sin = m.blocks[0], m.rope_cos[:2], m.rope_sin[:2]
    x = torch.randn(1, 2, 8, requires_grad=True)

    def run():
        blk(x, cos, sin).sum().backward()

    for _ in range(10):
        run()
    best = float("inf")
    for _ in range(50):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def _gloo_worker(sizes: list[int]) -> list[float]:
    import torch.distributed as dist

    out = []
    for n in sizes:
        t = torch.zeros(max(1, n // 4))
        for _ in range(3):
            dist.all_reduce(t)
        best = float("inf")
        for _ in range(20 if n < (1 << 20) else 5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out


def gloo_link() -> tuple[float, float]:
    """(latency µs, Gbit/s) of the ring formula at two ranks, t = 2α + n/B: α from the smallest
    messages (the fastest of 4 B .. 64 KB, halved), B from the largest (n / (t − 2α), median)."""
    from plait.testing import run_ranks

    sizes = [4, 1 << 12, 1 << 16, 4 << 20, 8 << 20, 16 << 20]
    times = run_ranks(_gloo_worker, 2, args=(sizes,), timeout=300)[0]
    alpha = min(times[:3]) / 2
    rates = sorted(n / max(t - 2 * alpha, 1e-9) for n, t in zip(sizes[3:], times[3:]))
    return alpha * 1e6, 8 * rates[len(rates) // 2] / 1e9


def calibrate(path: str | Path | None = None, log=print) -> Cluster:
    cores = os.cpu_count() or 1
    log(f"plait plan --calibrate: measuring this machine ({cores} cores)")
    rows, attn = [], []
    for t in sorted({1, cores}):
        log(f"  matmul and attention throughput by shape, {t} thread(s)")
        rows += matmul_table(t)
        attn += attention_table(t)
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    peak = _rate(lambda: a @ a, 2.0 * 512**3, 0.3)
    mem = memory_gbs()
    per_elem, per_tensor = adam_costs()
    over = block_overhead()
    partial = Cluster(name="local", nodes=1, gpus_per_node=SLOTS, gpu_memory_gb=1.0,
                      peak_tflops=1.0, intra_node_gbps=1.0, inter_node_gbps=1.0,
                      intra_node_latency_us=1.0, inter_node_latency_us=1.0, cores=cores,
                      matmul_table=tuple(rows), attention_table=tuple(attn), block_overhead_s=over,
                      elementwise_gbs=mem)
    ew = elementwise_gbs(partial)
    log(
        f"  peak {peak / 1e9:.1f} GFLOP/s per core, memory {mem:.1f} GB/s, "
        f"element-wise {ew:.1f} GB/s, "
        f"AdamW {per_elem * 1e9:.2f} ns/elem "
        f"+ {per_tensor * 1e6:.1f} µs/tensor, block overhead {over * 1e3:.2f} ms"
    )
    log("  gloo all-reduce between two processes")
    lat, gbps = gloo_link()
    log(f"  gloo: latency {lat:.0f} µs, {gbps:.2f} Gbit/s")
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    stamp = f"plait plan --calibrate, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}"
    c = replace(partial, gpu_memory_gb=round(mem_gb / SLOTS, 2), peak_tflops=peak / 1e12,
                intra_node_gbps=gbps, inter_node_gbps=gbps, intra_node_latency_us=lat,
                inter_node_latency_us=lat, matmul_efficiency=1.0, memory_bandwidth_gbs=mem,
                comm_overlap=False, memory_reserve_gb=0.3, adam_s_per_elem=per_elem,
                adam_s_per_tensor=per_tensor, elementwise_gbs=ew, reduce_scatter_as_allreduce=True,
                source=stamp)
    out = Path(path) if path else local_profile_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_toml(c))
    log(f"wrote {out}")
    return c
