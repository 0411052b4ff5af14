"""Split a model into pipeline stages: the layer protocol, the balanced split, the stage module.

Protocol. A model takes part in the pipeline when it is an ordered list of layers
(plait.parallel_spec.Layer), each mapping one hidden-state tensor to the next (the first reads the
model input, the last returns what the loss reads). Three kinds fit:
- a model whose ParallelSpec has a `pipeline_cut` (plait's GPT: token embedding, each block with
  the RoPE tables it needs, final norm + head);
- an `nn.Sequential`: its children in order;
- any module with `pipeline_layers()` returning `[(name, module), ...]` in order, where `name`
  is the module's dotted name in the model (so state-dict keys keep their names). Optionally
  `pipeline_hidden(x)` returns the (shape, dtype) of the hidden state between stages for model
  input x; without it the hidden state is assumed to have the input's shape and floating dtype.
Every parameter and persistent buffer must belong to some layer.

Split. The S = p·v stages are contiguous runs of layers minimizing the largest stage cost
(exact, by dynamic programming). The cost of a layer is its parameter count in matrix-multiplying
layers (an embedding table is a lookup: memory, but no FLOPs), or its measured forward+backward
time. Each stage must hold at least one block: p·v may not exceed the number of blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from plait.errors import ConfigError
from plait.parallel_spec import Layer, ParallelSpec, PipelineSpec, spec_of


@dataclass(frozen=True)
class SequenceSharded:
    """The hidden state under sequence parallelism: dim 1 (the sequence) split over tp ranks."""

    hidden: Callable
    tp: int

    def __call__(self, x: torch.Tensor):
        shape, dtype = self.hidden(x)
        return (shape[0], shape[1] // self.tp, *shape[2:]), dtype


@dataclass(frozen=True)
class _SameAsInput:
    def __call__(self, x: torch.Tensor):
        return tuple(x.shape), (x.dtype if x.is_floating_point() else torch.get_default_dtype())


def pipeline_spec(model: nn.Module) -> PipelineSpec:
    """The model as an ordered list of layers; ConfigError if it does not fit the protocol."""
    cut = spec_of(model).pipeline_cut
    if cut is not None:
        return _covering(cut(model), "the model's pipeline cut")
    if hasattr(model, "pipeline_layers"):
        pairs = list(model.pipeline_layers())
        hidden = getattr(model, "pipeline_hidden", None) or _SameAsInput()
    elif isinstance(model, nn.Sequential):
        pairs = list(model.named_children())
        hidden = _SameAsInput()
    else:
        raise ConfigError(f"{type(model).__name__} cannot be split into pipeline stages: give an "
                          "nn.Sequential, or define pipeline_layers() returning [(name, module), "
                          f"...] in order, each module mapping one hidden-state tensor to the next")
    layers = []
    for name, mod in pairs:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if found is not mod:
            raise ConfigError(f"pipeline_layers(): {name!r} is not the dotted name of that module "
                              "in the model")
        layers.append(Layer((name,), (mod,)))
    return _covering(PipelineSpec(layers, {}, hidden, list(model.state_dict().keys())),
                     "pipeline_layers()")


def _covering(spec: PipelineSpec, source: str) -> PipelineSpec:
    """`spec`, once every state-dict key is known to belong to one of its layers."""
    covered = {f"{n}.{k}" for layer in spec.layers for n, m in zip(layer.names, layer.modules)
               for k in m.state_dict()}
    missing = [k for k in spec.keys if k not in covered]
    if missing:
        raise ConfigError(f"{source} leaves {missing[:3]} outside every layer: each parameter and "
                          f"persistent buffer must belong to one pipeline layer")
    return spec


# -- costs and the split ---------------------------------------------------------------------------
def param_costs(spec: PipelineSpec) -> list[float]:
    """Parameters of each layer, embedding tables excluded (a lookup costs no FLOPs)."""
    out = []
    for layer in spec.layers:
        emb = {id(p) for m in layer.modules for e in m.modules() if isinstance(e, nn.Embedding)
               for p in e.parameters()}
        out.append(float(sum(p.numel() for p in {id(p): p for p in layer.parameters()}.values()
                             if id(p) not in emb)))
    return out


def measured_costs(spec: PipelineSpec, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of each layer on `sample` (a model input), layer by layer."""
    sync = ((lambda: torch.cuda.synchronize(sample.device)) if sample.device.type == "cuda"
            else (lambda: None))
    shared = {**spec.shared, "seq_len": sample.shape[1] if sample.dim() > 1 else None,
              "extras": ()}
    x = sample
    out = []
    for layer in spec.layers:
        times = []
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            sync()
            t0 = time.perf_counter()
            y = layer.call(layer.modules, inp, shared)
            y.float().sum().backward()
            sync()
            times.append(time.perf_counter() - t0)
        for p in layer.parameters():
            p.grad = None
        out.append(sorted(times)[len(times) // 2])
        with torch.no_grad():
            x = layer.call(layer.modules, x, shared)
    return out


def balanced_split(costs: list[float], k: int) -> list[int]:
    """Boundaries b_0 = 0 < b_1 < ... < b_k = n of k contiguous non-empty parts minimizing the
    largest sum."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} layers into {k} non-empty parts")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], pre[i] - pre[s])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, s
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return bounds[::-1]


def partition(spec: PipelineSpec, p: int, v: int = 1,
              costs: list[float] | None = None) -> list[list[Layer]]:
    """The layers of each of the p·v global stages
    (stage s runs on pp rank s mod p as chunk s div p)."""
    S = p * v
    blocks = sum(layer.block for layer in spec.layers)
    if S > blocks:
        raise ConfigError(f"parallel.pp × parallel.virtual_stages = {p} × {v} = {S} pipeline "
                          f"stages, but the model has {blocks} blocks: every stage needs at least "
                          "one; lower parallel.pp or parallel.virtual_stages, or use a deeper "
                          "model (model.n_layers)")
    costs = param_costs(spec) if costs is None else costs
    bounds = balanced_split(costs, S)
    return [spec.layers[bounds[s]: bounds[s + 1]] for s in range(S)]


# -- the stage module ------------------------------------------------------------------------------
def _attach(root: nn.Module, name: str, module: nn.Module) -> None:
    *path, leaf = name.split(".")
    parent = root
    for part in path:
        if part not in parent._modules:
            parent.add_module(part, nn.ModuleDict())
        parent = parent._modules[part]
    parent.add_module(leaf, module)


class PipelineStage(nn.Module):
    """The layers one pp rank holds, registered under their original names.

    Chunk c is global stage c·p + rank. `forward(x, chunk)` runs that chunk's layers on one
    hidden-state tensor. `state_dict()` keys are the original model's (e.g. `blocks.3.mlp.up_proj
    .weight`), so per-layer tables such as a tensor-parallel plan keep applying, and
    `parallel_spec()` is the original model's `model_spec`, so the later steps (checkpointing,
    ZeRO-3 units, compile) find its blocks.
    """

    def __init__(self, chunks: list[list[Layer]], shared: dict[str, torch.Tensor], rank: int,
                 p: int, model_spec: ParallelSpec | None = None):
        super().__init__()
        for layers in chunks:
            for layer in layers:
                for name, mod in zip(layer.names, layer.modules):
                    _attach(self, name, mod)
        for k, t in shared.items():
            self.register_buffer(k, t, persistent=False)
        self._chunks = chunks
        self._shared_names = list(shared)
        self.pp_rank, self.pp_size = rank, p
        self._model_spec = model_spec if model_spec is not None else ParallelSpec()

    def parallel_spec(self) -> ParallelSpec:
        return self._model_spec

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    def stage_index(self, chunk: int) -> int:
        return chunk * self.pp_size + self.pp_rank

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        seen = {}
        for layer in self._chunks[chunk]:
            for p in layer.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def layer_names(self, chunk: int) -> list[str]:
        return [n for layer in self._chunks[chunk] for n in layer.names]

    def forward(self, x: torch.Tensor, chunk: int = 0, seq_len: int | None = None,
                extras: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """`seq_len`: the model input's sequence length (default x.shape[1]), for layers that need
        it; `extras`: the micro-batch's model inputs after the first (plait.parallel_spec.Layer)."""
        shared = {k: getattr(self, k) for k in self._shared_names}
        shared["seq_len"] = x.shape[1] if seq_len is None else seq_len
        shared["extras"] = tuple(extras)
        for layer in self._chunks[chunk]:
            x = layer.call(layer.modules, x, shared)
        return x


def stage_keys(spec: PipelineSpec, stages: list[list[Layer]],
               p: int) -> list[list[tuple[str, int, torch.dtype]]]:
    """For each pp rank, its state-dict entries (key, ndim, dtype) in the model's key order."""
    owner: dict[str, int] = {}
    for s, layers in enumerate(stages):
        for layer in layers:
            for n in layer.names:
                owner[n] = s % p
    entries = {}
    for layer in spec.layers:
        for n, m in zip(layer.names, layer.modules):
            for k, t in m.state_dict().items():
                entries[f"{n}.{k}"] = (owner[n], t.dim(), t.dtype)
    out: list[list] = [[] for _ in range(p)]
    for key in spec.keys:
        r, ndim, dtype = entries[key]
        out[r].append((key, ndim, dtype))
    return out
