"""The configuration tree: one frozen dataclass per section, and the value rules of its keys.

Each component receives only its own section. `plait.config.checks` applies the rules,
`plait.config.load` reads TOML and `section.key=value` overrides into this tree.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "10m"
    # 0 means "the preset's value"; vocab_size 0 means "the data's vocabulary".
    vocab_size: int = 0
    n_layers: int = 0
    d_model: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    tie_embeddings: bool = False
    # a local transformers model directory (config.json, optional model.safetensors): trains that
    # causal LM instead of plait's GPT; the shape fields above must stay unset (docs/hf.md)
    hf: str = ""


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # empty: the Python standard library's sources of the running interpreter
    val_fraction: float = 0.01
    token_dtype: str = "uint16"  # for pre-tokenized .bin files
    cache_dir: str = ""  # empty: ~/.cache/plait
    # true: attention stays within each document of a packed sequence and RoPE positions restart
    # at each one (documents end with the prepared data's end-of-text id; needs a prepared folder)
    document_masking: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 0  # 0: world size / (replicas · tp · pp)
    tp: int = 1
    pp: int = 1
    # replicas of the whole dp × pp × tp layout, outermost in the rank order (one per node or group
    # of nodes): only this dimension crosses nodes; [compression] and [sync] then act on it
    replicas: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    microbatches: int = 0  # 0: global_batch / (dp · micro_batch)
    virtual_stages: int = 1
    bucket_mb: float = 25.0
    backend: str = "auto"  # auto | gloo | nccl
    # true: `plait train` plans the layout for its world size (plait.planner.auto) and the keys
    # above that the planner chooses must stay unset
    auto: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # 0: off
    warmup_steps: int = 5
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    scale_lr_with_batch: bool = False  # linear scaling rule: lr × global batch / reference_batch
    # the global batch (samples) optim.lr was tuned at; needed by scale_lr_with_batch
    reference_batch: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 80
    global_batch: int = 16
    micro_batch: int = 8
    seq_len: int = 128
    seed: int = 1337
    val_every: int = 20  # 0: only at the end
    val_samples: int = 64
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp32 master weights and gradient reduction)
    # fp16 only: dynamic loss scaling (plait.optim.loss_scale): the initial scale, and the
    # overflow-free steps after which it doubles (an overflow on any rank skips the step everywhere
    # and halves it)
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000
    # the floor: an overflow at this scale stops the run (gradients that are inf / nan at every
    # scale are not an overflow, and skipping would go on for ever)
    loss_scale_min: float = 1.0
    # none | full (each block) | selective (attention core only)
    activation_checkpointing: str = "none"
    compile: bool = False
    peak_flops: float = 0.0  # per rank; 0: measured (CPU) or looked up (GPU)
    threads: int = 0  # torch threads per rank; 0: cores / local ranks
    # CPU: treat subnormal floats as zero (torch.set_flush_denormal). Optimizer state and
    # activations drift into the subnormal range over a run and each operation on one then costs
    # ~100x: the 10m model's step slowed 1.8x by step 120 without it (docs/benchmarks.md)
    flush_denormal: bool = True
    timeout_s: float = 600.0
    # 0: off; else grow the global batch from one micro-batch over this many samples
    batch_rampup_samples: int = 0
    # planned stops (plait.checkpoint): save a checkpoint and exit 0 after this many steps / minutes
    # of this session
    exit_after_steps: int = 0  # 0: off
    exit_after_minutes: float = 0.0  # 0: off
    # non-finite loss / gradient norm: steps are skipped; this many in a row stop the run
    max_bad_steps: int = 5
    # debug (fault-tolerance tests): `fault` hits global rank fault_rank at step fault_step
    # (1-based). kill: SIGKILL mid-step, once per run folder; kill_in_save: SIGKILL inside that
    # step's checkpoint save, after the data files and before the manifest; skip_collective: the
    # rank skips the step's agreement all-reduce (the others time out);
    # nan: its loss is NaN for fault_steps steps.
    fault: str = "none"
    fault_rank: int = 0
    fault_step: int = 0
    fault_steps: int = 1


@dataclass(frozen=True)
class CompressionConfig:
    # none | fp16 | bf16 | int8 | topk | sign | powersgd (data-parallel gradients only; the
    # exchange across replicas when parallel.replicas > 1, dp inside a replica staying dense)
    name: str = "none"
    rank: int = 4  # powersgd
    topk_fraction: float = 0.01  # topk: share of each tensor's entries sent
    # sign: elements per fp32 scale, a multiple of 8 (0: one scale per rank's shard)
    sign_chunk: int = 256
    # residuals of the biased compressors (int8, topk, sign, powersgd, onebit_adam)
    error_feedback: bool = True
    # dense all-reduce steps before powersgd / optim.name=onebit_adam compress
    warmup_steps: int = 10


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # 0: off
    keep: int = 2  # complete checkpoints kept (0: all)
    dir: str = ""  # empty: RUN_DIR/checkpoints
    # 0: off; else also save when this many minutes passed since the last save
    every_minutes: float = 0.0
    # `checkpoint.async`: write in a background thread while training goes on
    async_save: bool = False
    # a checkpoint or a safetensors export: initial weights of a run that has none to resume
    init_from: str = ""


@dataclass(frozen=True)
class LogConfig:
    run_dir: str = ""  # empty: runs/<date>-<time>
    progress: bool = True
    plots: bool = True
    # event files in RUN_DIR/tensorboard when the tensorboard package is installed
    tensorboard: bool = True


@dataclass(frozen=True)
class SyncConfig:
    """How replicas keep in step: plait.sync. H = every, τ = delay, P = fragments. The replicas
    are the dp ranks, or with parallel.replicas > 1 the replicas of the whole layout (`rep`)."""

    strategy: str = "every_step"  # every_step | local_sgd | diloco | streaming_diloco | delayed
    every: int = 50  # H: inner steps between syncs (local_sgd, diloco, streaming_diloco)
    outer_lr: float = 0.7  # diloco / streaming_diloco outer SGD (Nesterov) learning rate
    outer_momentum: float = 0.9  # 0: plain outer SGD
    fragments: int = 4  # P (streaming_diloco): fragments synced on staggered offsets
    delay: int = 1  # τ: steps an exchange overlaps (streaming_diloco, delayed)
    alpha: float = 0.5  # streaming_diloco: local weight when mixing: α·local + (1−α)·global
    # outer-gradient transport (diloco, streaming_diloco): none | fp16 | int8 | fp4
    quantize: str = "none"
    # debug (straggler runs): this global rank's steps take slow_factor × as long
    slow_rank: int = -1
    slow_factor: float = 2.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": ("tiny", "10m", "124m", "350m", "1.3b"),
    "data.token_dtype": ("uint16", "uint32"),
    "parallel.schedule": ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "optim.name": ("adamw", "sgd", "lamb", "lars", "onebit_adam"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("fp32", "bf16", "fp16"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "compression.name": ("none", "fp16", "bf16", "int8", "topk", "sign", "powersgd"),
    "sync.strategy": ("every_step", "local_sgd", "diloco", "streaming_diloco", "delayed"),
    "sync.quantize": ("none", "fp16", "int8", "fp4"),
    "train.fault": ("none", "kill", "kill_in_save", "skip_collective", "nan"),
}

POSITIVE = {
    "train.steps", "train.global_batch", "train.micro_batch", "train.seq_len", "parallel.tp",
    "parallel.pp", "parallel.replicas", "parallel.virtual_stages", "train.log_every",
    "train.timeout_s", "parallel.bucket_mb", "compression.rank", "train.max_bad_steps",
    "train.loss_scale_init", "train.loss_scale_growth_interval", "train.loss_scale_min",
}
NON_NEGATIVE = {
    "parallel.dp", "parallel.zero", "parallel.microbatches", "model.vocab_size", "model.n_layers",
    "model.d_model", "model.n_heads", "model.n_kv_heads", "model.ffn_hidden", "train.val_every",
    "train.val_samples", "optim.lr", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps",
    "checkpoint.every", "checkpoint.keep", "checkpoint.every_minutes", "train.exit_after_steps",
    "train.exit_after_minutes", "train.fault_step", "train.fault_steps", "train.peak_flops",
    "train.threads", "optim.eps", "optim.min_lr_ratio", "optim.reference_batch",
    "train.batch_rampup_samples", "compression.warmup_steps", "compression.sign_chunk",
}


def suggest(name: str, options) -> str:
    """' (did you mean X?)' for the closest of `options`, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
