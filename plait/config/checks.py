"""Checks of a loaded configuration: values, combinations across sections, and the layout.

`validate(cfg)` needs nothing but the config and runs when it is loaded; `validate_layout(cfg,
world_size)` adds what needs the world size. Each error names the key and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from plait.config.schema import (
    CHOICES,
    NON_NEGATIVE,
    POSITIVE,
    CompressionConfig,
    Config,
    ParallelConfig,
    SyncConfig,
    suggest,
)
from plait.errors import ConfigError
from plait.pipeline.schedules import ScheduleError
from plait.pipeline.schedules import check as check_schedule


def check_choice(key: str, value) -> None:
    """ConfigError unless `value` is one of CHOICES[key]
    (e.g. check_choice("train.dtype", "bf16"))."""
    choices = CHOICES[key]
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}: choose one of "
                          f"{', '.join(choices)}{suggest(str(value), choices)}")


def check_options(parallel: ParallelConfig, compression: CompressionConfig | None,
                  sync: SyncConfig | None, *, dtype: str, activation_checkpointing: str,
                  onebit: bool = False) -> None:
    """What `parallelize()` is given, checked by the same rules as a config file."""
    check_choice("train.dtype", dtype)
    check_choice("train.activation_checkpointing", activation_checkpointing)
    check_choice("parallel.schedule", parallel.schedule)
    if parallel.zero not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero = {parallel.zero}: choose 0, 1, 2 or 3")
    check_compression(compression, onebit=onebit)
    check_sync(sync, parallel, compression, onebit=onebit)
    check_replicas(parallel, onebit=onebit)


def validate(cfg: Config) -> None:
    """Checks that need no world size. `validate_layout` adds those that do."""
    flat = dataclasses.asdict(cfg)
    for key in CHOICES:
        sec, name = key.split(".")
        check_choice(key, flat[sec][name])
    for key in POSITIVE | NON_NEGATIVE:
        sec, name = key.split(".")
        v = flat[sec][name]
        if key in POSITIVE and v <= 0:
            raise ConfigError(f"{key} = {v!r}: must be positive")
        if v < 0:
            raise ConfigError(f"{key} = {v!r}: must not be negative")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction = {cfg.data.val_fraction}: must be in [0, 1)")
    if cfg.parallel.zero not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero = {cfg.parallel.zero}: choose 0, 1, 2 or 3")
    onebit = cfg.optim.name == "onebit_adam"
    check_sync(cfg.sync, cfg.parallel, cfg.compression, onebit=onebit,
               batch_rampup_samples=cfg.train.batch_rampup_samples)
    check_compression(cfg.compression, onebit=onebit)
    check_replicas(cfg.parallel, onebit=onebit)
    if cfg.optim.scale_lr_with_batch and cfg.optim.reference_batch <= 0:
        raise ConfigError("optim.scale_lr_with_batch = true needs optim.reference_batch > 0: set "
                          "it to the global batch (in samples) at which optim.lr was tuned")
    t = cfg.train
    if t.loss_scale_min > t.loss_scale_init:
        raise ConfigError(f"train.loss_scale_min = {t.loss_scale_min:g} is above "
                          f"train.loss_scale_init = {t.loss_scale_init:g}: the floor must be at "
                          "most the starting scale")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch = {t.global_batch} is not divisible by "
                          f"train.micro_batch = {t.micro_batch}: make the global batch a multiple "
                          "of the micro-batch")
    if cfg.data.path and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path = {cfg.data.path!r} does not exist: point it at a text file, "
                          "a folder of text files, or a .bin of token ids (or leave it empty for "
                          "the default corpus)")
    check_hf_model(cfg)
    if cfg.data.document_masking and not (cfg.data.path and (Path(cfg.data.path)
                                                             / "meta.json").is_file()):
        raise ConfigError("data.document_masking = true needs documents that end with an "
                          "end-of-text token: set data.path to a folder made by `plait data "
                          "prepare`, or set data.document_masking=false")


def check_hf_model(cfg: Config) -> None:
    """model.hf: a local directory with config.json, which alone says the model's shape."""
    m = cfg.model
    if not m.hf:
        return
    if not (Path(m.hf) / "config.json").is_file():
        raise ConfigError(f"model.hf = {m.hf!r}: no config.json there; give a local directory "
                          "holding a transformers config.json (scripts/make_tiny_hf.py writes one)")
    shape = [k for k in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads",
                         "ffn_hidden") if getattr(m, k)] + (["tie_embeddings"]
                                                             if m.tie_embeddings else [])
    if shape:
        raise ConfigError(f"model.hf = {m.hf!r} with model.{shape[0]} set: the model's shape comes "
                          f"from its config.json; unset model.{shape[0]}")


