"""`Checkpointer`: when to save, saving (atomic, optionally asynchronous),
and resuming a run's state objects.

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
from pathlib import Path

import torch

from plait.checkpoint import store
from plait.checkpoint.export import is_safetensors, load_safetensors
from plait.checkpoint.snapshot import Parts, collect, load_model, restore, single_process
from plait.checkpoint.state import DIVERGENT, Shards, layout_of
from plait.checkpoint.store import CheckpointError
from plait.config import Config, to_dict
from plait.errors import ConfigError


def root_of(cfg: Config, run_dir: Path | None) -> Path | None:
    """Where a run's checkpoints live: checkpoint.dir, else RUN_DIR/checkpoints."""
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    return Path(run_dir) / "checkpoints" if run_dir is not None else None



def _layout(saved: dict) -> str:
    """A saved layout as the console names it: replicas when there were several."""
    rep = f"replicas={saved['replicas']} " if saved.get("replicas", 1) > 1 else ""
    return f"{rep}dp={saved['dp']} tp={saved['tp']} pp={saved['pp']}"

class Checkpointer:
    """Saves and restores `parts` (plait.checkpoint.snapshot.Parts); `model_cfg` is recorded in the
    manifest and checked on resume (its shape-deciding fields must match)."""

    def __init__(self, cfg: Config, run_dir: Path | None, parts: Parts, model_cfg):
        self.tr = parts
        self.model_cfg = model_cfg
        self.cfg, self.mesh = cfg, parts.mesh
        c, t = self.cfg.checkpoint, self.cfg.train
        self.root = root_of(self.cfg, run_dir)
        self.periodic = c.every > 0 or c.every_minutes > 0
        needs = [k for k, v in (("checkpoint.every", c.every),
                                ("checkpoint.every_minutes", c.every_minutes),
                                ("train.exit_after_steps", t.exit_after_steps),
                                ("train.exit_after_minutes", t.exit_after_minutes),
                                ("train.fault", t.fault in ("kill", "kill_in_save"))) if v]
        if needs and self.root is None:
            raise ConfigError(f"{needs[0]} saves checkpoints, but this run has no folder for them: "
                              f"give --run-dir (or log.run_dir) or checkpoint.dir")
        self.lead = self.mesh.rank == 0
        self.shards = Shards(self.mesh)
        self.group = None
        if c.async_save and self.mesh.world_size > 1:  # DCP's background thread gets its own group
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo",
                                        timeout=datetime.timedelta(seconds=t.timeout_s))
        self.asynchronous = c.async_save
        self.pending = None  # (future, tmp, final, manifest) of an asynchronous save in flight
        self.last_path: Path | None = None
        self.last_step: int | None = None
        self.last_time = self.started = time.monotonic()
        self.start_step = 0
        self.owed = False  # a save fell due on a skipped step: made on the next good one

    # -- resuming ------------------------------------------------------------------------------
    def _agree(self, path: Path | None) -> Path | None:
        """The same checkpoint on every rank (one all-reduce), or CheckpointError."""
        step = int(path.name.split("-")[1]) if path is not None else -1
        both = torch.tensor([step, -step], dtype=torch.float64, device=self.mesh.device)
        self.mesh.comm.all_reduce(both, self.mesh.world, op="max")
        if int(both[0]) != -int(both[1]):
            raise CheckpointError(f"ranks see different latest checkpoints in {str(self.root)!r} "
                                  f"(steps {-int(both[1])} to {int(both[0])}): checkpoint.dir must "
                                  f"be one folder every rank reads (a shared filesystem)")
        return path

    def _newest_good(self) -> tuple[Path, dict] | None:
        """The newest complete checkpoint whose files verify. Damaged newer ones are then moved
        aside to `<name>.damaged` (kept, never deleted; their steps will be saved again), saying so.
        When none verifies, the newest one's damage is the error and nothing changes."""
        candidates = store.complete(self.root) if self.root is not None else []
        damaged: list[tuple[Path, CheckpointError]] = []
        while True:
            path = self._agree(candidates.pop() if candidates else None)
            if path is None:
                if len(damaged) > 1:
                    older = ", ".join(d.name for d, _ in damaged[1:])
                    raise CheckpointError(f"{damaged[0][1]}; no older checkpoint verifies either "
                                          f"({older})")
                if damaged:
                    raise damaged[0][1]
                return None
            manifest = store.read_manifest(path)
            try:
                self.verify(path, manifest)
            except CheckpointError as e:
                damaged.append((path, e))
                continue
            for bad, e in damaged:
                aside = bad.with_name(bad.name + ".damaged")
                if self.lead:
                    # the fallback is the remedy it names
                    what = str(e).split(". Nothing was changed")[0]
                    print(f"plait: warning: {what}. Falling back to {path.name}; the damaged "
                          f"checkpoint is kept as {aside}", flush=True)
                    bad.rename(aside)
            self.mesh.comm.barrier(self.mesh.world)
            return path, manifest

    def verify(self, path: Path, manifest: dict) -> None:
        """Check every file's size and sha256 against the manifest
        (spread over ranks; all agree)."""
        files = manifest.get("files") or []
        mesh = self.mesh
        codes = torch.zeros(max(1, len(files)), device=mesh.device)
        local = {}
        for i, entry in enumerate(files):
            if i % mesh.world_size == mesh.rank:
                problem = store.check_file(path, entry)
                if problem is not None:
                    local[i] = problem
                    codes[i] = (1.0 if problem == "is missing" else 2.0 if "bytes" in problem
                                else 3.0)
        mesh.comm.all_reduce(codes, mesh.world)
        bad = [i for i, v in enumerate(codes.tolist()) if v]
        if bad:
            i = bad[0]
            kinds = {1: "is missing", 2: "has the wrong size (truncated or overwritten)",
                     3: "does not match its sha256 (corrupted)"}
            why = local.get(i, kinds[int(codes[i])])  # the rank that checked it has the details
            raise CheckpointError(f"checkpoint file {str(path / files[i]['name'])!r} {why}; "
                                  f"{len(bad)} of {len(files)} files are damaged. Nothing was "
                                  f"changed: remove or move {str(path)!r} to resume from an older "
                                  "checkpoint")

    def resume(self) -> dict | None:
        """Continue from the newest complete checkpoint under the root, if any (collective).

        Else, with checkpoint.init_from, take the initial weights from there.
        Returns what was loaded.
        """
        tr, mesh = self.tr, self.mesh
        found = self._newest_good()
        if found is None:
            if self.cfg.checkpoint.init_from:
                self.init_weights(self.cfg.checkpoint.init_from)
            return None
        path, manifest = found
        store.check_model(manifest.get("model", {}), self.model_cfg, path / store.MANIFEST)
        here = layout_of(self.cfg, mesh)
        saved = {"replicas": 1, **manifest["layout"]}  # saved before parallel.replicas existed
        same = saved == here
        if not same and saved["sync"] != "every_step":
            keep = " ".join(f"parallel.{k}={saved[k]}"
                            for k in ("replicas", "dp", "tp", "pp", "zero"))
            why = ("its replicas differ between syncs" if saved["sync"] in DIVERGENT
                   else "it holds exchanges in flight, per rank")
            raise CheckpointError(f"checkpoint {str(path)!r} was saved with sync.strategy = "
                                  f"{saved['sync']} under {_layout(saved)}, and {why}: resume it "
                                  f"with sync.strategy={saved['sync']} under the same layout "
                                  f"({keep}, parallel.bucket_mb={saved['bucket_mb']}, the same "
                                  "world size)")
        same_optim = manifest.get("config", {}).get("optim", {}).get("name") == self.cfg.optim.name
        info = restore(tr, self.shards, path, manifest, same, with_optimizer=same_optim)
        step = tr.state.step
        self.last_path, self.last_step, self.start_step = path, step, step
        if self.lead:
            notes = []
            if not same:
                changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in here.items()
                                    if saved.get(k) != v)
                notes.append(f"layout changed ({changed}): RNG states, compression residuals and "
                             f"per-rank state start fresh")
            if not same_optim:
                notes.append(f"optim.name changed ({manifest['config']['optim']['name']} -> "
                             f"{self.cfg.optim.name}): the optimizer state starts fresh")
            print(f"plait: resuming from {path} (step {step}, {tr.state.samples} samples, saved "
                  f"under {_layout(saved)})"
                  + "".join(f"; {n}" for n in notes), flush=True)
        mesh.comm.stats.reset_step(step)  # the loading traffic is no training step's
        return {"path": path, "step": step, "same_layout": same, **info}

    def init_weights(self, source: str) -> None:
        """Initial weights from a plait checkpoint or a safetensors export
        (no optimizer state, step 0)."""
        if is_safetensors(source):
            load_safetensors(self.tr.model, source, self.mesh, self.model_cfg)
        else:
            path = store.find(source)
            manifest = store.read_manifest(path)
            store.check_model(manifest.get("model", {}), self.model_cfg, path / store.MANIFEST)
            self.verify(path, manifest)
            prefix = "replica0/" if manifest["layout"]["sync"] in DIVERGENT else ""
            load_model(self.tr, self.shards, path, prefix)
        if self.lead:
            print(f"plait: initial weights from {source} (checkpoint.init_from)", flush=True)
        self.mesh.comm.stats.reset_step(self.tr.state.step)

    # -- saving --------------------------------------------------------------------------------
    def manifest(self, reason: str) -> dict:
        st = self.tr.state
        return {"step": st.step, "samples": st.samples, "skipped_steps": st.skipped_steps,
                "reason": reason, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "layout": layout_of(self.cfg, self.mesh),
                "model": store.model_record(self.model_cfg),
                "config": to_dict(self.cfg), "torch": torch.__version__}

    def save(self, reason: str) -> Path:
        """Write a checkpoint of the current step (collective); returns its final folder."""
        import torch.distributed.checkpoint as dcp

        tr, mesh = self.tr, self.mesh
        step = tr.state.step
        self.wait()
        final, tmp = store.step_dir(self.root, step), store.tmp_dir(self.root, step)
        if final.exists():  # this very step is saved already (resumed and stopped again at once)
            self.last_path, self.last_step = final, step
            return final
        if self.lead:
            self.root.mkdir(parents=True, exist_ok=True)
            store.remove_stale(self.root)
        mesh.comm.barrier(mesh.world)  # nobody writes before the stale folders are gone
        sd = collect(tr, self.shards, copy=self.asynchronous)
        manifest = self.manifest(reason)
        if self.asynchronous:
            # (torch 2.11's async_save may lack no_dist)
            alone = {"no_dist": True} if single_process() else {}
            fut = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self.group, **alone)
            self.pending = (fut, tmp, final, manifest)
        else:
            dcp.save(sd, checkpoint_id=str(tmp), no_dist=single_process())
            self._fault_in_save()
            mesh.comm.barrier(mesh.world)  # every rank's files are written
            if self.lead:
                self._commit(tmp, final, manifest)
            mesh.comm.barrier(mesh.world)
        self.last_path, self.last_step, self.last_time = final, step, time.monotonic()
        mesh.comm.stats.reset_step(step)  # the save's traffic is no training step's
        return final

    def _commit(self, tmp: Path, final: Path, manifest: dict) -> None:
        store.commit(tmp, final, manifest)
        store.prune(self.root, self.cfg.checkpoint.keep)

    def _fault_in_save(self) -> None:
        t = self.cfg.train
        if (t.fault == "kill_in_save" and t.fault_rank == self.mesh.rank
                and t.fault_step == self.tr.state.step):
            if store.fault_once(self.root, "kill_in_save"):
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
        """(save due by checkpoint.every_minutes, stop due by train.exit_after_minutes),
        on this rank's clock."""
        c, t = self.cfg.checkpoint, self.cfg.train
        now = time.monotonic()
        save = c.every_minutes > 0 and now - self.last_time >= 60 * c.every_minutes
        stop = t.exit_after_minutes > 0 and now - self.started >= 60 * t.exit_after_minutes
        return save, stop

    def after_step(self, *, save_due: bool = False, stop_due: bool = False,
                   skipped: bool = False) -> str | None:
        """Save when due; returns the reason to stop now (a planned stop, after saving), or None.

        `save_due` / `stop_due`: the step's agreed clock decisions; `skipped`: the step's update was
        skipped (its compression residuals may not be good: a save due now waits for the next good
        step).
        """
        self.poll()
        t, c = self.cfg.train, self.cfg.checkpoint
        step = self.tr.state.step
        stop = None
        if t.exit_after_steps and step - self.start_step >= t.exit_after_steps and step < t.steps:
            stop = "train.exit_after_steps"
        elif stop_due and step < t.steps:
            stop = "train.exit_after_minutes"
        self.owed |= self.root is not None and ((c.every and step % c.every == 0) or save_due)
        if stop or (self.owed and not skipped):
            self.save(stop or "periodic")
            self.owed = False
        if stop:
            self.wait()
        return stop

    def finish(self) -> None:
        """End of the run: a last checkpoint when checkpointing is on, and every save committed."""
        if self.periodic and self.root is not None and self.last_step != self.tr.state.step:
            self.save("end")
        self.wait()
