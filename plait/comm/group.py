"""A named process group: the unit every collective in plait runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Group:
    """One dimension's process group as seen from this rank.

    `pg` is the torch ProcessGroup, or None when the group has a single member (then every
    collective is the identity and sends nothing). `ranks` are the global ranks of the members in
    group order; `rank` is this process's index in it.
    """

    name: str
    ranks: tuple[int, ...]
    rank: int
    pg: Any = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank]

    def __repr__(self) -> str:
        return f"Group({self.name}, ranks={list(self.ranks)}, rank={self.rank})"


def single(name: str, global_rank: int = 0) -> Group:
    """A group holding only this rank (world size 1, or a dimension of size 1)."""
    return Group(name=name, ranks=(global_rank,), rank=0, pg=None)