def check_compression(c: CompressionConfig | None, *, onebit: bool = False) -> None:
    """The [compression] section, and 1-bit Adam (which compresses the dp exchange itself)."""
    if c is None:
        return
    check_choice("compression.name", c.name)
    if c.sign_chunk % 8:
        raise ConfigError(f"compression.sign_chunk = {c.sign_chunk}: must be a multiple of 8 (the "
                          f"bit packing's unit), e.g. 256, or 0 for one scale per rank's shard")
    if not 0.0 < c.topk_fraction <= 1.0:
        raise ConfigError(f"compression.topk_fraction = {c.topk_fraction}: must be in (0, 1], "
                          "e.g. 0.01")
    if onebit and c.name != "none":
        raise ConfigError(f"compression.name = {c.name!r} with optim.name = onebit_adam: 1-bit "
                          "Adam compresses the data-parallel exchange itself; set "
                          "compression.name=none")
    if onebit and c.warmup_steps < 1:
        raise ConfigError("compression.warmup_steps = 0 with optim.name = onebit_adam: its Adam "
                          "warm-up needs at least one step (15-25% of train.steps is typical)")


def check_sync(s: SyncConfig | None, parallel: ParallelConfig,
               compression: CompressionConfig | None = None, *,
               onebit: bool = False, batch_rampup_samples: int = 0) -> None:
    """The [sync] section and its combinations with the layout,
    compression and batch ramp-up (plait.sync)."""
    if s is None:
        return
    check_choice("sync.strategy", s.strategy)
    check_choice("sync.quantize", s.quantize)
    for key, v in (("sync.every", s.every), ("sync.fragments", s.fragments)):
        if v < 1:
            raise ConfigError(f"{key} = {v}: must be a positive integer")
    if not 0.0 <= s.outer_momentum < 1.0:
        raise ConfigError(f"sync.outer_momentum = {s.outer_momentum}: must be in [0, 1) (0.9 in "
                          "DiLoCo)")
    if s.outer_lr <= 0:
        raise ConfigError(f"sync.outer_lr = {s.outer_lr}: must be positive (0.7 in DiLoCo; 1.0 "
                          f"with no momentum is plain parameter averaging)")
    if not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"sync.alpha = {s.alpha}: must be in [0, 1] (0: replace local weights by "
                          "the global ones)")
    if s.slow_factor < 1.0:
        raise ConfigError(f"sync.slow_factor = {s.slow_factor}: must be >= 1 (2.0: the slow rank "
                          "takes twice as long)")
    if s.strategy == "streaming_diloco":
        if s.every < s.fragments:
            raise ConfigError(f"sync.every = {s.every} < sync.fragments = {s.fragments}: each "
                              "fragment syncs once every H steps on its own offset, so H must be "
                              "at least P; raise sync.every")
        if not 0 <= s.delay < s.every:
            raise ConfigError(f"sync.delay = {s.delay}: must be in [0, sync.every) = [0, "
                              f"{s.every}) so a fragment is applied before it is sent again")
    if s.strategy == "delayed" and s.delay < 1:
        raise ConfigError(f"sync.delay = {s.delay} with sync.strategy = delayed: must be >= 1 "
                          "(0 is every_step)")
    if s.quantize != "none" and s.strategy not in ("diloco", "streaming_diloco"):
        raise ConfigError(f"sync.quantize = {s.quantize!r} applies to outer gradients "
                          f"(sync.strategy = diloco or streaming_diloco), not to {s.strategy}: set "
                          f"sync.quantize=none (compress per-step gradients with [compression])")
    if s.strategy != "every_step":
        if parallel.zero and parallel.replicas > 1:
            raise ConfigError(f"sync.strategy = {s.strategy} across parallel.replicas = "
                              f"{parallel.replicas} with parallel.zero = {parallel.zero}: not "
                              "supported yet (the outer step would have to run on each rank's "
                              "dp shard); set parallel.zero=0 (dense dp inside each replica)")
        if parallel.zero:
            raise ConfigError(f"sync.strategy = {s.strategy} with parallel.zero = {parallel.zero}: "
                              "replicas that step on their own need their whole optimizer state; "
                              "set parallel.zero=0")
        if (compression is not None and compression.name != "none") or onebit:
            raise ConfigError(f"sync.strategy = {s.strategy} replaces the per-step gradient "
                              "exchange that compression.name / optim.name = onebit_adam "
                              "compress: set compression.name=none and a plain optimizer, or "
                              "sync.strategy=every_step")
    if s.strategy in ("local_sgd", "diloco", "streaming_diloco") and batch_rampup_samples:
        raise ConfigError(f"sync.strategy = {s.strategy} with train.batch_rampup_samples > 0: "
                          "replicas stepping on their own gradients need equal shares of every "
                          f"batch, which a ramp-up does not give; set train.batch_rampup_samples=0")


def check_replicas(parallel: ParallelConfig, *, onebit: bool = False) -> None:
    """parallel.replicas: a positive integer; what does not combine with replicas > 1 yet."""
    r = parallel.replicas
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"parallel.replicas = {r!r}: must be a positive integer (1: no "
                          "hierarchical layout)")
    if r > 1 and onebit:
        raise ConfigError(f"optim.name = onebit_adam with parallel.replicas = {r}: not supported "
                          "yet (1-bit Adam compresses the dp exchange itself); set "
                          "parallel.replicas=1, or another optimizer with compression.name")
    if r > 1 and parallel.auto:
        raise ConfigError(f"parallel.auto = true with parallel.replicas = {r}: the planner does "
                          "not model replicas yet; set parallel.replicas=1 or parallel.auto=false")


