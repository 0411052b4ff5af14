"""Models built on the meta device: shapes only, no storage, until `materialize` gives this rank's
part of the model storage of its own.

    with torch.device("meta"):
        model = build(...)                 # nothing allocated, nothing initialized
    ... split the model (tensor / pipeline parallelism: shapes only) ...
    materialize(model, device)             # this rank's part: zeros on `device`
    ... fill it (weights read from a file, buffers recomputed) ...

`materialize` keeps every Parameter object (torch.utils.swap_tensors): layers that share a weight
still share it, and what was attached to a parameter while it was on the meta device stays (its
attributes, e.g. `plait_tp_shard`, and its gradient hooks, e.g. the sequence-parallel all-reduce
of a replicated norm weight), so the split may run before the storage exists. `nn.Module.to_empty`
makes new Parameter objects instead: tied weights come apart and attributes and hooks are lost.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def on_meta(module: nn.Module) -> bool:
    """True when any parameter or buffer of `module` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter and buffer of `module` zero-filled storage on `device`, in place.

    Parameters keep their identity, attributes and gradient hooks; buffers are replaced in their
    modules (a buffer shared by several modules stays shared). Non-persistent buffers that a model
    computes in its constructor (rotary frequencies) are zeros afterwards: the model's owner
    recomputes them.
    """
    device = torch.device(device)
    done: set[int] = set()
    for p in module.parameters():
        if not p.is_meta or id(p) in done:
            continue
        done.add(id(p))
        attrs, hooks = dict(p.__dict__), p._backward_hooks
        if getattr(p, "_post_accumulate_grad_hooks", None):
            raise RuntimeError("materialize: a parameter with post-accumulate-grad hooks (a "
                               "gradient reducer) cannot move off the meta device; materialize "
                               "before the data-parallel step")
        fresh = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                             requires_grad=p.requires_grad)
        torch.utils.swap_tensors(p, fresh)
        p.__dict__.update(attrs)
        if hooks:
            # the hooks dict stays on the Python object, the autograd hook went with the old
            # storage: setting it again registers it on the new one
            p._backward_hooks = hooks
    buffers: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                if id(b) not in buffers:
                    buffers[id(b)] = torch.zeros(b.shape, dtype=b.dtype, device=device)
                m._buffers[name] = buffers[id(b)]
