"""What a run writes: metrics.jsonl, summary.json, the resolved config, plots; and the progress bar.

Only rank 0 writes. Files are created in the run folder given by the launcher.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from plait.errors import ConfigError


def prepare_run_dir(path: Path, create: bool = True, checkpoints: Path | None = None) -> Path:
    """Create the run folder. One that already holds a run is accepted only when it holds a complete
    checkpoint to resume from (in `checkpoints`, default RUN/checkpoints); otherwise it is refused,
    so nothing written is overwritten. A resumed run appends to metrics.jsonl."""
    if (path / "metrics.jsonl").exists() or (path / "summary.json").exists():
        from plait.checkpoint import latest

        if latest(checkpoints if checkpoints is not None else path / "checkpoints") is None:
            raise ConfigError(f"run folder {str(path)!r} already holds a run and no complete checkpoint to resume "
                              f"from: choose another --run-dir (or log.run_dir), or move the old one away")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class RunLog:
    """metrics.jsonl writer plus console progress (a rich bar on a terminal, plain lines otherwise)."""

    def __init__(self, run_dir: Path | None, total_steps: int, progress: bool = True):
        self.run_dir = run_dir
        self.total = total_steps
        self.fh = open(run_dir / "metrics.jsonl", "a") if run_dir else None
        self.records: list[dict] = []
        self.bar = None
        self.tty = sys.stdout.isatty()
        if progress and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total_steps, info="")
            self.bar.start()
        self.progress = progress
        self.t0 = time.perf_counter()

    @staticmethod
    def info(rec: dict) -> str:
        s = f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:,.0f} tok/s  MFU {100 * rec['mfu']:.1f}%  " \
            f"comm {human_bytes(rec['comm_bytes'])}/step"
        if rec.get("val_loss") is not None:
            s += f"  val {rec['val_loss']:.4f}"
        return s

    def log(self, rec: dict) -> None:
        self.records.append(rec)
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], info=self.info(rec))
        elif self.progress:
            every = max(1, self.total // 10)
            if rec["step"] % every == 0 or rec["step"] == self.total or rec.get("val_loss") is not None:
                print(f"step {rec['step']:>5}/{self.total}  {self.info(rec)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.fh:
            self.fh.close()


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no metrics.jsonl)")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


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
