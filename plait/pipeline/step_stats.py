"""The pipeline runner's per-step measurements, gathered over pp when asked.

Each training step leaves one row per rank (`STAT_FIELDS`: loss slot, step time, busy time,
in-flight peaks) on its rank; `collect_stats()` all-gathers the rows of the steps not yet gathered
(one all-gather over `mesh.pp`), and the properties built on it are collectives of the pp group
too: every member calls them in the same order.
"""

from __future__ import annotations

from collections import deque

import torch

from plait.pipeline.p2p import gather_rows
from plait.pipeline.schedules import theoretical_bubble

STAT_FIELDS = ("loss", "wall_s", "busy_s", "peak_in_flight", "peak_saved_bytes")


class StepStats:
    """What `PipelineRunner` measures, mixed into it: needs `mesh`, `p`, `schedule`, `v`, `m`,
    `events`, `_rows` (this rank's rows not yet gathered) and `_history` (per step, every pp
    rank's measurements)."""

    _rows: list[list[float]]
    _history: deque

    def collect_stats(self) -> list[dict]:
        """Gather every pp rank's measurements of the steps since the last call (collective over pp,
        one all-gather); returns the last step's, per pp rank."""
        if self._rows:
            k, n = len(self._rows), len(STAT_FIELDS)
            local = torch.tensor(self._rows, dtype=torch.float64,
                                 device=self.mesh.device).reshape(-1)
            out = torch.empty(self.p * k * n, dtype=torch.float64, device=self.mesh.device)
            self.mesh.comm.all_gather(out, local, self.mesh.pp)
            table = out.view(self.p, k, n).tolist()
            self._rows = []
            for j in range(k):
                stats = [dict(zip(STAT_FIELDS, table[r][j])) for r in range(self.p)]
                for st in stats:
                    st["bubble"] = 1.0 - st["busy_s"] / st["wall_s"] if st["wall_s"] > 0 else 0.0
                self._history.append(stats)
        return self._history[-1] if self._history else []

    @property
    def stats(self) -> list[dict]:
        """The last training step's measurements, per pp rank (collective: see collect_stats)."""
        return self.collect_stats()

    @property
    def history(self) -> deque:
        """Per training step: `stats` (collective: see collect_stats)."""
        self.collect_stats()
        return self._history

    def bubbles(self) -> list[float]:
        """Measured idle fraction of each pp rank in the last training step (collective over pp)."""
        return [s["bubble"] for s in self.stats]

    def summary(self) -> dict:
        """Medians over the training steps (the first excluded when there are more) of the
        measurements."""
        history = self.history
        steps = list(history)[1:] or list(history)
        if not steps:
            return {}
        per_rank = [sorted(step[r]["bubble"] for step in steps) for r in range(self.p)]
        bubble = [v[len(v) // 2] for v in per_rank]
        return {"schedule": self.schedule, "pp": self.p, "virtual_stages": self.v,
                "micro_batches": self.m, "bubble_per_rank": bubble,
                "bubble_mean": sum(bubble) / self.p,
                "bubble_theory": theoretical_bubble(self.schedule, self.p, self.m, self.v),
                "peak_in_flight_per_rank": [max(int(step[r]["peak_in_flight"]) for step in steps)
                                            for r in range(self.p)],
                "peak_saved_bytes_per_rank": [
                    max(int(step[r]["peak_saved_bytes"]) for step in steps) for r in range(self.p)]}

    def gather_timeline(self):
        """Every pp rank's events of the last training step (collective over pp)."""
        from plait.pipeline.timeline import Timeline

        rows = torch.tensor(self.events, dtype=torch.float64).reshape(-1, 5).to(self.mesh.device)
        per_rank = [t.cpu().tolist() for t in gather_rows(self.mesh.comm, self.mesh.pp, rows)]
        return Timeline(per_rank, self.schedule, self.p, self.m, self.v, self.bubbles())
