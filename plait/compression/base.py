"""The compressor interface, its trivial baseline and the two casts.

A compressor decides how one gradient bucket is exchanged over the data-parallel group. The
reducer (plait.data_parallel.GradReducer) calls `exchange(key, flat, views)` for each bucket, in
bucket order, the same on every rank; when the returned handle's `wait()` returns, `flat` holds the
SUM over the group of every rank's (decompressed) contribution, identical on every rank. `views`
are the per-parameter views into `flat` (PowerSGD compresses each matrix on its own).

Communication contract shared by every compressor:
- all traffic goes through `comm` (plait.comm.Comm) on the bound group, so bytes are counted;
- `exchange` may issue its first collective asynchronously; any later phase runs inside
  `wait()`. The reducer waits buckets in bucket order, so every rank issues the same collectives
  in the same order (never readiness order);
- `linear` says whether payloads can be summed by all-reduce (casts, PowerSGD) or need an
  all-gather / a two-phase exchange (sign, int8, top-k);
- `biased` says whether error feedback applies: the residual (what the compressor dropped) is
  kept per bucket and added to the next step's gradient. Round-to-nearest casts are treated as
  unbiased (relative error 2^-11 for fp16, 2^-8 for bf16, zero-mean in practice) and keep none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from plait.comm import Comm, Group, Handle


class Pending:
    """A bucket exchange in flight: wait for `first`, then run `then` (later phases, decoding)."""

    def __init__(self, first: Handle | None = None, then: Callable[[], None] | None = None):
        self._first = first
        self._then = then
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        if self._first is not None:
            self._first.wait()
        if self._then is not None:
            self._then()
        self.done = True


class Compressor:
    """Base class: binding to a group, error-feedback buffers, step count, state for checkpoints."""

    name = "base"
    linear = True
    biased = False

    def __init__(self, error_feedback: bool = True):
        self.error_feedback = bool(error_feedback) and self.biased
        self.group: Group | None = None
        self.comm: Comm | None = None
        self.steps = 0  # completed optimizer steps (the reducer calls end_step once per step)
        self.errors: dict[str, torch.Tensor] = {}  # worker-side residual per bucket key

    def bind(self, group: Group, comm: Comm) -> Compressor:
        """Attach the data-parallel group and the rank's Comm (done by GradReducer)."""
        self.group, self.comm = group, comm
        return self

    @property
    def world(self) -> int:
        return self.group.size if self.group is not None else 1

    def exchange(self, key: int, flat: torch.Tensor, views: Sequence[torch.Tensor]) -> Pending:
        raise NotImplementedError

    def poll(self) -> None:
        """Move exchanges in flight on without blocking (the reducer calls it from each gradient
        hook); nothing to do for a one-level exchange."""

    def end_step(self) -> None:
        self.steps += 1

    # -- error feedback ----------------------------------------------------------------------
    def with_error(self, key: int, flat: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """fp32 copy of `flat` (zero-padded to `length`) plus this bucket's residual, if kept."""
        length = length or flat.numel()
        x = torch.zeros(length, dtype=torch.float32, device=flat.device)
        x[: flat.numel()].copy_(flat)
        if self.error_feedback:
            e = self.errors.get(str(key))
            if e is not None:
                if e.numel() != length:  # a residual restored from a checkpoint of other settings
                    raise ValueError(
                        f"{self.name} compression: bucket {key}'s error-feedback residual has "
                        f"{e.numel()} elements, this run's bucket needs {length}: resume with the "
                        "compression.*, parallel.bucket_mb and parallel.dp settings the "
                        "checkpoint was saved with")
                x.add_(e)
        return x

    def keep_error(self, key: int, residual: torch.Tensor) -> None:
        if self.error_feedback:
            self.errors[str(key)] = residual

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's compressor state. Residuals differ per dp rank: save one per rank."""
        return {"name": self.name, "steps": self.steps,
                "errors": {k: v.clone() for k, v in self.errors.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("name") != self.name:
            raise ValueError(f"compressor state of {sd.get('name')!r} cannot be loaded into "
                             f"{self.name!r}: resume with the same compression.name")
        self.steps = int(sd["steps"])
        self.errors = {k: v.clone() for k, v in sd["errors"].items()}


class NoCompression(Compressor):
    """The uncompressed baseline: one asynchronous SUM all-reduce of the bucket, in place.

    Bytes per rank: 2(n−1)/n · 4d for d fp32 elements (the plain reducer's exchange, unchanged).
    """

    name = "none"

    def exchange(self, key, flat, views):
        return Pending(self.comm.all_reduce(flat, self.group, async_op=True))


class CastCompressor(Compressor):
    """Cast to a 16-bit float, SUM all-reduce in that type, cast back (linear: casts add up).

    Bytes per rank: 2(n−1)/n · 2d. The sum itself runs in 16 bits (gloo and NCCL both reduce
    fp16 and bf16 natively), so it rounds once per rank added; gradients here are already scaled
    to their share of the global mean, far from fp16's range limit.
    """

    dtype = torch.float16

    def exchange(self, key, flat, views):
        payload = flat.to(self.dtype)
        h = self.comm.all_reduce(payload, self.group, async_op=True)
        return Pending(h, lambda: flat.copy_(payload))


class FP16Compressor(CastCompressor):
    name = "fp16"
    dtype = torch.float16


class BF16Compressor(CastCompressor):
    name = "bf16"
    dtype = torch.bfloat16
