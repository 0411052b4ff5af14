"""Weights tied across the pipeline: an input embedding shared with the output head (Megatron's
way).

The first stage runs the embedding and the last stage the head, so with pp > 1 the one tied
matrix lives on two ranks: each process built the whole model from the same seed (or the same
file), so the last stage's copy starts equal to the first stage's, with no communication. In
backward each copy gets the gradient of its own use; `plait.shared_grads` sums the two over
`mesh.emb` (the first and the last stage of each (dp, tp) position) once per step, after the dp
exchange and before the gradient norm, so both copies take the same update and stay equal to the
single weight of one process. Under tensor parallelism both are the same vocab-parallel shard,
summed shard by shard; with interleaved stages the ends are chunk 0 of pp rank 0 and the last
chunk of the last pp rank.

Marks, on this rank's parameters (no communication): `plait_tied` = the weight's name in the first
stage (also the name a checkpoint saves it under, once for both copies), and `plait_tied_copy` =
True on the last stage's copy (the gradient norm counts the weight once, on the first stage).
"""

from __future__ import annotations

import torch.nn as nn

from plait.errors import ConfigError
from plait.parallel_spec import Layer


def _named(layers: list[Layer]):
    for layer in layers:
        for name, mod in zip(layer.names, layer.modules):
            for pname, p in mod.named_parameters():
                yield f"{name}.{pname}", p


def tie_ends(stages: list[list[Layer]], p: int, rank: int) -> list[nn.Parameter]:
    """Mark the weights the first and the last of `stages` (p·v global stages, stage s on pp rank
    s mod p) share, where this pp rank holds them; returns this rank's marked parameters.

    ConfigError for a weight shared by any other pair of stages (only the ends are summed)."""
    first: dict[int, tuple[str, nn.Parameter]] = {}  # id -> (name, parameter): its first stage
    where: dict[int, set[int]] = {}
    for s, layers in enumerate(stages):
        for name, prm in _named(layers):
            first.setdefault(id(prm), (name, prm))
            where.setdefault(id(prm), set()).add(s)
    last = len(stages) - 1
    mine = []
    for key, held in where.items():
        if len(held) == 1:
            continue
        name, prm = first[key]
        if held != {0, last}:
            raise ConfigError(f"parameter {name} is shared by pipeline stages {sorted(held)}: only "
                              "the first and the last stage may share a weight (an embedding tied "
                              "to the output head); change parallel.pp / parallel.virtual_stages "
                              "or untie the weights")
        ends = [s for s in (0, last) if s % p == rank]
        if ends:
            prm.plait_tied = name
            prm.plait_tied_copy = ends == [last]
            mine.append(prm)
    return mine
