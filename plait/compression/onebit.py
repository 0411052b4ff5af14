"""The data-parallel exchange owned by 1-bit Adam (plait.optim.onebit_adam).

Hand-off between the gradient reducer and the optimizer, decided per optimizer step:

- warm-up (the first `warmup_steps` steps): the reducer all-reduces gradients densely, exactly
  as without compression, and the optimizer runs plain Adam(W);
- compressed phase: `exchange` sends nothing and leaves each rank's LOCAL gradient in the bucket;
  the optimizer folds it into its momentum and sums the momentum over the group itself, 1-bit
  compressed (`momentum_sum`: the two-phase sign exchange with worker- and server-side error
  feedback). Gradients are therefore never all-reduced in this phase.

The optimizer owns the step count and sets `local` after each step, so the decision for the next
backward pass is the same on every rank before any bucket is issued. `parallelize()` installs
this object as the reducer's compressor when the optimizer (or its factory) exposes it as
`dp_exchange`.
"""

from __future__ import annotations

import torch

from plait.compression.base import Compressor, Pending
from plait.compression.quantized import SignCompressor


class OneBitExchange(Compressor):
    name = "onebit_adam"
    linear = False
    biased = True

    def __init__(self, warmup_steps: int = 100, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.warmup_steps = warmup_steps
        self.local = warmup_steps <= 0
        self.momentum = SignCompressor(error_feedback)

    def configure(self, warmup_steps: int, error_feedback: bool) -> None:
        """Take the dense phase's length and error feedback from the compression config section."""
        if warmup_steps < 1:
            raise ValueError("1-bit Adam needs at least one warm-up step to estimate the variance")
        self.warmup_steps = warmup_steps
        self.error_feedback = error_feedback
        self.momentum.error_feedback = error_feedback
        self.local = self.steps >= warmup_steps

    def bind(self, group, comm):
        self.momentum.bind(group, comm)
        return super().bind(group, comm)

    def exchange(self, key, flat, views):
        if self.local:
            return Pending()  # the optimizer sums the compressed momentum instead
        return Pending(self.comm.all_reduce(flat, self.group, async_op=True))

    def end_step(self) -> None:
        pass  # the optimizer counts steps (it also runs without a reducer, at dp = 1)

    def advance(self) -> None:
        """One optimizer step done: count it and decide the next step's gradient exchange."""
        self.steps += 1
        self.local = self.steps >= self.warmup_steps

    def momentum_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's flat fp32 `x`, sign-compressed with error feedback (in place)."""
        if self.world == 1:
            return x  # nothing to send
        self.momentum.exchange("momentum", x, ()).wait()
        return x

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["warmup_steps"] = self.warmup_steps
        sd["momentum"] = self.momentum.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.warmup_steps = int(sd["warmup_steps"])
        self.momentum.load_state_dict(sd["momentum"])
        self.local = self.steps >= self.warmup_steps
