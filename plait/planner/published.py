"""Published large runs, as data: model shape, cluster, layout, and the per-GPU TFLOP/s reported.

`compare()` predicts each run's step with the planner and converts it to TFLOP/s per GPU under
the paper's own FLOP count. Knobs a paper does not state are left to the planner (the fastest
prediction among the choices plait allows) and listed per run. Memory is not required to fit:
plait keeps fp32 master weights and gradients where these engines kept 16-bit copies, so plait's
footprint is not theirs. GPT-style MLPs (4h, GELU) are represented by plait's SwiGLU with
F = 8h/3 (rounded to a multiple of tp), which has the same parameters and FLOPs.

One calibration per GPU type, from the cluster profiles (plait/planner/clusters): A100 matmul
efficiency 0.80, H100 0.79; nothing is tuned per run. One engine fact per run: BLOOM and MT-NLG
ran DeepSpeed's pipeline engine, whose TrainSchedule reduces gradients over dp after the last
pipeline step (deepspeed/runtime/pipe/schedule.py: ReduceTiedGrads, ReduceGrads, OptimizerStep at
step total_steps − 1), where plait starts each chunk's exchange from its last backward; it also
sends 1/tp of each activation between stages (`pipe_partitioned`, on by default), as plait does.

Sources (read through the project's search tool, cited in docs/planner.md):
- Llama 3 405B: The Llama 3 Herd of Models (arXiv 2407.21783) Table 4; shape from its Table 3.
- BLOOM-176B: BigScience's tr11-176B-ml.slurm (TP 4, PP 12, micro-batch 2, global batch 2048,
  --checkpoint-activations, bf16 optimizer = ZeRO-1), 48 nodes × 8 A100-80GB with 4 × 100 Gb/s
  Omni-Path per node (BLOOM paper, arXiv 2211.05100); "about 150 TFLOPs" (BigScience's model
  card), counted as 8·N per token (bigscience/math README: hardware FLOPs with recomputation).
- OPT-175B: arXiv 2205.01068: 992 A100-80GB, FSDP + Megatron tensor parallelism, 147 TFLOP/s
  per GPU, batch 2M tokens; 124 hosts × 8-way tensor parallelism (metaseq's
  projects/OPT/download_opt175b.md); the paper does not say how it counts FLOPs: taken as
  hardware FLOPs with recomputation (Megatron's equation 3), as its contemporaries did.
- Megatron-Turing NLG 530B: arXiv 2201.11990 §2.4: TP 8 × PP 35, global batch 1920, 280 / 350 /
  420 DGX A100 nodes, 60.1 / 50.2 / 44.4 s per iteration = 126 / 121 / 113 TFLOP/s per GPU
  (Megatron's equation 3, recomputation included).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from plait.planner.cluster import load_cluster
from plait.planner.layout import AC_MODES, Layout
from plait.planner.search import MAX_VIRTUAL, Job, Planner, divisors
from plait.planner.shape import ModelShape


@dataclass(frozen=True)
class Run:
    name: str
    shape: ModelShape
    seq_len: int
    global_batch: int
    cluster: str
    inter_node_gbps: float  # the run's network per GPU (overrides the profile's)
    dp: int
    tp: int
    pp: int
    reported_tflops: float
    counting: str  # model | params8 | megatron
    zero: int = 1
    micro_batch: int = 0  # 0: the planner's choice
    schedules: tuple = ("1f1b",)
    ac: tuple = AC_MODES
    sp: tuple = (False, True)
    notes: str = ""
    # the engine's pipeline reduces gradients after the flush (DeepSpeed's PipelineEngine, which
    # BLOOM and MT-NLG ran: TrainSchedule issues ReduceGrads at its last step); False: as plait
    deepspeed_pipe: bool = False

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp


LLAMA3 = ModelShape(126, 16384, 128, 8, 53248, 128256, name="llama3-405b")
BLOOM = ModelShape(70, 14336, 112, 112, 38228, 250880, name="bloom-176b")
OPT = ModelShape(96, 12288, 96, 96, 32768, 50272, name="opt-175b")
MTNLG = ModelShape(105, 20480, 128, 128, 54616, 51200, name="mt-nlg-530b")

RUNS = [
    Run(
        "Llama 3 405B, 8,192 H100",
        LLAMA3,
        8192,
        2048,
        "dgx-h100",
        400,
        64,
        8,
        16,
        430.0,
        "model",
        zero=2,
        micro_batch=1,
        schedules=("interleaved_1f1b",),
        ac=("none",),
        notes="no checkpointing at 8K (paper); virtual stages and SP: planner",
    ),
    Run(
        "Llama 3 405B, 16,384 H100",
        LLAMA3,
        8192,
        2048,
        "dgx-h100",
        400,
        128,
        8,
        16,
        400.0,
        "model",
        zero=2,
        micro_batch=1,
        schedules=("interleaved_1f1b",),
        ac=("none",),
        notes="as above, DP 128 (16 sequences per replica)",
    ),
    Run(
        "BLOOM-176B, 384 A100",
        BLOOM,
        2048,
        2048,
        "dgx-a100-80gb",
        50,
        8,
        4,
        12,
        150.0,
        "params8",
        zero=1,
        micro_batch=2,
        schedules=("1f1b",),
        ac=("full",),
        sp=(False,),
        notes="DeepSpeed 1F1B, full checkpointing, 50 Gb/s per GPU (4 × 100 Gb/s per node)",
        deepspeed_pipe=True,
    ),
    Run(
        "OPT-175B, 992 A100",
        OPT,
        2048,
        992,
        "dgx-a100-80gb",
        200,
        124,
        8,
        1,
        147.0,
        "megatron",
        zero=3,
        schedules=("1f1b",),
        ac=("full",),
        sp=(False,),
        notes="FSDP (ZeRO-3) × TP 8, 8 sequences per replica; micro-batch: planner; "
        "network assumed 200 Gb/s",
    ),
    Run(
        "MT-NLG 530B, 2,240 A100",
        MTNLG,
        2048,
        1920,
        "dgx-a100-80gb",
        200,
        8,
        8,
        35,
        126.0,
        "megatron",
        zero=1,
        micro_batch=1,
        schedules=("1f1b",),
        ac=("full",),
        sp=(False,),
        notes="DeepSpeed 1F1B, 280 nodes",
        deepspeed_pipe=True,
    ),
    Run(
        "MT-NLG 530B, 2,800 A100",
        MTNLG,
        2048,
        1920,
        "dgx-a100-80gb",
        200,
        10,
        8,
        35,
        121.0,
        "megatron",
        zero=1,
        micro_batch=1,
        schedules=("1f1b",),
        ac=("full",),
        sp=(False,),
        notes="350 nodes",
        deepspeed_pipe=True,
    ),
    Run(
        "MT-NLG 530B, 3,360 A100",
        MTNLG,
        2048,
        1920,
        "dgx-a100-80gb",
        200,
        12,
        8,
        35,
        113.0,
        "megatron",
        zero=1,
        micro_batch=1,
        schedules=("1f1b",),
        ac=("full",),
        sp=(False,),
        notes="420 nodes",
        deepspeed_pipe=True,
    ),
]


def counted_flops_per_token(run: Run, ac: str) -> float:
    """FLOPs per token as the paper counts them."""
    sh, s = run.shape, run.seq_len
    if run.counting == "model":
        return sh.flops_per_token(s)
    if run.counting == "params8":  # 2 · (1 forward + 2 backward + 1 recomputed forward) · N
        return 8.0 * sh.n_params()
    # Megatron (Narayanan et al. 2021, eq. 3): 72 (96 recomputing) · l·h² · (1 + s/6h + V/16lh)
    f = 96 if ac == "full" else 72
    L, h, V = sh.n_layers, sh.d_model, sh.vocab
    return f * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))


def predict(run: Run) -> dict:
    cluster = replace(load_cluster(run.cluster), inter_node_gbps=run.inter_node_gbps)
    job = Job(run.shape, run.seq_len, run.global_batch, "bf16",
              dp_overlap_under_pp=not run.deepspeed_pipe)
    planner = Planner(job, cluster, run.world)
    per_dp = run.global_batch // run.dp
    mbs = [run.micro_batch] if run.micro_batch else divisors(per_dp)
    best = None
    for mb, sched, ac, sp in itertools.product(mbs, run.schedules, run.ac, run.sp):
        vs = range(2, MAX_VIRTUAL + 1) if sched == "interleaved_1f1b" else (1,)
        for v in vs:
            lay = Layout(
                run.dp, run.tp, run.pp, run.zero, mb, sched, v, ac, sp and run.tp > 1
            ).normalized()
            if planner.violations(lay):
                continue
            r = planner.evaluate(lay)
            if best is None or r["step_s"] < best["step_s"]:
                best = r
    tokens = run.global_batch * run.seq_len
    tflops = (
        counted_flops_per_token(run, best["activation_checkpointing"])
        * tokens
        / best["step_s"]
        / run.world
    )
    return {
        "run": run.name,
        "reported_tflops": run.reported_tflops,
        "predicted_tflops": tflops / 1e12,
        "error": tflops / 1e12 / run.reported_tflops - 1,
        "step_s": best["step_s"],
        "mfu": best["mfu"],
        "layout": Layout(**{k: best[k] for k in Layout.__dataclass_fields__}).short(),
        "bubble": best["time"]["bubble"],
        "counting": run.counting,
        "notes": run.notes,
        "time": best["time"],
    }


def compare(runs: list[Run] | None = None) -> list[dict]:
    return [predict(r) for r in (runs or RUNS)]


def table(rows: list[dict]) -> str:
    lines = [
        "| run | layout (planner's free knobs filled) | reported TFLOP/s/GPU | predicted | error | "
        "predicted step | bubble |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['layout']} | {r['reported_tflops']:.0f} | "
            f"{r['predicted_tflops']:.0f} | "
            f"{100 * r['error']:+.1f}% | {r['step_s']:.1f} s | {100 * r['bubble']:.1f}% |"
        )
    return "\n".join(lines)
