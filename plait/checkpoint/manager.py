"""`Checkpointer`: when to save, saving (atomic, optionally asynchronous), and resuming a Trainer.

Communication contract (every rank creates one Checkpointer and calls the same methods in the
same order, from the training thread):
- `resume()`: one all-reduce over mesh.world to agree on the checkpoint, one to agree on the
  files' verdicts (each rank checksums every world_size-th file), one for the shape check, then
  DCP's load (its planning collectives run on the default group);
- `save()`: a barrier over mesh.world, DCP's save (default group; with `checkpoint.async` a
  dedicated gloo group created here, used by DCP's background thread only), then rank 0 commits
  (manifest, rename) and a barrier. Asynchronous saves are committed by rank 0 when they finish,
  checked once per step, and at the latest before the next save or at the end of the run.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from plait import config as C
from plait.checkpoint import store
from plait.checkpoint.snapshot import collect, load_model, restore, single_process
from plait.checkpoint.state import DIVERGENT, Shards, layout_of
from plait.checkpoint.store import CheckpointError
from plait.errors import ConfigError

# model fields that decide tensor shapes -> the config key that sets them
SHAPE_FIELDS = {"vocab_size": "model.vocab_size", "n_layers": "model.n_layers", "d_model": "model.d_model",
                "n_heads": "model.n_heads", "kv_heads": "model.n_kv_heads", "ffn": "model.ffn_hidden",
                "tie_embeddings": "model.tie_embeddings"}


def model_record(model_cfg) -> dict:
    return {**asdict(model_cfg), "kv_heads": model_cfg.kv_heads, "ffn": model_cfg.ffn}


def check_model(saved: dict, model_cfg, source: Path) -> None:
    """CheckpointError naming `source` and every shape-deciding field that differs from this run's model."""
    diffs = [(f, key, saved.get(f), getattr(model_cfg, f)) for f, key in SHAPE_FIELDS.items()
             if saved.get(f) != getattr(model_cfg, f)]
    if diffs:
        what = ", ".join(f"{f} = {a} there, {b} here" for f, _, a, b in diffs)
        fix = " ".join(f"{key}={str(a).lower() if isinstance(a, bool) else a}" for _, key, a, _ in diffs)
        raise CheckpointError(f"checkpoint {str(source)!r} holds another model shape ({what}): run with the saved "
                              f"model's settings ({fix}), or use another run folder / checkpoint.dir")


def root_of(cfg: C.Config, run_dir: Path | None) -> Path | None:
    """Where a run's checkpoints live: checkpoint.dir, else RUN_DIR/checkpoints."""
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    return Path(run_dir) / "checkpoints" if run_dir is not None else None


