"""The zero-bubble backward split: B (input gradient now) and W (weight gradients later).

B runs autograd from the stage output to the stage input only. The engine then skips every
weight-gradient product (a matmul node computes only the outputs that lead to what was asked
for), but the gradient flowing into each weight branch is needed later: a pre-hook on every
"split node" (a node on the path to the input with a child that leads only to weights) records
the gradient arriving at it. W restarts autograd from exactly those nodes with the recorded
gradients and asks for the parameters, so it computes the weight products and nothing else.
The graph is kept (retain_graph) between B and W; W frees it. W accumulates into `.grad` through
autograd's own accumulation (`backward(..., inputs=weights)`), so post-accumulate-grad hooks (the
data-parallel reducer's) fire as they do in a plain backward.

When the stage input needs no gradient (the first stage reads token ids), B has nothing to do and
W is the whole backward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch.autograd.graph import GradientEdge


def _grad_node(t: torch.Tensor):
    """The autograd node producing t's gradient (a leaf's AccumulateGrad, created on demand)."""
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]


def _split_nodes(root, target) -> tuple[list, dict]:
    """Nodes that reach `target` and have a child that does not (it leads to weights only).

    Returns (split nodes, whether each node reaches target) over the graph below root.
    """
    reaches: dict = {target: True}
    stack = [(root, False)]
    while stack:  # iterative post-order
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reaches)
        else:
            reaches[node] = any(reaches.get(c, False) for c in children)
    split = [n for n, r in reaches.items()
             if r and n is not target
             and any(not reaches.get(c, False) for c, _ in n.next_functions if c is not None)]
    return split, reaches


def _weights_below(node, reaches: dict) -> list[torch.Tensor]:
    """Leaf tensors (parameters) reached through `node`'s children that do not lead to the input."""
    out, seen = [], set()
    stack = [c for c, _ in node.next_functions if c is not None and not reaches.get(c, False)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        var = getattr(n, "variable", None)  # an AccumulateGrad node: its leaf
        if var is not None:
            out.append(var)
        stack.extend(c for c, _ in n.next_functions if c is not None)
    return out


@dataclass
class WeightGrad:
    """What W needs: per split node, the gradient B delivered to it and the weights below it."""

    captured: list = field(default_factory=list)  # [(node, grad_outputs, weights)]
    whole: tuple | None = None  # (output, grad_output, recompute): when B could not split the work


def backward_input(output: torch.Tensor, grad_output: torch.Tensor | None,
                   inp: torch.Tensor) -> WeightGrad:
    """B: set inp.grad to d(output)/d(inp)·grad_output; return the deferred weight-gradient work.

    W restarts from each split node separately, asking only for the weights below it: one call
    for all would also walk each split node's input-side child down to the deeper split nodes'
    weights and count those twice. A weight below two split nodes (shared within the stage) makes
    that split inexact; then W recomputes the weight gradients from the output (exact, slower).
    """
    if not inp.requires_grad:
        return WeightGrad(whole=(output, grad_output, False))
    nodes, reaches = _split_nodes(output.grad_fn, _grad_node(inp))
    below = {n: _weights_below(n, reaches) for n in nodes}
    counts: dict[int, int] = {}
    for ws in below.values():
        for w in ws:
            counts[id(w)] = counts.get(id(w), 0) + 1
    shared = any(c > 1 for c in counts.values())
    got: dict = {}
    hooks = []
    if not shared:
        for node in nodes:
            def hook(grads, node=node):
                got[node] = grads
            hooks.append(node.register_prehook(hook))
    try:
        (g,) = torch.autograd.grad(output, inp, grad_output, retain_graph=True)
    finally:
        for h in hooks:
            h.remove()
    inp.grad = g
    if shared:
        return WeightGrad(whole=(output, grad_output, True))
    return WeightGrad(captured=[(n, got[n], below[n]) for n in nodes if n in got])


def backward_weight(work: WeightGrad, params: list[torch.nn.Parameter]) -> None:
    """W: accumulate the weights' gradients into `.grad` (in place where a .grad exists)."""
    wanted = {id(p) for p in params if p.requires_grad}
    if work.whole is not None:
        out, g, recompute = work.whole
        if not recompute:
            torch.autograd.backward(out, g)
            return
        ps = [p for p in params if p.requires_grad]
        if ps:  # backward refuses an empty `inputs`
            torch.autograd.backward(out, g, inputs=ps)
        return
    # W's calls cover disjoint parts of the graph: under one GraphExecGroup an
    # activation-checkpointed region is recomputed once for all of them, not once per call
    # (torch >= 2.10; older: per call)
    group = getattr(torch.utils.checkpoint, "GraphExecGroup", None)
    with group() if group is not None else nullcontext():
        for node, gouts, weights in work.captured:
            ws = [w for w in weights if id(w) in wanted]
            edges = [(GradientEdge(node, i), g) for i, g in enumerate(gouts) if g is not None]
            if not ws or not edges:
                continue
            torch.autograd.backward([e for e, _ in edges], [g for _, g in edges], inputs=ws)
