"""Progress of `plait data prepare`: a rich bar on a terminal, a plain line every 10 s otherwise."""

from __future__ import annotations

import sys
import time


def _rate(n: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


class Progress:
    """Input bytes read and tokens written so far, with their rates (MB/s, tokens/s)."""

    def __init__(self, total_bytes: int, enabled: bool = True, every_s: float = 10.0):
        self.total = max(1, total_bytes)
        self.enabled = enabled
        self.every_s = every_s
        self.bar = None
        self.t0 = time.perf_counter()
        self.last_line = self.t0
        self.done = self.tokens = 0

    def __enter__(self) -> Progress:
        if self.enabled and sys.stdout.isatty():
            from rich import progress as rp

            self.bar = rp.Progress(rp.TextColumn("prepare"), rp.BarColumn(),
                                   rp.TextColumn("{task.percentage:>3.0f}%"),
                                   rp.TimeElapsedColumn(), rp.TimeRemainingColumn(),
                                   rp.TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("prepare", total=self.total, info="")
            self.bar.start()
        return self

    def info(self) -> str:
        dt = max(1e-9, time.perf_counter() - self.t0)
        return (f"{self.done / 1e6:,.1f} / {self.total / 1e6:,.1f} MB  "
                f"{self.done / 1e6 / dt:.2f} MB/s  {_rate(self.tokens / dt, 'tokens/s')}")

    def update(self, done: int, tokens: int) -> None:
        self.done, self.tokens = done, tokens
        if self.bar is not None:
            self.bar.update(self.task, completed=min(done, self.total), info=self.info())
        elif self.enabled and done < self.total and \
                time.perf_counter() - self.last_line >= self.every_s:
            self.last_line = time.perf_counter()
            print(f"prepare {100 * done / self.total:3.0f}%  {self.info()}", flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and exc[0] is None:
            print(f"prepare 100%  {self.info()}", flush=True)
