"""Peak FLOP/s of the device a rank runs on, for MFU.

GPUs: the dense bf16 tensor-core peak from the vendor's sheet. CPUs have no such sheet: the peak is
measured once per run by a short fp32 matmul benchmark on this rank's threads (run on every rank
at the same time, so each measures its own share of the cores).
"""

from __future__ import annotations

import time

import torch

GPU_BF16_PEAK = {  # dense, no sparsity
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 512,
                         seconds: float = 0.3) -> float:
    # a generator of its own: measuring must not move the global RNG
    # (a resumed run restores it first)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = 0.0
    for _ in range(3):  # warm-up
        a @ b
    # the deadline starts after the warm-up and at least one timed round runs: on a loaded machine
    # the warm-up alone can outlast `seconds`, and a peak of 0 would divide MFU by zero
    deadline = time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dt)
    return best


def peak_flops(device: torch.device, dtype: str = "fp32", configured: float = 0.0) -> float:
    """FLOP/s one rank can do at best: configured, the GPU's sheet value, or measured."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in GPU_BF16_PEAK.items():
            if key in name and dtype in ("bf16", "fp16"):  # the same dense tensor-core peak
                return v
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}
        return measure_matmul_flops(device, half.get(dtype, torch.float32), n=4096, seconds=1.0)
    return measure_matmul_flops(device)
