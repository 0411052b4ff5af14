"""What each pp rank did when: a Chrome-trace / Perfetto JSON and a Gantt chart PNG.

Events come from `PipelineRunner.gather_timeline()`: per rank, rows (kind, micro-batch, chunk,
start, end) in seconds of one clock shared by the ranks of a machine (wall-clock based, so across
machines only as good as their clock sync). Kinds: F forward, B backward (input gradient only,
under ZB-H1), W weight gradient, comm (posting a batch of sends/receives, or the tp all-gather
that rebuilds a sliced hidden state), wait (blocked on a receive, or on the last sends at the end
of the step), dp (an instant: the data-parallel exchange of a gradient bucket issued from the
gradient hooks of its chunk's last backward, or for ZeRO-3 a unit's reduce-scatter turned on at
the start of that backward; its "micro-batch" field is the bucket's (unit's) index; what the
optimizer step issues afterwards is not in the timeline). Whatever is in no event is idle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from plait.pipeline.schedules import theoretical_bubble

KINDS = ("F", "B", "W", "comm", "wait", "dp")
CATEGORY = {"F": "forward", "B": "backward", "W": "weight-gradient", "comm": "communication",
            "wait": "wait", "dp": "data-parallel exchange issued"}
COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#E1B12C", "comm": "#8172B2", "wait": "#D65F5F",
          "dp": "#000000"}
IDLE = "#E6E6E6"


@dataclass
class Timeline:
    ranks: list[list[list[float]]]  # per pp rank: [kind index, mb, chunk, t0, t1]
    schedule: str
    p: int
    m: int
    v: int
    bubbles: list[float]

    def _origin(self) -> float:
        starts = [e[3] for r in self.ranks for e in r]
        return min(starts) if starts else 0.0

    @staticmethod
    def _name(kind: str, mb: int, chunk: int, v: int) -> str:
        if mb < 0:
            return kind
        if kind == "dp":
            return f"dp bucket {mb}"
        return f"{kind}{mb}" + (f".{chunk}" if v > 1 and kind in ("F", "B", "W") else "")

    def to_chrome_trace(self) -> dict:
        t0 = self._origin()
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "pipeline"}}]
        for r, rows in enumerate(self.ranks):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                           "args": {"name": f"pp rank {r}"}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": r,
                           "args": {"sort_index": r}})
            for kind_i, mb, chunk, a, b in rows:
                kind = KINDS[int(kind_i)]
                ev = {"name": self._name(kind, int(mb), int(chunk), self.v), "cat": CATEGORY[kind],
                      "ph": "X", "pid": 0, "tid": r, "ts": (a - t0) * 1e6,
                      "dur": max(0.0, b - a) * 1e6,
                      "args": {"micro_batch": int(mb), "chunk": int(chunk)}}
                if kind == "dp":  # an instant on the rank's row
                    ev.update(ph="i", s="t", args={"bucket": int(mb), "chunk": int(chunk)})
                    del ev["dur"]
                events.append(ev)
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"schedule": self.schedule, "pp": self.p, "micro_batches": self.m,
                              "virtual_stages": self.v, "bubble_per_rank": self.bubbles}}

    def write_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome_trace()))
        return path

    def plot(self, path: str | Path) -> Path:
        """Gantt chart: one row per rank (rank 0 on top), idle shown as the grey row background."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        t0 = self._origin()
        end = max((e[4] for r in self.ranks for e in r), default=t0)
        span_ms = max((end - t0) * 1e3, 1e-6)
        fig, ax = plt.subplots(figsize=(13, 0.55 * self.p + 1.6))
        for r, rows in enumerate(self.ranks):
            y = self.p - 1 - r
            lo = min((e[3] for e in rows), default=t0)
            hi = max((e[4] for e in rows), default=t0)
            ax.broken_barh([((lo - t0) * 1e3, (hi - lo) * 1e3)], (y - 0.4, 0.8), facecolors=IDLE)
            for kind_i, mb, chunk, a, b in rows:
                kind = KINDS[int(kind_i)]
                x, w = (a - t0) * 1e3, (b - a) * 1e3
                if kind == "dp":  # a tick above the row
                    ax.plot([x, x], [y + 0.3, y + 0.5], color=COLORS[kind], linewidth=1.0)
                    continue
                h = 0.8 if kind in ("F", "B", "W") else 0.3
                ax.broken_barh([(x, w)], (y - h / 2, h), facecolors=COLORS[kind],
                               edgecolors="white", linewidth=0.4)
                if kind in ("F", "B", "W") and w > span_ms / 70:
                    ax.text(x + w / 2, y, self._name(kind, int(mb), int(chunk), self.v)[1:],
                            ha="center", va="center", fontsize=7,
                            color="white" if kind != "W" else "black")
        ax.set_yticks(range(self.p))
        ax.set_yticklabels([f"rank {self.p - 1 - i}\n{100 * self.bubbles[self.p - 1 - i]:.0f}% idle"
                            if len(self.bubbles) == self.p else f"rank {self.p - 1 - i}"
                            for i in range(self.p)])
        ax.set_xlabel("time (ms)")
        theory = theoretical_bubble(self.schedule, self.p, self.m, self.v) if self.m else 0.0
        ax.set_title(f"{self.schedule}: p={self.p}, m={self.m}, v={self.v}; measured bubble "
                     f"{100 * sum(self.bubbles) / max(1, len(self.bubbles)):.1f}% "
                     f"(mean over ranks), theory with equal stages {100 * theory:.1f}%",
                     fontsize=10)
        handles = ([Patch(color=COLORS[k], label=CATEGORY[k]) for k in KINDS]
                   + [Patch(color=IDLE, label="idle")])
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=7,
                  fontsize=8, frameon=False)
        ax.set_xlim(0, span_ms * 1.01)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
