"""The training loop: one optimizer step = one global batch, split over dp ranks and micro-batches.

Loss normalization: each micro-batch's summed token loss is divided by the number of tokens in the
whole global batch, and gradients are summed (not averaged) over dp. The accumulated gradient is
then exactly the single-process gradient of the mean loss over the global batch, whatever the
layout, also when ranks hold unequal numbers of samples.

Per step the loop makes no collective and no host read of its own besides the step guard's one
agreement (plait.train.guard): the logged loss and the gradient-noise sums ride in it. Device
values (gradient norm, critical batch) are read only at logging steps. Under sync strategies that
keep replicas apart the agreement happens only every sync.every steps, so inner steps make no
collective at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from plait.checkpoint import Checkpointer, root_of
from plait.checkpoint.snapshot import Parts
from plait.config import (
    Config,
    accumulation_steps,
    to_toml,
    validate_layout,
)
from plait.data import load_corpus, micro_batches
from plait.data.batching import batch_at, rank_share
from plait.data_parallel.zero_memory import memory_breakdown
from plait.flops import peak_flops
from plait.mesh import Mesh
from plait.models import count_params, flops_per_token
from plait.optim import (
    NoiseScaleMonitor,
    metric_value,
    optimizer_factory,
    tensor_parallel_norm_reducer,
)
from plait.optim.lr_schedule import batch_lr_scale, lr_factor
from plait.optim.noise_scale import supported as noise_scale_supported
from plait.parallel_spec import blocks_of
from plait.parallelize import ParallelOptions, parallelize
from plait.planner.auto import compare as compare_plan
from plait.planner.auto import read_plan
from plait.train.guard import StepGuard
from plait.train.metrics import Metrics, peak_memory_bytes, plot_run, prepare_run_dir, write_json
from plait.train.model_setup import advice, build_model, preflight
from plait.train.state import TrainState


class Trainer:
    """Builds one rank's model, data and optimizer; `train_step()`: one step, `run()`: the run."""

    def __init__(self, cfg: Config, mesh: Mesh, corpus=None):
        self.cfg, self.mesh = cfg, mesh
        t = cfg.train
        corpus = corpus if corpus is not None else load_corpus(cfg.data, cfg.model.vocab_size)
        self.corpus_source = corpus.source
        torch.manual_seed(t.seed)  # every rank builds the same full model, then keeps its part
        # model.hf, or plait's GPT; a model.hf with weights is built on the meta device and
        # parallelize() fills this rank's part (init_weights)
        model, self.model_cfg, init_weights = build_model(cfg, corpus.vocab_size)
        self.n_params = count_params(model)
        # LAMB / LARS trust ratios need whole-layer norms: summed over tp for tensor-parallel shards
        build_optimizer = optimizer_factory(cfg.optim, mesh.device,
                                            tensor_parallel_norm_reducer(mesh))
        self.model, self.optimizer = parallelize(model, build_optimizer, mesh,
                                                 ParallelOptions.from_config(cfg),
                                                 init_weights=init_weights)
        # gradient noise scale (metric critical_batch): needs two batch sizes, micro-batch < global
        # batch, and the exact global-batch gradient
        self.noise = (NoiseScaleMonitor(list(self.model.parameters()), mesh, t.micro_batch)
                      if t.global_batch > t.micro_batch and noise_scale_supported(cfg) is None
                      else None)
        if t.compile:  # per block: reducer hooks sit on the leaf parameters, outside compiled code
            for m in blocks_of(self.model.module):  # the model's ParallelSpec block_types
                m.compile()
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # with a loss mask (fine-tuning data) and, under data.document_masking, positions
        masking = cfg.data.document_masking
        self.train_data = corpus.sampler("train", t.seq_len, t.seed, document_masking=masking)
        self.train_data.pin_memory = mesh.device.type == "cuda"
        self.val_data = corpus.sampler("val", t.seq_len, t.seed, document_masking=masking) \
            if t.val_samples and len(corpus.val) > t.seq_len else None
        self.state = TrainState()
        self.flops_per_token = flops_per_token(self.model_cfg, t.seq_len)
        # every strategy but every_step keeps its exchanges to its own cadence: agree at its syncs
        local = cfg.sync.strategy != "every_step"
        self.guard = StepGuard(mesh, t, state=self.state, clock=lambda: (False, False),
                               optimizer=self.optimizer, agree_every=cfg.sync.every if local else 1)
        self.guard.payload = self._payload
        self.optimizer.before_update = self.guard.decide  # the per-step agreement, before updating
        # the loss's share reaches the world sum once: from tp rank 0 of the last pipeline stage
        self._counts_loss = mesh.tp_index == 0 and mesh.pp_index == mesh.pp_size - 1

    # -- one step --------------------------------------------------------------------------
    def set_lr(self, batch: int) -> float:
        """The schedule's factor at this step × the linear scaling rule's for this step's batch."""
        o = self.cfg.optim
        f = lr_factor(self.state.step, self.cfg.train.steps, o.warmup_steps, o.schedule,
                      o.min_lr_ratio)
        f *= batch_lr_scale(batch, o.reference_batch, o.scale_lr_with_batch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f

    def _payload(self) -> torch.Tensor:
        """What the guard's world sum carries for us: [loss, gradient-noise small-batch sum]."""
        zero = torch.zeros((), device=self.mesh.device)
        loss = self.guard.loss if self._counts_loss and self.guard.loss is not None else zero
        noise = self.noise.local_sum if self.noise is not None else zero
        return torch.stack([loss.detach().float().reshape(()), noise.float()])

    def train_step(self) -> dict:
        """One optimizer step. The loss is the global batch's mean (a float) at agreement steps,
        else this rank's own (a device tensor; `loss_is_local`); other values stay on the device."""
        t, st = self.cfg.train, self.state
        # ramp-up or fixed
        batch = batch_at(st.samples, t.global_batch, t.micro_batch, t.batch_rampup_samples)
        lr = self.set_lr(batch)
        # each (replica, dp index) reads its own share: replicas · dp of them
        start, count = rank_share(st.samples, batch, t.micro_batch, self.mesh.data_size,
                                  self.mesh.data_index)
        batches = micro_batches(self.train_data, start, count, t.micro_batch)
        if self.noise is not None:
            self.noise.begin_step(self.optimizer.loss_scale)
        # the global batch's trained targets (all of them without a loss mask): a pure function
        # of the data position, so each rank counts them from the sampler, with no collective
        targets = self.train_data.global_targets(st.samples, batch)
        loss = self.guard.observe(self.model.train_step(batches, targets))
        applied = self.optimizer.step()  # the guard's agreement runs inside, before the update
        self.guard.finish_step(applied)
        agreed = self.guard.agreed  # world sums, or None between the agreements of a local strategy
        extra = {}
        if self.noise is not None:
            extra = self.noise.end_step(self.optimizer, batch, world_sum=agreed[1], applied=applied)
        self.optimizer.zero_grad()
        st.step += 1
        st.samples += batch
        if agreed is not None:
            loss = agreed[0]
        elif count:  # this rank's own mean token loss: its share × global tokens / its tokens
            loss = loss * (targets / max(1, self.train_data.target_count(start, count)))
        return {"loss": loss, "loss_is_local": agreed is None, "lr": lr,
                "grad_norm": self.optimizer.last_grad_norm, "global_batch": batch,
                "applied": applied, "loss_scale": self.optimizer.loss_scale, **extra}

    def evaluate(self) -> float | None:
        """Mean token loss of the first val_samples validation sequences (same for every layout)."""
        if self.val_data is None:
            return None
        n, dp, i = self.cfg.train.val_samples, self.mesh.data_size, self.mesh.data_index
        lo, hi = n * i // dp, n * (i + 1) // dp
        acc = self.model.eval_step(
            micro_batches(self.val_data, lo, hi - lo, self.cfg.train.micro_batch))
        self.mesh.comm.all_reduce(acc, self.mesh.dp)
        self.mesh.comm.all_reduce(acc, self.mesh.rep)  # nothing when parallel.replicas = 1
        return float(acc[0] / acc[1])

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter at full shape (for parity checks against the single-process run)."""
        return self.model.full_state_dict()

    def loss_value(self, out: dict) -> float:
        """A step's loss as logged: the agreed global mean, or between syncs this replica's own,
        which under pp only the last stage computed: broadcast over mesh.pp then (a collective
        within the replica, made at logging steps only, on every rank of the replica)."""
        loss = out["loss"]
        if out["loss_is_local"] and self.model.pipeline is not None:
            t = torch.as_tensor(loss, dtype=torch.float32,
                                device=self.mesh.device).reshape(1).clone()
            self.mesh.comm.broadcast(t, self.mesh.pp_size - 1, self.mesh.pp)
            return float(t)
        return float(loss)

    def record(self, out: dict, val: float | None) -> dict:
        """The logged values of a step: the host reads happen here, at logging steps only."""
        st, pipeline = self.state, self.model.pipeline
        gn = out["grad_norm"]
        rec = {"step": st.step, "loss": self.loss_value(out), "lr": out["lr"],
               "grad_norm": None if gn is None else float(gn), "global_batch": out["global_batch"],
               "critical_batch": metric_value(out.get("critical_batch")), "samples": st.samples,
               "tokens": st.samples * self.cfg.train.seq_len, "skipped_steps": st.skipped_steps}
        if out["loss_is_local"]:
            rec["loss_is_local"] = True  # between syncs: this rank's own loss, no collective for it
        if pipeline is not None:  # each pp rank's measured idle fraction (a pp gather, every rank)
            rec["bubble"] = pipeline.bubbles()
        if val is not None:
            rec["val_loss"] = val
        if self.optimizer.scaler is not None:  # fp16: scale after this step; overflow skips so far
            rec["loss_scale"], rec["overflow_steps"] = \
                out["loss_scale"], self.optimizer.scaler.skipped
        if self.guard.last_skipped:
            rec["skipped"] = True
        if self.noise is not None:
            self.noise.check(out["global_batch"], rec["critical_batch"])
        return rec

    # -- the run ---------------------------------------------------------------------------
    def step(self, metrics: Metrics, ckpt: Checkpointer | None = None, resumed: dict | None = None
             ) -> tuple[str | None, float | None]:
        """One step of `plait train`'s loop: train, evaluate when due, log when due, save when due.
        Returns (the reason to stop now or None, the validation loss when evaluated)."""
        t, st, mesh = self.cfg.train, self.state, self.mesh
        out = self.train_step()
        traffic = mesh.comm.stats.reset_step(st.step)
        metrics.step_done(out["global_batch"], traffic["comm_bytes"], traffic["inter_bytes"])
        val = None
        if (t.val_every and st.step % t.val_every == 0) or st.step == t.steps:
            with metrics.pause():
                val = self.evaluate()
                mesh.comm.stats.reset_step(st.step)  # validation traffic is not a training step's
        if metrics.should_log(st.step, forced=val is not None or self.guard.last_skipped):
            rec = self.record(out, val)
            if resumed is not None and not metrics.records:
                rec["resumed_from"] = resumed["step"]
            metrics.log(rec)
        if ckpt is None:
            return None, val
        with metrics.pause():  # saves when due; a planned stop saves, then ends the loop
            stopped = ckpt.after_step(save_due=self.guard.save_due, stop_due=self.guard.stop_due,
                                      skipped=self.guard.last_skipped)
        return stopped, val

    def run(self, run_dir: Path | None) -> dict:
        cfg, mesh, t, st = self.cfg, self.mesh, self.cfg.train, self.state
        lead = mesh.rank == 0
        extras = {"noise": self.noise.estimate} if self.noise is not None else {}
        parts = Parts(self.model, self.optimizer, st, mesh, cfg.sync.strategy, extras)
        ckpt = Checkpointer(cfg, run_dir, parts, self.model_cfg)
        resumed = ckpt.resume()  # collective: the newest checkpoint that verifies, under any layout
        self.guard.clock, self.guard.fault_root = ckpt.clock, ckpt.root
        self.guard.last_checkpoint = lambda: ckpt.last_path
        if lead and run_dir is not None:  # a resumed run keeps the first config.toml, adds its own
            conf = run_dir / "config.toml"
            (run_dir / f"config.step-{st.step:08d}.toml" if conf.exists()
             else conf).write_text(to_toml(cfg))
        if st.step >= t.steps:
            if lead:
                print(f"plait: the run is complete (step {st.step} of train.steps = {t.steps}): "
                      f"nothing to do; raise train.steps to train on", flush=True)
            done = run_dir / "summary.json" if run_dir is not None else None
            return (json.loads(done.read_text()) if done is not None and done.exists()
                    else {"steps": st.step})
        peak = peak_flops(mesh.device, t.dtype, t.peak_flops)
        metrics = Metrics(run_dir if lead else None, total_steps=t.steps, log_every=t.log_every,
                          seq_len=t.seq_len, world=mesh.world_size,
                          flops_per_token=self.flops_per_token, peak_flops=peak,
                          progress=cfg.log.progress and lead, tensorboard=cfg.log.tensorboard,
                          start_step=st.step)
        if lead:
            kind = f"transformers model ({cfg.model.hf})" if cfg.model.hf else "GPT"
            reps = f"replicas={mesh.replicas} " if mesh.replicas > 1 else ""
            print(f"plait: {self.model_cfg.n_layers}-layer {kind}, {self.n_params / 1e6:.2f}M "
                  f"parameters, layout {reps}dp={mesh.dp_size} tp={mesh.tp_size} "
                  f"pp={mesh.pp_size}, "
                  f"global batch {t.global_batch}×{t.seq_len} tokens "
                  f"({accumulation_steps(cfg, mesh.dp_size)} micro-batches of {t.micro_batch} per "
                  f"rank), data: {self.corpus_source}, device {mesh.device}", flush=True)
        val_loss, stopped = None, None
        mesh.comm.stats.reset_step(st.step)  # setting up and resuming is no training step's traffic
        try:
            while st.step < t.steps:
                stopped, val = self.step(metrics, ckpt, resumed)
                val_loss = val if val is not None else val_loss
                if stopped:
                    break
            if not stopped:
                ckpt.finish()
        finally:
            metrics.close()
            ckpt.wait()  # an asynchronous save in flight is committed on every way out
        summary = metrics.summary(
            final_val_loss=val_loss, steps=st.step, tokens=st.samples * t.seq_len,
            layout={"replicas": mesh.replicas, "dp": mesh.dp_size, "tp": mesh.tp_size,
                    "pp": mesh.pp_size,
                    "zero": cfg.parallel.zero, "world_size": mesh.world_size,
                    "micro_batches": accumulation_steps(cfg, mesh.dp_size),
                    "micro_batch": t.micro_batch, "schedule": cfg.parallel.schedule,
                    "virtual_stages": cfg.parallel.virtual_stages,
                    "activation_checkpointing": t.activation_checkpointing,
                    "sequence_parallel": cfg.parallel.sequence_parallel,
                    "device": str(mesh.device)},
            peak_memory_bytes=peak_memory_bytes(mesh.device),
            # this rank's parameters, gradients, optimizer
            memory=memory_breakdown(self.model, self.optimizer),
            wall_s=metrics.wall_s(), n_params=self.n_params, peak_flops_per_rank=peak,
            model=asdict(self.model_cfg), skipped_steps=st.skipped_steps,
            overflow_steps=(self.optimizer.scaler.skipped if self.optimizer.scaler is not None
                            else 0),  # fp16
            resumed_from_step=resumed["step"] if resumed is not None else None,
            stopped=stopped,  # train.exit_after_steps / exit_after_minutes, or None: ran to the end
            checkpoint=str(ckpt.last_path) if ckpt.last_path is not None else None)
        if self.model.pipeline is not None:  # the timeline's gather is a pp collective: every rank
            timeline = self.model.pipeline.gather_timeline()
            summary["pipeline"] = self.model.pipeline.summary()
            if lead and run_dir is not None:
                timeline.write_trace(run_dir / "pipeline_trace.json")
                timeline.plot(run_dir / "pipeline_gantt.png")
        plan = (read_plan(run_dir, {**summary["layout"], "compression": cfg.compression.name,
                                    "sync": cfg.sync.strategy})
                if lead else None)  # parallel.auto=true
        if plan is not None:
            summary["plan"] = compare_plan(plan, summary, t.global_batch * t.seq_len)
        if lead and run_dir is not None:
            write_json(run_dir / "summary.json", summary)
            if cfg.log.plots and metrics.records:
                plot_run(run_dir)
        if lead:
            self._announce_end(summary, run_dir, stopped, ckpt.last_path)
        return summary

    def _announce_end(self, summary: dict, run_dir: Path | None, stopped: str | None, last) -> None:
        if stopped:
            print(f"plait: stopped at step {self.state.step} ({stopped}), checkpoint {last}; run "
                  f"`plait train` again with --run-dir {run_dir} to continue", flush=True)
            return
        val = summary["final_val_loss"]
        plan = summary.get("plan")
        if plan is not None and plan["measured"]["step_s"]:
            print(f"plait: planned {plan['predicted']['step_s']:.3g} s/step, measured "
                  f"{plan['measured']['step_s']:.3g} s/step (summary.json: plan)", flush=True)
        print(f"plait: done. final loss {summary['final_train_loss']:.4g}"
              + (f", val {val:.4g}" if val is not None else "")
              + f", {summary['tokens_per_s']:,.0f} tok/s, run folder {run_dir}", flush=True)

    def close(self) -> None:
        """Stop background work: the sync strategy's thread (after finishing its exchanges)."""
        sync = self.optimizer.sync
        if sync is not None:
            sync.close()


def _device(cfg: Config) -> torch.device | None:
    """train.device; cuda with several local ranks: cuda:LOCAL_RANK each (None: mesh decides)."""
    if cfg.train.device == "auto":
        return None
    if cfg.train.device == "cuda":
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    return torch.device(cfg.train.device)


def train(cfg: Config, run_dir: str | None = None) -> dict:
    """Entry point of one worker process (under torchrun or alone).

    Every way out (a finished run, a planned stop, an exception) stops the sync thread, waits for
    an asynchronous save in flight and destroys the process groups this call created.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(cfg, world)  # before any collective: same message on every rank
    preflight(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in advice(cfg):
            print(f"plait: warning: {line}", flush=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    # the CPU's flush-to-zero mode (x86 with SSE3, Arm); False where the CPU has none
    torch.set_flush_denormal(cfg.train.flush_denormal)
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    path = Path(run_dir or cfg.log.run_dir) if (run_dir or cfg.log.run_dir) else None
    if path is not None:  # every rank checks, before any collective; rank 0 creates it
        # a folder holding a run resumes from its checkpoint; an elastic restart resumes its own run
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            prepare_run_dir(path, create=int(os.environ.get("RANK", "0")) == 0,
                            checkpoints=root_of(cfg, path))
    owns_groups = not (dist.is_available() and dist.is_initialized())  # caller's groups stay theirs
    mesh = Mesh.from_env(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, backend=backend,
                         timeout_s=cfg.train.timeout_s, device=_device(cfg),
                         replicas=cfg.parallel.replicas)
    trainer, finished = None, False
    try:
        trainer = Trainer(cfg, mesh)
        summary = trainer.run(path)
        finished = True
        return summary
    finally:
        if trainer is not None:
            trainer.close()
        if owns_groups:
            if finished:  # no rank tears its connections down while a peer still sends on them
                mesh.comm.barrier(mesh.world)
            mesh.destroy()
