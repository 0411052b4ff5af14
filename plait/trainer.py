"""The training loop: one optimizer step = one global batch, split over dp ranks and micro-batches.

Loss normalization: each micro-batch's summed token loss is divided by the number of tokens in the
whole global batch, and gradients are summed (not averaged) over dp. The accumulated gradient is
then exactly the single-process gradient of the mean loss over the global batch, whatever the
layout, also when ranks hold unequal numbers of samples.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from plait import config as C
from plait.data import ChunkSampler, load_corpus, micro_batches
from plait.data_parallel.zero_memory import memory_breakdown
from plait.flops import peak_flops
from plait.mesh import Mesh
from plait.metrics import RunLog, peak_memory_bytes, plot_run, prepare_run_dir, write_json
from plait.models import GPT, build_config, count_params, flops_per_token
from plait.models.gpt import Block
from plait.optim import NoiseScaleMonitor, metric_value, optimizer_factory, tensor_parallel_norm_reducer
from plait.optim.loss_scale import LossScaler
from plait.optim.noise_scale import supported as noise_scale_supported
from plait.optim.schedule import batch_at, batch_lr_scale, lr_factor, rank_share
from plait.parallelize import maybe_no_sync, parallelize


def model_config(m: C.ModelConfig, vocab_size: int, seq_len: int):
    over = {k: getattr(m, k) or None for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden")}
    cfg = build_config(m.preset, vocab_size=m.vocab_size or vocab_size, tie_embeddings=m.tie_embeddings, **over)
    if seq_len > cfg.max_seq_len:
        cfg = build_config(m.preset, vocab_size=cfg.vocab_size, tie_embeddings=m.tie_embeddings,
                           max_seq_len=seq_len, **over)
    if cfg.d_model % cfg.n_heads:
        raise C.ConfigError(f"model.d_model = {cfg.d_model} is not divisible by model.n_heads = {cfg.n_heads}")
    if cfg.n_heads % cfg.kv_heads:
        raise C.ConfigError(f"model.n_heads = {cfg.n_heads} is not divisible by model.n_kv_heads = {cfg.kv_heads}")
    if cfg.head_dim % 2:
        raise C.ConfigError(f"head dimension d_model/n_heads = {cfg.head_dim} must be even (rotary embeddings)")
    return cfg


class Trainer:
    """Builds model, data and optimizer for one rank of `mesh` and runs training steps."""

    def __init__(self, cfg: C.Config, mesh: Mesh, corpus=None):
        self.cfg = cfg
        self.mesh = mesh
        t = cfg.train
        self.acc = C.accumulation_steps(cfg, mesh.dp_size)
        corpus = corpus if corpus is not None else load_corpus(cfg.data, cfg.model.vocab_size)
        self.corpus_source = corpus.source
        self.model_cfg = model_config(cfg.model, corpus.vocab_size, t.seq_len)
        torch.manual_seed(t.seed)  # every rank builds the same full model, then keeps its part
        model = GPT(self.model_cfg)
        self.n_params = count_params(model)
        # LAMB / LARS trust ratios need whole-layer norms: summed over tp for tensor-parallel shards
        build_optimizer = optimizer_factory(cfg.optim, mesh.device, tensor_parallel_norm_reducer(mesh))
        scaler = (LossScaler(t.loss_scale_init, growth_interval=t.loss_scale_growth_interval,
                             min_scale=t.loss_scale_min)
                  if t.dtype == "fp16" else None)
        self.model, self.optimizer = parallelize(model, build_optimizer, mesh, cfg.parallel,
                                                 grad_clip=cfg.optim.grad_clip, compression=cfg.compression,
                                                 sync=cfg.sync, total_steps=t.steps,
                                                 activation_checkpointing=t.activation_checkpointing,
                                                 dtype=t.dtype, loss_scale=scaler)
        # gradient noise scale (metric critical_batch): needs two batch sizes, micro-batch < global batch,
        # and the exact global-batch gradient. It grows as the loss falls, so batch-size warnings wait
        # for the first fifth of the run.
        self.noise = (NoiseScaleMonitor(list(self.model.parameters()), mesh, t.micro_batch,
                                        warn_after=max(20, t.steps // 5), lead=mesh.rank == 0)
                      if t.global_batch > t.micro_batch and noise_scale_supported(cfg) is None else None)
        if t.compile:  # per block: the reducer's hooks sit on the leaf parameters, outside compiled code
            for m in self.model.module.modules():
                if isinstance(m, Block):
                    m.compile()
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.train_data = ChunkSampler(corpus.train, t.seq_len, t.seed)
        self.train_data.pin_memory = mesh.device.type == "cuda"
        self.val_data = ChunkSampler(corpus.val, t.seq_len, t.seed, shuffle=False, what="validation") \
            if t.val_samples and len(corpus.val) > t.seq_len else None
        self.autocast = self.model.autocast()  # train.dtype: bf16 / fp16 autocast (parallelize step 4), or none
        self.step = 0
        self.samples = 0  # data position: global samples consumed
        self.flops_per_token = flops_per_token(self.model_cfg, t.seq_len)

    # -- one step --------------------------------------------------------------------------
    def set_lr(self, batch: int) -> float:
        """The schedule's factor at this step, times the linear scaling rule's for this step's batch."""
        o = self.cfg.optim
        f = lr_factor(self.step, self.cfg.train.steps, o.warmup_steps, o.schedule, o.min_lr_ratio)
        f *= batch_lr_scale(batch, o.reference_batch, o.scale_lr_with_batch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f

    def forward_backward(self, batches, global_tokens: int) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; returns its share of the mean loss."""
        scale = self.optimizer.loss_scale  # fp16: backward runs on loss × scale (a power of 2: exact); else 1
        if self.model.pipeline is not None:  # the pipeline schedule runs them all; its loss is on every pp rank
            loss = self.model.pipeline.train_step(batches, global_tokens / scale, self.autocast,
                                                  no_sync=self.model.no_sync)
            return loss / scale if scale != 1.0 else loss
        loss_sum = torch.zeros((), device=self.mesh.device)
        for k, (x, y) in enumerate(batches):
            x, y = x.to(self.mesh.device, non_blocking=True), y.to(self.mesh.device, non_blocking=True)
            with maybe_no_sync(self.model, last=k == self.acc - 1):
                with self.autocast:
                    logits = self.model(x)
                loss = self.model.loss(logits, y, reduction="sum") / global_tokens
                (loss * scale if scale != 1.0 else loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self) -> dict:
        t = self.cfg.train
        batch = batch_at(self.samples, t.global_batch, t.micro_batch, t.batch_rampup_samples)  # ramp-up or fixed
        lr = self.set_lr(batch)
        start, count = rank_share(self.samples, batch, t.micro_batch, self.mesh.dp_size, self.mesh.dp_index)
        self.acc = count // t.micro_batch  # this rank's micro-batches this step
        batches = micro_batches(self.train_data, start, count, t.micro_batch)
        if self.noise is not None:
            self.noise.begin_step(self.optimizer.loss_scale)
        loss = self.forward_backward(batches, batch * t.seq_len)
        applied = self.optimizer.step()  # False: an fp16 overflow on some rank skipped the update on all
        # one all-reduce: the global batch's mean loss (for logging) and the noise scale's small-batch
        # sum (zero without it, so every run makes the same collectives)
        sums = torch.stack([loss.float(), self.noise.local_sum if self.noise is not None
                            else torch.zeros((), device=loss.device)])
        self.mesh.comm.all_reduce(sums, self.mesh.dp)
        loss = sums[0]
        extra = (self.noise.end_step(self.optimizer, batch, dp_sum=sums[1], applied=applied)
                 if self.noise is not None else {})
        self.optimizer.zero_grad()
        self.step += 1
        self.samples += batch
        # tensors, not floats: reading them waits for the device, which the caller does when it logs
        return {"loss": loss, "lr": lr, "grad_norm": self.optimizer.last_grad_norm, "global_batch": batch,
                "applied": applied, "loss_scale": self.optimizer.loss_scale, **extra}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the first val_samples validation sequences (the same for every layout)."""
        if self.val_data is None:
            return None
        self.model.eval()
        n, dp, i = self.cfg.train.val_samples, self.mesh.dp_size, self.mesh.dp_index
        lo, hi = n * i // dp, n * (i + 1) // dp
        acc = torch.zeros(2, device=self.mesh.device, dtype=torch.float64)
        batches = micro_batches(self.val_data, lo, hi - lo, self.cfg.train.micro_batch)
        if self.model.pipeline is not None:  # forward only through the stages; the sums come from the last
            acc += self.model.pipeline.evaluate(batches, self.autocast)
            batches = ()
        for x, y in batches:
            x, y = x.to(self.mesh.device), y.to(self.mesh.device)
            with self.autocast:
                logits = self.model(x)
            acc[0] += self.model.loss(logits, y, reduction="sum").double()
            acc[1] += y.numel()
        self.mesh.comm.all_reduce(acc, self.mesh.dp)
        self.model.train()
        return float(acc[0] / acc[1])

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter at full shape (for parity checks against the single-process run)."""
        return self.model.full_state_dict()

    # -- the run ---------------------------------------------------------------------------
    def run(self, run_dir: Path | None) -> dict:
        cfg, mesh, t = self.cfg, self.mesh, self.cfg.train
        lead = mesh.rank == 0
        from plait.checkpoint import Checkpointer, StepGuard

        ckpt = Checkpointer(self, run_dir)  # resume, periodic and planned saves (plait.checkpoint)
        resumed = ckpt.resume()  # collective: the newest complete checkpoint, under any layout
        if lead and run_dir is not None:  # a resumed run keeps the first config.toml and adds its own
            conf = run_dir / "config.toml"
            (run_dir / f"config.step-{self.step:08d}.toml" if conf.exists() else conf).write_text(C.to_toml(cfg))
        if self.step >= t.steps:
            if lead:
                print(f"plait: the run is complete (step {self.step} of train.steps = {t.steps}): nothing to do; "
                      f"raise train.steps to train on", flush=True)
            done = run_dir / "summary.json" if run_dir is not None else None
            return json.loads(done.read_text()) if done is not None and done.exists() else {"steps": self.step}
        peak = peak_flops(mesh.device, t.dtype, t.peak_flops)
        log = RunLog(run_dir if lead else None, t.steps, cfg.log.progress and lead)
        if lead:
            print(f"plait: {self.model_cfg.n_layers}-layer GPT, {self.n_params / 1e6:.2f}M parameters, "
                  f"layout dp={mesh.dp_size} tp={mesh.tp_size} pp={mesh.pp_size}, "
                  f"global batch {t.global_batch}×{t.seq_len} tokens ({self.acc} micro-batches of "
                  f"{t.micro_batch} per rank), data: {self.corpus_source}, device {mesh.device}", flush=True)
        wall0 = time.perf_counter()
        val_loss = None
        comm_total = 0.0
        stopped = None
        guard = StepGuard(self, ckpt)  # non-finite steps skipped on every rank; time-based saves and stops
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                out = self.train_step()
                if mesh.device.type == "cuda":
                    torch.cuda.synchronize(mesh.device)
                dt = time.perf_counter() - t0
                comm = mesh.comm.stats.reset_step(self.step)
                comm_total += comm["comm_bytes"]
                gn = out["grad_norm"]
                tokens_per_step = out["global_batch"] * t.seq_len  # varies during a batch ramp-up
                rec = {"step": self.step, "loss": float(out["loss"]), "lr": out["lr"],
                       "grad_norm": None if gn is None else float(gn), "global_batch": out["global_batch"],
                       "critical_batch": metric_value(out.get("critical_batch")),
                       "samples": self.samples, "tokens": self.samples * t.seq_len, "step_s": dt,
                       "tokens_per_s": tokens_per_step / dt,
                       "mfu": self.flops_per_token * tokens_per_step / dt / (mesh.world_size * peak),
                       "comm_bytes": comm["comm_bytes"], "comm_s": comm["comm_s"]}
                if self.model.pipeline is not None:  # measured idle fraction of each pp rank
                    rec["bubble"] = self.model.pipeline.bubbles()
                if (t.val_every and self.step % t.val_every == 0) or self.step == t.steps:
                    val_loss = self.evaluate()
                    mesh.comm.stats.reset_step(self.step)  # validation traffic is not a training step's
                    rec["val_loss"] = val_loss
                rec["skipped_steps"] = guard.skipped_total
                if self.optimizer.scaler is not None:  # fp16: the scale after this step; overflow skips so far
                    rec["loss_scale"], rec["overflow_steps"] = out["loss_scale"], self.optimizer.scaler.skipped
                if guard.last_skipped:
                    rec["skipped"] = True
                if resumed is not None and not log.records:
                    rec["resumed_from"] = resumed["step"]
                if self.step % t.log_every == 0 or self.step == t.steps or "val_loss" in rec or guard.last_skipped:
                    log.log(rec)
                stopped = ckpt.after_step(guard)  # saves when due; a planned stop saves, then ends the loop
                if stopped:
                    break
            if not stopped:
                ckpt.finish(guard)
        finally:
            guard.remove()
            log.close()
        wall = time.perf_counter() - wall0
        recs = log.records
        steady = [r for r in recs if r["step"] > ckpt.start_step + 1] or recs  # the first step pays one-off warm-up
        # throughput over the steady steps: total tokens / total time (exact also when the batch ramps up)
        steady_s = sum(r["step_s"] for r in steady) or float("nan")
        tokens_per_s = sum(r["global_batch"] * t.seq_len for r in steady) / steady_s
        summary = {
            "final_train_loss": recs[-1]["loss"] if recs else None,
            "final_val_loss": val_loss,
            "steps": self.step,
            "tokens": self.samples * t.seq_len,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (mesh.world_size * peak),
            "comm_bytes_per_step": comm_total / max(1, self.step - ckpt.start_step),  # this session's steps
            "layout": {"dp": mesh.dp_size, "tp": mesh.tp_size, "pp": mesh.pp_size, "zero": cfg.parallel.zero,
                       "world_size": mesh.world_size, "micro_batches": C.accumulation_steps(cfg, mesh.dp_size),
                       "device": str(mesh.device)},
            "peak_memory_bytes": peak_memory_bytes(mesh.device),
            "memory": memory_breakdown(self.model, self.optimizer),  # this rank's parameters, gradients, optimizer
            "wall_s": wall,
            "n_params": self.n_params,
            "peak_flops_per_rank": peak,
            "model": asdict(self.model_cfg),
            "skipped_steps": guard.skipped_total,
            "overflow_steps": self.optimizer.scaler.skipped if self.optimizer.scaler is not None else 0,  # fp16
            "resumed_from_step": resumed["step"] if resumed is not None else None,
            "stopped": stopped,  # train.exit_after_steps / train.exit_after_minutes, or None: ran to the end
            "checkpoint": str(ckpt.last_path) if ckpt.last_path is not None else None,
        }
        if self.model.pipeline is not None:  # gathering the timeline is a collective over pp: every rank
            timeline = self.model.pipeline.gather_timeline()
            summary["pipeline"] = self.model.pipeline.summary()
            if lead and run_dir is not None:
                timeline.write_trace(run_dir / "pipeline_trace.json")
                timeline.plot(run_dir / "pipeline_gantt.png")
        if lead and run_dir is not None:
            write_json(run_dir / "summary.json", summary)
            if cfg.log.plots and recs:
                plot_run(run_dir)
            if stopped:
                print(f"plait: stopped at step {self.step} ({stopped}), checkpoint {ckpt.last_path}; run `plait "
                      f"train` again with --run-dir {run_dir} to continue", flush=True)
            else:
                print(f"plait: done. final loss {summary['final_train_loss']:.4f}, val {val_loss}, "
                      f"{summary['tokens_per_s']:,.0f} tok/s, run folder {run_dir}", flush=True)
        return summary


def train(cfg: C.Config, run_dir: str | None = None) -> dict:
    """Entry point of one worker process (under torchrun or alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    C.validate_layout(cfg, world)  # before any collective: same message on every rank
    device = None if cfg.train.device == "auto" else torch.device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    path = Path(run_dir or cfg.log.run_dir) if (run_dir or cfg.log.run_dir) else None
    if path is not None:  # every rank checks, before any collective; rank 0 creates it
        from plait.checkpoint import root_of

        # a folder holding a run is resumed from its checkpoint; an elastic restart resumes its own run
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            prepare_run_dir(path, create=int(os.environ.get("RANK", "0")) == 0, checkpoints=root_of(cfg, path))
    mesh = Mesh.from_env(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, backend=backend,
                         timeout_s=cfg.train.timeout_s, device=device)
    return Trainer(cfg, mesh).run(path)