class Checkpointer:
    def __init__(self, trainer, run_dir: Path | None):
        self.tr = trainer
        self.cfg, self.mesh = trainer.cfg, trainer.mesh
        c, t = self.cfg.checkpoint, self.cfg.train
        self.root = root_of(self.cfg, run_dir)
        self.periodic = c.every > 0 or c.every_minutes > 0
        needs = [k for k, v in (("checkpoint.every", c.every), ("checkpoint.every_minutes", c.every_minutes),
                                ("train.exit_after_steps", t.exit_after_steps),
                                ("train.exit_after_minutes", t.exit_after_minutes),
                                ("train.fault", t.fault in ("kill", "kill_in_save"))) if v]
        if needs and self.root is None:
            raise ConfigError(f"{needs[0]} saves checkpoints, but this run has no folder for them: give --run-dir "
                              f"(or log.run_dir) or checkpoint.dir")
        self.lead = self.mesh.rank == 0
        self.shards = Shards(self.mesh)
        self.group = None
        if c.async_save and self.mesh.world_size > 1:  # DCP's background thread gets its own group
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=t.timeout_s))
        self.asynchronous = c.async_save
        self.pending = None  # (future, tmp, final, manifest) of an asynchronous save in flight
        self.last_path: Path | None = None
        self.last_step: int | None = None
        self.last_time = self.started = time.monotonic()
        self.start_step = 0
        self.skipped = 0  # restored count of skipped steps (the guard adds this session's)

    # -- resuming ------------------------------------------------------------------------------
    def _agree_latest(self) -> Path | None:
        found = store.latest(self.root) if self.root is not None else None
        step = int(found.name.split("-")[1]) if found is not None else -1
        both = torch.tensor([step, -step], dtype=torch.float64, device=self.mesh.device)
        self.mesh.comm.all_reduce(both, self.mesh.world, op="max")
        if int(both[0]) != -int(both[1]):
            raise CheckpointError(f"ranks see different latest checkpoints in {str(self.root)!r} (steps "
                                  f"{-int(both[1])} to {int(both[0])}): checkpoint.dir must be one folder every rank "
                                  f"reads (a shared filesystem)")
        return found

    def verify(self, path: Path, manifest: dict) -> None:
        """Check every file's size and sha256 against the manifest (spread over ranks; all agree)."""
        files = manifest.get("files") or []
        mesh = self.mesh
        codes = torch.zeros(max(1, len(files)), device=mesh.device)
        local = {}
        for i, entry in enumerate(files):
            if i % mesh.world_size == mesh.rank:
                problem = store.check_file(path, entry)
                if problem is not None:
                    local[i] = problem
                    codes[i] = 1.0 if problem == "is missing" else 2.0 if "bytes" in problem else 3.0
        mesh.comm.all_reduce(codes, mesh.world)
        bad = [i for i, v in enumerate(codes.tolist()) if v]
        if bad:
            i = bad[0]
            kinds = {1: "is missing", 2: "has the wrong size (truncated or overwritten)",
                     3: "does not match its sha256 (corrupted)"}
            why = local.get(i, kinds[int(codes[i])])  # the rank that checked it has the details
            raise CheckpointError(f"checkpoint file {str(path / files[i]['name'])!r} {why}; "
                                  f"{len(bad)} of {len(files)} files are damaged. Nothing was changed: remove or "
                                  f"move {str(path)!r} to resume from an older checkpoint")

    def resume(self) -> dict | None:
        """Continue from the newest complete checkpoint under the root, if any (collective).

        Else, with checkpoint.init_from, take the initial weights from there. Returns what was loaded.
        """
        tr, mesh = self.tr, self.mesh
        path = self._agree_latest()
        if path is None:
            if self.cfg.checkpoint.init_from:
                self.init_weights(self.cfg.checkpoint.init_from)
            return None
        manifest = store.read_manifest(path)
        check_model(manifest.get("model", {}), tr.model_cfg, path / store.MANIFEST)
        self.verify(path, manifest)
        here = layout_of(self.cfg, mesh)
        saved = manifest["layout"]
        same = saved == here
        if not same and saved["sync"] != "every_step":
            keep = " ".join(f"parallel.{k}={saved[k]}" for k in ("dp", "tp", "pp", "zero"))
            why = ("its replicas differ between syncs" if saved["sync"] in DIVERGENT
                   else "it holds exchanges in flight, per rank")
            raise CheckpointError(f"checkpoint {str(path)!r} was saved with sync.strategy = {saved['sync']} under "
                                  f"dp={saved['dp']} tp={saved['tp']} pp={saved['pp']}, and {why}: resume it with "
                                  f"sync.strategy={saved['sync']} under the same layout ({keep}, "
                                  f"parallel.bucket_mb={saved['bucket_mb']}, the same world size)")
        same_optim = manifest.get("config", {}).get("optim", {}).get("name") == self.cfg.optim.name
        info = restore(tr, self.shards, path, manifest, same, with_optimizer=same_optim)
        self.skipped = info.get("skipped_steps", 0)
        self.last_path, self.last_step, self.start_step = path, tr.step, tr.step
        if self.lead:
            notes = []
            if not same:
                changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in here.items() if saved.get(k) != v)
                notes.append(f"layout changed ({changed}): RNG states, compression residuals and per-rank state "
                             f"start fresh")
            if not same_optim:
                notes.append(f"optim.name changed ({manifest['config']['optim']['name']} -> {self.cfg.optim.name}): "
                             f"the optimizer state starts fresh")
            print(f"plait: resuming from {path} (step {tr.step}, {tr.samples} samples, saved under dp={saved['dp']} "
                  f"tp={saved['tp']} pp={saved['pp']})" + "".join(f"; {n}" for n in notes), flush=True)
        mesh.comm.stats.reset_step(tr.step)  # the loading traffic is no training step's
        return {"path": path, "step": tr.step, "same_layout": same, **info}

    def init_weights(self, source: str) -> None:
        """Initial weights from a plait checkpoint or a safetensors export (no optimizer state, step 0)."""
        from plait.checkpoint.export import is_safetensors, load_safetensors

        if is_safetensors(source):
            load_safetensors(self.tr.model, source, self.mesh, self.tr.model_cfg)
        else:
            path = store.find(source)
            manifest = store.read_manifest(path)
            check_model(manifest.get("model", {}), self.tr.model_cfg, path / store.MANIFEST)
            self.verify(path, manifest)
            prefix = "replica0/" if manifest["layout"]["sync"] in DIVERGENT else ""
            load_model(self.tr, self.shards, path, prefix)
        if self.lead:
            print(f"plait: initial weights from {source} (checkpoint.init_from)", flush=True)
        self.mesh.comm.stats.reset_step(self.tr.step)

    # -- saving --------------------------------------------------------------------------------
    def manifest(self, reason: str, skipped: int) -> dict:
        tr = self.tr
        return {"step": tr.step, "samples": tr.samples, "skipped_steps": skipped, "reason": reason,
                "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "layout": layout_of(self.cfg, self.mesh), "model": model_record(tr.model_cfg),
                "config": C.to_dict(self.cfg), "torch": torch.__version__}

    def save(self, reason: str, skipped: int = 0) -> Path:
        """Write a checkpoint of the current step (collective); returns its final folder."""
        import torch.distributed.checkpoint as dcp

        tr, mesh = self.tr, self.mesh
        self.wait()
        final, tmp = store.step_dir(self.root, tr.step), store.tmp_dir(self.root, tr.step)
        if final.exists():  # this very step is saved already (resumed and stopped again at once)
            self.last_path, self.last_step = final, tr.step
            return final
        if self.lead:
            self.root.mkdir(parents=True, exist_ok=True)
            store.remove_stale(self.root)
        mesh.comm.barrier(mesh.world)  # nobody writes before the stale folders are gone
        sd = collect(tr, self.shards, copy=self.asynchronous, skipped=skipped)
        manifest = self.manifest(reason, skipped)
        if self.asynchronous:
            alone = {"no_dist": True} if single_process() else {}  # (torch 2.11's async_save may lack no_dist)
            fut = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self.group, **alone)
            self.pending = (fut, tmp, final, manifest)
        else:
            dcp.save(sd, checkpoint_id=str(tmp), no_dist=single_process())
            self._fault_in_save()
            mesh.comm.barrier(mesh.world)  # every rank's files are written
            if self.lead:
                self._commit(tmp, final, manifest)
            mesh.comm.barrier(mesh.world)
        self.last_path, self.last_step, self.last_time = final, tr.step, time.monotonic()
        mesh.comm.stats.reset_step(tr.step)  # the save's traffic is no training step's
        return final

    def _commit(self, tmp: Path, final: Path, manifest: dict) -> None:
        store.commit(tmp, final, manifest)
        store.prune(self.root, self.cfg.checkpoint.keep)

    def _fault_in_save(self) -> None:
        t = self.cfg.train
        if t.fault == "kill_in_save" and t.fault_rank == self.mesh.rank and t.fault_step == self.tr.step:
            if fault_once(self.root, "kill_in_save"):
                os.kill(os.getpid(), signal.SIGKILL)

    def poll(self) -> None:
        """Commit an asynchronous save that has finished (rank 0), without waiting."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Wait for the asynchronous save in flight, then commit it (rank 0)."""
        if self.pending is None:
            return
        fut, tmp, final, manifest = self.pending
        self.pending = None
        fut.result()
        if self.lead:
            self._commit(tmp, final, manifest)

    # -- the run's decisions -------------------------------------------------------------------
    def clock(self) -> tuple[bool, bool]:
        """(save due by checkpoint.every_minutes, stop due by train.exit_after_minutes), on this rank's clock."""
        c, t = self.cfg.checkpoint, self.cfg.train
        now = time.monotonic()
        save = c.every_minutes > 0 and now - self.last_time >= 60 * c.every_minutes
        stop = t.exit_after_minutes > 0 and now - self.started >= 60 * t.exit_after_minutes
        return save, stop

    def after_step(self, guard) -> str | None:
        """Save when due; returns the reason to stop now (a planned stop, after saving), or None."""
        self.poll()
        t, c = self.cfg.train, self.cfg.checkpoint
        step = self.tr.step
        stop = None
        if t.exit_after_steps and step - self.start_step >= t.exit_after_steps and step < t.steps:
            stop = "train.exit_after_steps"
        elif guard.stop_due and step < t.steps:
            stop = "train.exit_after_minutes"
        due = self.root is not None and ((c.every and step % c.every == 0) or guard.save_due)
        # a skipped step leaves the parameters good, but its compression residuals may not be: wait a step
        if stop or (due and not guard.last_skipped):
            self.save(stop or "periodic", guard.skipped_total)
        if stop:
            self.wait()
        return stop

    def finish(self, guard) -> None:
        """End of the run: a last checkpoint when checkpointing is on, and every save committed."""
        if self.periodic and self.root is not None and self.last_step != self.tr.step:
            self.save("end", guard.skipped_total)
        self.wait()


def fault_once(root: Path, kind: str) -> bool:
    """True the first time a debug fault fires for this checkpoint folder (a marker file makes it once)."""
    marker = Path(root) / f".fault-{kind}-done"
    if marker.exists():
        return False
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as f:
        f.write("fired\n")
        f.flush()
        os.fsync(f.fileno())
    return True
