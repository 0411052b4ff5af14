"""Plan-driven tensor parallelism: a small table of module-name patterns -> style.

    model, loss_fn, gather = apply_tensor_parallel(model, mesh, plan, sequence_parallel=True)

Patterns are dotted module names in which `*` matches one path component ("blocks.*.attn").
Styles:

- `column`: nn.Linear -> ColumnParallelLinear (output features split). Inside a `region` module
  it relies on the region's entry collective; elsewhere it applies f (or the SP all-gather) itself.
  `column/N`: the output is N equal packed blocks (a fused q | k | v), each split over tp;
  `column/A+B+C`: packed blocks of those sizes (q | k | v with fewer key/value heads).
  `column@G` (or a block `A@G`): the output (the block) is G whole units, key/value heads: tp
  must divide G or be a multiple of it; with tp > G each unit is held by tp/G consecutive ranks
  (rank r: unit r // (tp/G)), whose gradients plait.shared_grads sums before the step.
- `row`: nn.Linear -> RowParallelLinear (input features split; all-reduce, or SP reduce-scatter).
- column and row also take a transposed linear: a module with `nf` and a weight of shape
  (in, nf), y = x·W + b (transformers' Conv1D); the split layer keeps that weight layout.
- `vocab`: nn.Embedding -> VocabParallelEmbedding; nn.Linear (the head) -> ColumnParallelLinear
  over the (padded) vocabulary, whose sharded logits go to the vocab-parallel cross-entropy.
- `region`: the module's first input enters the tp region once for all the column layers inside
  (a forward pre-hook: f, or under SP the all-gather of the sequence), so q/k/v (gate/up) share
  one all-reduce in backward, as Megatron's fused QKV does. The first input is the first
  positional argument or, for a module called by keyword only, the first floating-point tensor
  keyword argument. The module must read the sequence length from that input (not from a
  length passed beside it): under SP only that input is whole.
- `replicate`: parameters kept whole on every tp rank (norms). Under SP they act on 1/t of the
  sequence and get a hook that all-reduces their gradient on tp in backward
  (tp_comm.all_reduce_grad_hook). Parameters no pattern names are treated the same way.

Every parameter not split is marked `plait_tp_replicated = True` (the global gradient norm counts
it on tp rank 0 only). The attention's head count per rank follows from the sharded projection
shapes: the model reads heads from q_proj / k_proj outputs, so nothing in it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch
import torch.nn as nn

from plait.errors import ConfigError
from plait.mesh import Mesh
from plait.parallel_spec import Plan, spec_of
from plait.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLoss,
    holders,
    mark_replicated,
    padded_vocab,
)
from plait.tensor_parallel.tp_comm import copy_to_tp, gather_seq

STYLES = ("column", "row", "vocab", "region", "replicate")


Parsed = tuple[str, int | tuple[int, ...], tuple[int | None, ...] | None]


def _units(term: str) -> tuple[str, int | None]:
    """`64@2` -> ("64", 2); `64` -> ("64", None); a malformed count -> ("", None)."""
    size, at, units = term.partition("@")
    if not at:
        return size, None
    return (size, int(units)) if units.isdigit() and int(units) > 0 else ("", None)


def _parse(style: str) -> Parsed:
    """`column/3` -> ("column", 3, None); `column/64+16@2+16@2` -> ("column", (64, 16, 16),
    (None, 2, 2)); `column@2` -> ("column", 1, (2,)); any other style -> (style, 1, None)."""
    base, _, parts = style.partition("/")
    base, at, units = base.partition("@")
    if base == "column" and at and not parts and units.isdigit() and int(units) > 0:
        return base, 1, (int(units),)
    if base == "column" and not at and parts.isdigit() and int(parts) >= 1:
        return base, int(parts), None
    terms = [_units(x) for x in parts.split("+")]
    if (base == "column" and not at and len(terms) > 1
            and all(x.isdigit() and int(x) > 0 for x, _ in terms)):
        groups = tuple(g for _, g in terms)
        return base, tuple(int(x) for x, _ in terms), (groups if any(groups) else None)
    if parts or at or base not in STYLES:
        raise ConfigError(f"tensor-parallel plan: style {style!r}; choose one of {STYLES} (or "
                          "column/N for N equal packed output blocks, column/A+B+C for packed "
                          "blocks of those sizes, column@G or a block A@G for G whole key/value "
                          "heads)")
    return base, 1, None


def _transposed_linear(mod: nn.Module) -> bool:
    """A linear layer keeping its weight as (in, out) (transformers' Conv1D: y = x·W + b)."""
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and isinstance(getattr(mod, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == mod.nf)


class TensorParallel(NamedTuple):
    model: nn.Module
    loss_fn: Callable  # (logits, targets, reduction) -> loss, matching the head's output layout
    # local state dict -> full shapes
    gather: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatchcase(a, b) for a, b in zip(n, p))


def plan_for(model: nn.Module) -> Plan:
    """The plan table of the model's ParallelSpec (plait.parallel_spec); ConfigError without one."""
    plan = spec_of(model).tp_plan
    if callable(plan):  # sizes read from the model (e.g. its key/value heads)
        plan = plan(model)
    if plan is None:
        raise ConfigError(f"parallel.tp > 1: {type(model).__name__} has no tensor-parallel plan "
                          "(its ParallelSpec.tp_plan); call "
                          "plait.tensor_parallel.apply_tensor_parallel(model, mesh, plan) with a "
                          "plan table")
    return plan


def _region_hook(mesh: Mesh, sequence_parallel: bool, name: str):
    def enter(x):
        return (gather_seq(x, mesh.comm, mesh.tp) if sequence_parallel
                else copy_to_tp(x, mesh.comm, mesh.tp))

    # with kwargs: transformers' decoder layers call their attention by keyword only
    def hook(module, args, kwargs):
        if args:
            return (enter(args[0]), *args[1:]), kwargs
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return args, {**kwargs, k: enter(v)}
        raise RuntimeError(f"tensor-parallel region {name}: called without a tensor input")

    return hook


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_tensor_parallel(model: nn.Module, mesh: Mesh, plan: Plan | None = None,
                          sequence_parallel: bool = False) -> TensorParallel:
    """Split `model`'s layers over mesh.tp in place, as `plan` says;
    returns (model, loss_fn, gather).

    `plan` None: the model's own (`plan_for`). The model's ParallelSpec checks its sizes against
    tp first (`check_tp`), whatever the plan; its `loss` is returned unless the head is split.

    Every tp rank must hold the same full model (same seed) before the call; each keeps 1/t of
    each split weight. Weights shared between layers (tied embedding and head) stay shared: both
    layers split the same matrix the same way (rows = vocabulary), so they get one Parameter.
    The vocabulary is padded to a multiple of tp where needed; the loss masks the padding.
    """
    plan = plan_for(model) if plan is None else plan
    for _pattern, style in plan:
        _parse(style)
    tp = mesh.tp_size
    spec = spec_of(model)
    if sequence_parallel and spec.no_sequence_parallel:
        raise ConfigError(f"parallel.sequence_parallel = true: {spec.no_sequence_parallel}; set "
                          "parallel.sequence_parallel=false")
    if spec.check_tp is not None:
        spec.check_tp(model, tp)
    modules = dict(model.named_modules())
    styled: dict[str, str] = {}
    for pattern, style in plan:
        hits = [n for n in modules if n and matches(pattern, n)]
        if not hits:
            raise ConfigError(f"tensor-parallel plan: pattern {pattern!r} matches no module of "
                              f"{type(model).__name__}")
        styled.update({n: style for n in hits})
    regions = [n for n, s in styled.items() if s == "region"]
    for name, style in styled.items():  # every check before the first change to the model
        _check_entry(name, style, modules[name], tp)
    sp = sequence_parallel
    shared: dict[int, nn.Parameter] = {}  # id(original weight) -> its shard, for tied weights
    # parameter name -> (dim, full size, local size, packed block sizes or None)
    specs: dict[str, tuple] = {}
    loss_fn: Callable = spec.loss
    for name, full_style in styled.items():
        mod = modules[name]
        style, parts, groups = _parse(full_style)
        if style == "region":
            mod.register_forward_pre_hook(_region_hook(mesh, sp, name), with_kwargs=True)
            continue
        if style == "replicate":
            continue
        if style == "column":
            enter = not any(name.startswith(r + ".") for r in regions)
            kw = dict(enter_region=enter, sequence_parallel=sp, parts=parts, groups=groups)
            new = (ColumnParallelLinear.from_conv1d(mod, mesh, **kw) if _transposed_linear(mod)
                   else ColumnParallelLinear.from_linear(mod, mesh, **kw))
        elif style == "row":
            new = (RowParallelLinear.from_conv1d(mod, mesh, sequence_parallel=sp)
                   if _transposed_linear(mod)
                   else RowParallelLinear.from_linear(mod, mesh, sequence_parallel=sp))
        elif isinstance(mod, nn.Embedding):
            new = VocabParallelEmbedding.from_embedding(mod, mesh, sequence_parallel=sp,
                                                        padded=padded_vocab(mod.num_embeddings, tp))
        else:
            new = ColumnParallelLinear.from_linear(mod, mesh, enter_region=True,
                                                   sequence_parallel=sp,
                                                   padded_out=padded_vocab(mod.out_features, tp))
            loss_fn = VocabParallelLoss(mesh, new)
        orig = mod.weight
        if id(orig) in shared:  # tied: reuse the shard the other layer made
            twin = shared[id(orig)]
            if twin.shape != new.weight.shape or twin.plait_tp_shard != new.weight.plait_tp_shard:
                raise ConfigError(f"tensor-parallel plan: {name}.weight is tied to another layer "
                                  "split another way; give both the same style (vocab for a tied "
                                  "embedding and head)")
            new.weight = twin
        shared[id(orig)] = new.weight
        _set(model, name, new)
        for leaf in ("weight", "bias"):
            p = getattr(new, leaf, None)
            if p is not None and hasattr(p, "plait_tp_shard"):
                dim, full = p.plait_tp_shard
                specs[f"{name}.{leaf}"] = (dim, full, p.shape[dim],
                                           getattr(p, "plait_tp_parts", None),
                                           getattr(p, "plait_tp_groups", None))
    sharded = {id(p) for p in model.parameters() if hasattr(p, "plait_tp_shard")}
    for p in model.parameters():
        if id(p) not in sharded:
            mark_replicated(p, mesh, partial_grad=sp)
    if spec.after_tp is not None:
        spec.after_tp(model, tp)
    return TensorParallel(model, loss_fn, _make_gatherer(specs, mesh))


def _check_entry(name: str, full_style: str, mod: nn.Module, tp: int) -> None:
    style, parts, groups = _parse(full_style)
    if style in ("region", "replicate"):
        return
    if style in ("column", "row") and (isinstance(mod, nn.Linear) or _transposed_linear(mod)):
        n_in, n_out = ((mod.in_features, mod.out_features) if isinstance(mod, nn.Linear)
                       else tuple(mod.weight.shape))
        what, v = (("out_features", n_out) if style == "column" else ("in_features", n_in))
        for g in groups or ():
            if g is not None and (g % tp if tp <= g else tp % g):
                raise ConfigError(f"tensor-parallel plan: {name} holds {g} whole key/value heads "
                                  f"(@{g}): parallel.tp = {tp} must divide {g} or be a multiple "
                                  f"of it")
        if groups is not None and _transposed_linear(mod) and any(
                holders(g, tp) > 1 for g in groups):
            raise ConfigError(f"tensor-parallel plan: {name} is a transposed linear (Conv1D), "
                              f"whose key/value heads cannot be replicated over parallel.tp = "
                              f"{tp}: choose a tp that divides its heads")
        if isinstance(parts, tuple):
            if sum(parts) != v or any(b % (tp // holders(g, tp)) for b, g in
                                      zip(parts, groups or (None,) * len(parts))):
                raise ConfigError(f"tensor-parallel plan: {name}.{what} = {v} as packed blocks "
                                  f"{'+'.join(map(str, parts))}: the blocks must add up to {v} "
                                  f"and each be divisible by parallel.tp = {tp}")
        elif v % ((tp // holders(groups[0], tp) if groups else tp) * parts):
            by = (f"{parts} packed blocks × parallel.tp = {tp}" if parts > 1
                  else f"parallel.tp = {tp}")
            raise ConfigError(f"tensor-parallel plan: {name}.{what} = {v} is not divisible by "
                              f"{by}: choose a tp that divides {v // parts}")
        return
    if style == "vocab" and isinstance(mod, (nn.Embedding, nn.Linear)):
        return  # the vocabulary is padded to a multiple of tp
    raise ConfigError(f"tensor-parallel plan: style {full_style!r} does not apply to {name} "
                      f"({type(mod).__name__}); column and row take nn.Linear (or a transposed "
                      "linear such as transformers' Conv1D), vocab nn.Embedding or nn.Linear")


def _make_gatherer(specs: dict[str, tuple], mesh: Mesh):
    """The state gatherer: all-gather each split tensor on mesh.tp along its split dimension,
    put packed blocks back in order and drop vocabulary padding. Collective: every tp rank calls it
    with the same keys in the same order.

    Keys are matched by parameter name; a key under a prefix (a wrapper added by a later step)
    matches by its longest suffix that names a split parameter.
    """

    def spec_of(key: str):
        names = key.split(".")
        for i in range(len(names) - 1):
            s = specs.get(".".join(names[i:]))
            if s is not None:
                return s
        return None

    def gather(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, t in sd.items():
            spec = spec_of(key)
            if spec is None or mesh.tp_size == 1:
                out[key] = t
                continue
            dim, full, local, parts, groups = spec
            if t.shape[dim] != local:
                raise RuntimeError(f"{key}: local shape {tuple(t.shape)} does not match the tp "
                                   f"split ({local} along dim {dim})")
            moved = t.transpose(0, dim).contiguous()
            n = mesh.tp_size
            buf = torch.empty((local * n, *moved.shape[1:]), dtype=t.dtype, device=t.device)
            mesh.comm.all_gather(buf, moved, mesh.tp)
            if parts:  # rank-major (rank, block slices) -> block-major: q | k | v again
                per_rank = buf.unflatten(0, (n, local))
                # a replicated block (fewer kv heads than ranks): one holder of each piece
                k = [holders(g, n) for g in groups or (None,) * len(parts)]
                sizes = [b * kb // n for b, kb in zip(parts, k)]
                offs = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
                buf = torch.cat([per_rank[::kb, a:b].flatten(0, 1)
                                 for a, b, kb in zip(offs, offs[1:], k)])
            out[key] = buf[:full].transpose(0, dim).contiguous()
        return out

    return gather
