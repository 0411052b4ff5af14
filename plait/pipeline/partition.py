"""Split a model into pipeline stages: the layer protocol, the balanced split, the stage module.

Protocol. A model takes part in the pipeline when it is an ordered list of layers, each mapping
one hidden-state tensor to the next (the first reads the model input, the last returns what the
loss reads). Three kinds fit:
- plait's `GPT`: token embedding, each block (with the RoPE tables it needs), final norm + head;
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
from plait.models.gpt import GPT

Call = Callable[[tuple[nn.Module, ...], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _apply_one(mods, x, shared):
    return mods[0](x)


def _rope_block(mods, x, shared):
    T = shared["seq_len"]  # the model input's length: under sequence parallelism x holds only 1/tp of it
    return mods[0](x, shared["rope_cos"][:T], shared["rope_sin"][:T])


def _norm_head(mods, x, shared):
    return mods[1](mods[0](x))


@dataclass
class Layer:
    """One unit of the split: modules under their dotted names in the original model, and how to call them."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    call: Call = _apply_one
    block: bool = True  # counts toward "one block per stage" (a GPT's embedding and head do not)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]


@dataclass
class PipelineSpec:
    layers: list[Layer]
    shared: dict[str, torch.Tensor]  # read-only tables every stage keeps (a GPT's RoPE cos/sin)
    hidden: Callable[[torch.Tensor], tuple[tuple[int, ...], torch.dtype]]  # model input -> hidden (shape, dtype)
    keys: list[str]  # the model's state-dict keys, in order


@dataclass(frozen=True)
class _GPTHidden:
    d_model: int
    dtype: torch.dtype

    def __call__(self, idx: torch.Tensor):
        return (*idx.shape, self.d_model), self.dtype  # (B, T) token ids -> (B, T, D)


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
    keys = list(model.state_dict().keys())
    if isinstance(model, GPT):
        if model.cfg.tie_embeddings:
            raise ConfigError("model.tie_embeddings = true with parallel.pp > 1: the embedding (first stage) and the "
                              "output head (last stage) cannot share one weight; set model.tie_embeddings=false")
        layers = [Layer(("tok_emb",), (model.tok_emb,), block=False)]
        layers += [Layer((f"blocks.{i}",), (b,), _rope_block) for i, b in enumerate(model.blocks)]
        layers.append(Layer(("norm", "lm_head"), (model.norm, model.lm_head), _norm_head, block=False))
        return PipelineSpec(layers, {"rope_cos": model.rope_cos, "rope_sin": model.rope_sin},
                            _GPTHidden(model.cfg.d_model, model.tok_emb.weight.dtype), keys)
    if hasattr(model, "pipeline_layers"):
        pairs = list(model.pipeline_layers())
        hidden = getattr(model, "pipeline_hidden", None) or _SameAsInput()
    elif isinstance(model, nn.Sequential):
        pairs = list(model.named_children())
        hidden = _SameAsInput()
    else:
        raise ConfigError(f"{type(model).__name__} cannot be split into pipeline stages: give an nn.Sequential, or "
                          f"define pipeline_layers() returning [(name, module), ...] in order, each module mapping "
                          f"one hidden-state tensor to the next")
    layers = []
    for name, mod in pairs:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if found is not mod:
            raise ConfigError(f"pipeline_layers(): {name!r} is not the dotted name of that module in the model")
        layers.append(Layer((name,), (mod,)))
    spec = PipelineSpec(layers, {}, hidden, keys)
    covered = {f"{n}.{k}" for layer in layers for n, m in zip(layer.names, layer.modules) for k in m.state_dict()}
    missing = [k for k in keys if k not in covered]
    if missing:
        raise ConfigError(f"pipeline_layers() leaves {missing[:3]} outside every layer: each parameter and "
                          f"persistent buffer must belong to one pipeline layer")
    return spec


# -- costs and the split ---------------------------------------------------------------------------
def param_costs(spec: PipelineSpec) -> list[float]:
    """Parameters of each layer, embedding tables excluded (a lookup costs no FLOPs)."""
    out = []
    for layer in spec.layers:
        emb = {id(p) for m in layer.modules for e in m.modules() if isinstance(e, nn.Embedding) for p in e.parameters()}
        out.append(float(sum(p.numel() for p in {id(p): p for p in layer.parameters()}.values() if id(p) not in emb)))
    return out


def measured_costs(spec: PipelineSpec, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of each layer on `sample` (a model input), layer by layer."""
    sync = (lambda: torch.cuda.synchronize(sample.device)) if sample.device.type == "cuda" else (lambda: None)
    shared = {**spec.shared, "seq_len": sample.shape[1] if sample.dim() > 1 else None}
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
    """Boundaries b_0 = 0 < b_1 < ... < b_k = n of k contiguous non-empty parts minimizing the largest sum."""
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


def partition(spec: PipelineSpec, p: int, v: int = 1, costs: list[float] | None = None) -> list[list[Layer]]:
    """The layers of each of the p·v global stages (stage s runs on pp rank s mod p as chunk s div p)."""
    S = p * v
    blocks = sum(layer.block for layer in spec.layers)
    if S > blocks:
        raise ConfigError(f"parallel.pp × parallel.virtual_stages = {p} × {v} = {S} pipeline stages, but the model "
                          f"has {blocks} blocks: every stage needs at least one; lower parallel.pp or "
                          f"parallel.virtual_stages, or use a deeper model (model.n_layers)")
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
    .weight`), so per-layer tables such as a tensor-parallel plan keep applying.
    """

    def __init__(self, chunks: list[list[Layer]], shared: dict[str, torch.Tensor], rank: int, p: int):
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

    def forward(self, x: torch.Tensor, chunk: int = 0, seq_len: int | None = None) -> torch.Tensor:
        """`seq_len`: the model input's sequence length (default x.shape[1]), for layers that need it."""
        shared = {k: getattr(self, k) for k in self._shared_names}
        shared["seq_len"] = x.shape[1] if seq_len is None else seq_len
        for layer in self._chunks[chunk]:
            x = layer.call(layer.modules, x, shared)
        return x


def stage_keys(spec: PipelineSpec, stages: list[list[Layer]], p: int) -> list[list[tuple[str, int, torch.dtype]]]:
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
