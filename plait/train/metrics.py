"""What a run writes: metrics.jsonl, TensorBoard events, summary.json, plots; the progress bar.

`Metrics` owns when to log, each record and the summary. Only rank 0 writes. Step time is the
wall time between two logging steps divided by the steps between them: device values are read
on the host only at logging steps (that read waits for the device), so no step pays a device
synchronization for its own timing. Evaluation and checkpoint time are left out (`pause`).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from plait.checkpoint.store import latest
from plait.errors import ConfigError


def prepare_run_dir(path: Path, create: bool = True, checkpoints: Path | None = None) -> Path:
    """Create the run folder. One that already holds a run is accepted only when it holds a complete
    checkpoint to resume from (in `checkpoints`, default RUN/checkpoints); otherwise it is refused,
    so nothing written is overwritten. A resumed run appends to metrics.jsonl."""
    if (path / "metrics.jsonl").exists() or (path / "summary.json").exists():
        if latest(checkpoints if checkpoints is not None else path / "checkpoints") is None:
            raise ConfigError(f"run folder {str(path)!r} already holds a run and no complete "
                              "checkpoint to resume from: choose another --run-dir (or "
                              "log.run_dir), or move the old one away")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def human_bytes(n: float) -> str:
    """43.3 MB, 512 B (decimal units, as network rates are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human(key: str, v) -> str:
    """A summary or record value for people: 2,690 tok/s, 43.3 MB/step,
    losses to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if "loss" in key:
        return f"{v:.4g}"
    if key == "tokens_per_s":
        return f"{v:,.0f} tok/s"
    if key == "mfu":
        return f"{100 * v:.2f}%"
    if key.startswith("comm_bytes") and key.endswith("per_step"):
        return f"{human_bytes(v)}/step"
    if "bytes" in key:
        return human_bytes(v)
    if key.endswith("_s"):
        return f"{v:,.1f} s"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no metrics.jsonl)")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _drop_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without the records past `step`
    (a crashed session's, redone after resuming)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines()
             if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(path)


TB_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "comm_bytes",
           "critical_batch")


class Metrics:
    """Records of a run: `should_log(step)`, `step_done(...)` every step, `log(record)` at logging
    steps, `summary(...)` at the end. Host reads happen in the caller,
    only when `should_log` says."""

    def __init__(self, run_dir: Path | None, *, total_steps: int, log_every: int, seq_len: int,
                 world: int, flops_per_token: float, peak_flops: float, progress: bool,
                 tensorboard: bool, start_step: int = 0):
        self.run_dir, self.total, self.every = run_dir, total_steps, log_every
        self.seq_len, self.world = seq_len, world
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.start_step = start_step
        self.records: list[dict] = []
        self.fh = None
        self.tb = None
        if run_dir is not None:
            # a crash after the checkpoint: redone steps
            _drop_after(run_dir / "metrics.jsonl", start_step)
            self.fh = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:  # a resumed run drops the crashed session's later points here too
                self.tb = _tensorboard(run_dir / "tensorboard",
                                       purge_step=start_step + 1 if start_step else None)
        self.bar = None
        self.progress = progress
        if progress and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()
        self.comm_total = 0.0
        self.inter_total = 0.0  # the part on groups that cross nodes (plait.comm.accounting)
        self.steps_total = 0
        self.t_start = time.perf_counter()
        self._window_reset()

    # -- the clock -----------------------------------------------------------------------------
    def _window_reset(self) -> None:
        self.t_mark = time.perf_counter()
        self.w_steps = self.w_tokens = 0
        self.w_comm = self.w_inter = 0.0
        self.paused = 0.0

    @contextmanager
    def pause(self):
        """A context whose time (evaluation, a checkpoint) is not counted as training."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def step_done(self, global_batch: int, comm_bytes: float, inter_bytes: float = 0.0) -> None:
        """`inter_bytes`: the part of `comm_bytes` that crossed nodes (the replica group's)."""
        self.w_steps += 1
        self.w_tokens += global_batch * self.seq_len
        self.w_comm += comm_bytes
        self.w_inter += inter_bytes
        self.comm_total += comm_bytes
        self.inter_total += inter_bytes
        self.steps_total += 1

    def should_log(self, step: int, *, forced: bool = False) -> bool:
        return forced or step % self.every == 0 or step == self.total

    # -- records -------------------------------------------------------------------------------
    def log(self, rec: dict) -> dict:
        """Complete `rec` (host values only) with the window's timing and traffic, then write it."""
        dt = max(time.perf_counter() - self.t_mark - self.paused, 1e-9)
        steps = max(1, self.w_steps)
        rec.update(step_s=dt / steps, window_steps=steps, window_s=dt,
                   tokens_per_s=self.w_tokens / dt,
                   mfu=self.flops_per_token * self.w_tokens / dt / (self.world * self.peak),
                   comm_bytes=self.w_comm / steps,
                   comm_bytes_intra=(self.w_comm - self.w_inter) / steps,
                   comm_bytes_inter=self.w_inter / steps)
        self._window_reset()
        self.records.append(rec)
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.tb is not None:
            for k in TB_KEYS:
                if isinstance(rec.get(k), (int, float)):
                    self.tb.add_scalar(k, rec[k], rec["step"])
            if rec.get("bubble"):
                self.tb.add_scalar("bubble", sum(rec["bubble"]) / len(rec["bubble"]), rec["step"])
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], info=self.info(rec))
        elif self.progress:
            every = max(1, self.total // 10)
            if (rec["step"] % every == 0 or rec["step"] == self.total
                    or rec.get("val_loss") is not None):
                print(f"step {rec['step']:>5}/{self.total}  {self.info(rec)}", flush=True)
        return rec

    @staticmethod
    def info(rec: dict) -> str:
        loss = human("loss", rec["loss"]) + (" (this rank)" if rec.get("loss_is_local") else "")
        s = f"loss {loss}  {rec['tokens_per_s']:,.0f} tok/s  MFU {100 * rec['mfu']:.1f}%  " \
            f"comm {human_bytes(rec['comm_bytes'])}/step"
        if rec.get("val_loss") is not None:
            s += f"  val {human('val_loss', rec['val_loss'])}"
        return s

    def summary(self, **fields) -> dict:
        """Run totals over this session's logged windows; the window holding the first step after
        the start pays one-off warm-up and is left out when there are others."""
        recs = self.records
        steady = [r for r in recs if r["step"] - r["window_steps"] >= self.start_step + 1] or recs
        secs = sum(r["window_s"] for r in steady) or float("nan")
        tokens = sum(r["tokens_per_s"] * r["window_s"] for r in steady)
        tps = tokens / secs
        return {"final_train_loss": recs[-1]["loss"] if recs else None,
                "tokens_per_s": tps, "mfu": self.flops_per_token * tps / (self.world * self.peak),
                "comm_bytes_per_step": self.comm_total / max(1, self.steps_total),
                "comm_bytes_intra_per_step": ((self.comm_total - self.inter_total)
                                              / max(1, self.steps_total)),
                "comm_bytes_inter_per_step": self.inter_total / max(1, self.steps_total),
                **fields}

    def wall_s(self) -> float:
        """Seconds since the metrics started (this session's training, evaluation and saves)."""
        return time.perf_counter() - self.t_start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.fh:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(path: Path, purge_step: int | None = None):
    """A SummaryWriter when tensorboard is installed (the `tb` extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; log.tensorboard=false silences nothing else
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def plot_run(run_dir: Path) -> list[Path]:
    """PNG plots of a run: loss (train and validation) and throughput against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    steps = [r["step"] for r in recs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [r["loss"] for r in recs], label="train")
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    if val:
        a.plot(*zip(*val), "o-", label="validation")
    a.set_xlabel("step")
    a.set_ylabel("loss (nats/token)")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(steps, [r["tokens_per_s"] for r in recs])
    b.set_xlabel("step")
    b.set_ylabel("tokens/s")
    b.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]
