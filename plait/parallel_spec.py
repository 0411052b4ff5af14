"""What a model tells plait's parallel transforms: the `ParallelSpec`, and how it is found.

The transforms (`tensor_parallel`, `pipeline`, `data_parallel`, activation checkpointing,
per-block compile) name no model. What is model-specific comes from the model's side:

- the tensor-parallel plan table (module-name pattern -> style) and the model's own divisibility
  checks, run before any layer is split;
- the pipeline cut: the model as an ordered list of `Layer`s, the tables every stage keeps, and
  the shape / dtype of the hidden state sent between stages;
- the repeated block classes (full activation checkpointing, ZeRO-3 units, per-block compile) and
  the attention core that selective checkpointing recomputes;
- the loss over the unsplit head's logits.

`spec_of(model)` finds a model's spec: its own `parallel_spec()` method (a user's module, or a
pipeline stage passing on the spec of the model it was cut from), else a spec registered for its
class or a base class (`register_spec`: plait's GPT registers one in plait/models/gpt_spec.py, so
the model file stays free of plait imports), else the empty `ParallelSpec()`: no built-in plan,
the pipeline cut of an nn.Sequential or of `pipeline_layers()`, no blocks, next-token loss.

This module imports no model and nothing distributed: the generic layers and plait.models both
import it, and it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Plan = tuple[tuple[str, str], ...]  # (module-name pattern, style), see plait.tensor_parallel.plan
Call = Callable[[tuple[nn.Module, ...], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _apply_one(mods, x, shared):
    return mods[0](x)


@dataclass
class Layer:
    """One unit of the pipeline split: modules under their dotted names in the original model, and
    how to call them on one hidden-state tensor.

    `call(modules, x, shared)` gets the stage's `shared` tables plus `shared["seq_len"]`, the model
    input's sequence length (under sequence parallelism x holds only 1/tp of it), and
    `shared["extras"]`, the micro-batch's model inputs after the first, on the device (a batch
    `(x, y, *extras)` is run as `model(x, *extras)`; `()` for plain `(x, y)` batches). Every pp
    rank reads the whole batch, so every stage has them. `shared` is a fresh dict per stage call,
    shared by that call's layers: a layer may cache what the others reuse under a key of its own.
    """

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    call: Call = _apply_one
    block: bool = True  # counts toward "one block per stage" (an embedding or a head does not)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]


@dataclass
class PipelineSpec:
    """A model as the pipeline sees it: ordered layers and what flows between them."""

    layers: list[Layer]
    shared: dict[str, torch.Tensor]  # read-only tables every stage keeps (e.g. RoPE cos / sin)
    hidden: Callable[[torch.Tensor], tuple[tuple[int, ...], torch.dtype]]  # input -> (shape, dtype)
    keys: list[str]  # the model's state-dict keys, in order


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@dataclass(frozen=True)
class ParallelSpec:
    """How a model is parallelized; every field has a model-agnostic default.

    - `tp_plan`: (pattern, style) table for plait.tensor_parallel, or a function of the model
      returning one (a style that depends on its sizes, e.g. `column@K` for K key/value heads);
      None: no built-in plan, so parallel.tp > 1 needs `apply_tensor_parallel(model, mesh, plan)`
      with an explicit one.
    - `check_tp(model, tp)`: raises ConfigError naming the model field tp does not divide (heads,
      hidden sizes); runs before the first layer is split, whatever the plan.
    - `pipeline_cut(model) -> PipelineSpec`: the layers in order, the shared tables and the hidden
      state's (shape, dtype); raises ConfigError naming the field that forbids a cut. None: the
      children of an nn.Sequential, or the model's `pipeline_layers()`.
    - `block_types`: the repeated block classes. Each instance is recomputed whole under full
      activation checkpointing, is one ZeRO-3 `fully_shard` unit and is compiled on its own.
    - `attention_core`: (class, method name) recomputed under selective checkpointing: the part
      whose memory grows with the square of the sequence and that runs no collective.
    - `loss(logits, targets, reduction)`: the loss over the whole (unsplit) head's logits; a
      vocab-parallel head brings its own, equal to next-token cross-entropy.
    - `after_tp(model, tp)`: sets what the model keeps as plain attributes rather than reading
      from its weights' shapes (GPT-2's attention splits its packed q/k/v output at a stored
      width), once every layer is split; None: nothing to set.
    - `no_sequence_parallel`: why the model cannot run under sequence parallelism (a ConfigError
      says so before any layer is split); None: it can.
    """

    tp_plan: Plan | Callable[[nn.Module], Plan] | None = None
    check_tp: Callable[[nn.Module, int], None] | None = None
    pipeline_cut: Callable[[nn.Module], PipelineSpec] | None = None
    block_types: tuple[type[nn.Module], ...] = ()
    attention_core: tuple[type[nn.Module], str] | None = None
    loss: Callable[..., torch.Tensor] = next_token_loss
    after_tp: Callable[[nn.Module, int], None] | None = None
    no_sequence_parallel: str | None = None


_REGISTERED: dict[type, ParallelSpec] = {}
_FINDERS: list[Callable[[nn.Module], ParallelSpec | None]] = []


def register_spec(cls: type[nn.Module], spec: ParallelSpec) -> None:
    """Make `spec` the spec of `cls` and its subclasses (those without a `parallel_spec()`)."""
    _REGISTERED[cls] = spec


def register_finder(find: Callable[[nn.Module], ParallelSpec | None]) -> None:
    """Ask `find(model)` for the spec of a model no registered class covers: for a family of
    models whose spec depends on the instance (a transformers model's config) and whose classes
    live in a package plait does not import until such a model is used."""
    if find not in _FINDERS:
        _FINDERS.append(find)


def spec_of(model: nn.Module) -> ParallelSpec:
    """The model's `parallel_spec()`, else its class's registered spec, else what a registered
    finder makes of it, else `ParallelSpec()`.

    Subclasses count (torch's FSDP2 turns a module's class into a subclass of it).
    """
    own = getattr(model, "parallel_spec", None)
    if callable(own):
        return own()
    for cls in type(model).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    for find in _FINDERS:
        spec = find(model)
        if spec is not None:
            return spec
    return ParallelSpec()


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The instances of the model's block classes inside `model`, in module order."""
    kinds = spec_of(model).block_types
    return [m for m in model.modules() if kinds and isinstance(m, kinds)]
