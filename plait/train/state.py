"""`TrainState`: where the run is. Checkpoints save and load it like any other state object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (the learning-rate schedule follows from it)
    samples: int = 0  # the data position: global samples consumed
    skipped_steps: int = 0  # steps skipped on every rank for a non-finite loss or gradient norm

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.samples = int(sd["samples"])
        self.skipped_steps = int(sd.get("skipped_steps") or 0)