def check_layout(world_size: int, dp: int, tp: int, pp: int, replicas: int = 1) -> None:
    """Raise ConfigError unless replicas·dp·tp·pp == world_size with every size positive."""
    for name, v in (("parallel.dp", dp), ("parallel.tp", tp), ("parallel.pp", pp),
                    ("parallel.replicas", replicas)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} = {v!r}: must be a positive integer")
    n = replicas * dp * tp * pp
    if n != world_size:
        what = f"replicas={replicas} × " if replicas > 1 else ""
        raise ConfigError(
            f"layout {what}dp={dp} × tp={tp} × pp={pp} = {n} ranks, but the world has "
            f"{world_size} processes: set parallel.{'replicas/' if replicas > 1 else ''}dp/tp/pp "
            f"so that their product is {world_size}, or launch {n} processes (--nproc {n})"
        )


def resolve_dp(world_size: int, dp: int, tp: int, pp: int, replicas: int = 1) -> int:
    """dp = 0 means 'whatever is left': world_size / (replicas·tp·pp), which must divide."""
    if dp == 0:
        if tp < 1 or pp < 1 or replicas < 1 or world_size % (replicas * tp * pp):
            what, keys = ((f"replicas·tp·pp = {replicas}·{tp}·{pp}", " / parallel.replicas")
                          if replicas != 1 else (f"tp·pp = {tp}·{pp}", ""))
            raise ConfigError(
                f"parallel.dp = 0 (auto) needs {what} to divide the world size "
                f"{world_size}: change parallel.tp / parallel.pp{keys} or the number of processes"
            )
        return world_size // (replicas * tp * pp)
    return dp


def validate_layout(cfg: Config, world_size: int) -> int:
    """Checks that need the world size; returns the resolved dp size."""
    p = cfg.parallel
    check_replicas(p)
    dp = resolve_dp(world_size, p.dp, p.tp, p.pp, p.replicas)
    check_layout(world_size, dp, p.tp, p.pp, p.replicas)
    t = cfg.train
    if p.replicas > 1 and t.global_batch % (t.micro_batch * dp * p.replicas):
        raise ConfigError(
            f"train.global_batch = {t.global_batch} is not divisible by parallel.replicas × dp × "
            f"train.micro_batch = {p.replicas} × {dp} × {t.micro_batch}: each replica's dp ranks "
            f"read their own share; choose a global batch that is a multiple of "
            f"{p.replicas * dp * t.micro_batch}"
        )
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch = {t.global_batch} is not divisible by train.micro_batch × dp = "
            f"{t.micro_batch} × {dp}: choose a global batch that is a multiple of "
            f"{t.micro_batch * dp}"
        )
    check_pipeline(cfg, dp)
    return dp


def check_pipeline(cfg: Config, dp: int) -> None:
    """The pipeline's micro-batch rule, for parallel.pp > 1.

    A pipeline step runs m = train.global_batch / (dp · train.micro_batch) micro-batches of
    train.micro_batch sequences (the same count gradient accumulation uses without a pipeline).
    parallel.microbatches = 0 means exactly that; a non-zero value must equal it (it is a check,
    not a second way to size the batch). The schedule needs m >= pp; interleaved 1F1B also m
    divisible by pp, and virtual stages > 1 only make sense with it.
    """
    p, t = cfg.parallel, cfg.train
    if p.pp == 1:
        return
    # every replica's pipelines share the batch too; `dp` below stands for replicas · dp
    dp = dp * p.replicas
    m = t.global_batch // (t.micro_batch * dp)
    if p.microbatches and p.microbatches != m:
        raise ConfigError(f"parallel.microbatches = {p.microbatches}, but "
                          f"train.global_batch / (dp × train.micro_batch) = {t.global_batch} / "
                          f"({dp} × {t.micro_batch}) = {m} micro-batches per pipeline: set it to "
                          f"{m} or 0, or change the batch sizes")
    try:
        check_schedule(p.schedule, p.pp, m, p.virtual_stages)
    except ScheduleError as e:
        raise ConfigError(f"parallel.schedule = {p.schedule} with parallel.pp = {p.pp}, "
                          f"parallel.virtual_stages = {p.virtual_stages} and {m} micro-batches per "
                          "pipeline step (train.global_batch / (dp × train.micro_batch) = "
                          f"{t.global_batch} / ({dp} × {t.micro_batch})): {e}. Change the batch "
                          f"sizes or the schedule (a pipeline of {p.pp} stages needs at least "
                          f"{p.pp * t.micro_batch * dp} sequences per global batch)") from e


def accumulation_steps(cfg: Config, dp: int) -> int:
    """Micro-batches per rank and step: global batch / (replicas · dp · micro-batch)."""
    return cfg.train.global_batch // (cfg.train.micro_batch * dp * cfg.parallel.replicas)
