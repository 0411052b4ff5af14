"""Every collective and point-to-point call plait makes goes through `Comm`.

Each call records (op, group, bytes on the wire as the group's backend sends them, bytes by the
algorithm's formula, wall time) in `Comm.stats` (plait.comm.accounting says where they differ).
Asynchronous calls return a `Handle`; the time spent in `Handle.wait()` is added to the record.
A collective that fails (a timeout, a peer that died) is re-raised as `CommError` naming the rank,
the operation, the group and the step, with this rank's last collectives, instead of a bare
backend error or a silent hang.

Groups of size 1 make every collective the identity: nothing is sent, nothing is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from plait.comm.accounting import CommStats, Record, wire_bytes
from plait.comm.group import Group

# torch 2.13 renames the single-tensor collectives (the old names warn); 2.11 has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class CommError(RuntimeError):
    pass


class Handle:
    """An in-flight asynchronous operation. `wait()` blocks, then applies any post-processing."""

    def __init__(self, comm: Comm, works: list, rec: Record | None, after=None):
        self._comm = comm
        self._works = works
        self._rec = rec
        self._after = after
        self.done = False

    def is_completed(self) -> bool:
        """True when every request of this operation has finished (does not block, records
        nothing)."""
        return self.done or all(w.is_completed() for w in self._works)

    def wait(self) -> None:
        if self.done:
            return
        t0 = time.perf_counter()
        try:
            for w in self._works:
                w.wait()
        except RuntimeError as e:
            op, group = (self._rec.op, self._rec.group) if self._rec else ("?", "?")
            raise self._comm._error(op, group, e) from e
        if self._rec is not None:
            self._comm.stats.add_wait(self._rec, time.perf_counter() - t0)
        if self._after is not None:
            self._after()
        self.done = True


class _Done(Handle):
    def __init__(self, comm: Comm):
        super().__init__(comm, [], None)
        self.done = True


class Comm:
    """The communication layer of one rank. Owned by the Mesh; never global."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.stats = CommStats()
        self._backends: dict[int, str] = {}  # id(process group) -> backend name

    def backend(self, group: Group) -> str | None:
        """The backend of `group`'s process group (None for a group of one)."""
        if group.pg is None:
            return None
        key = id(group.pg)
        if key not in self._backends:
            self._backends[key] = str(dist.get_backend(group.pg))
        return self._backends[key]

    def account(self, op: str, group: Group, nbytes: int, seconds: float = 0.0,
                count: int | None = None) -> Record:
        """Record one collective with both byte counts (plait.comm.accounting.wire_bytes: `count`).

        Also for collectives issued outside this Comm on `group`'s process group (FSDP2's own).
        """
        wire = wire_bytes(op, nbytes, group.size, self.backend(group), count)  # carries .formula
        return self.stats.record(op, group.name, nbytes, wire, seconds)

    # -- helpers ---------------------------------------------------------------------------
    def _error(self, op: str, group: str, e: Exception) -> CommError:
        return CommError(
            f"rank {self.rank}: {op} on group {group} failed at step {self.stats.step}: {e}\n"
            f"last collectives of rank {self.rank}:\n{self.stats.describe_recent()}"
        )

    def _run(self, op: str, group: Group, nbytes: int, fn, async_op: bool, after=None,
             count: int | None = None) -> Handle:
        t0 = time.perf_counter()
        try:
            work = fn()
        except RuntimeError as e:
            raise self._error(op, group.name, e) from e
        rec = self.account(op, group, nbytes, time.perf_counter() - t0, count)
        h = Handle(self, [work] if work is not None else [], rec, after)
        if not async_op:
            h.wait()
        return h

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, group: Group, op: str = "sum",
                   async_op: bool = False) -> Handle:
        """In-place all-reduce of `t` over `group`. op: sum | avg | max | min.

        avg is a sum followed by a division (gloo has no AVG).
        """
        if group.size == 1:
            return _Done(self)
        rop = _REDUCE_OPS["sum" if op == "avg" else op]
        after = (lambda: t.div_(group.size)) if op == "avg" else None
        return self._run("all_reduce", group, t.numel() * t.element_size(),
                         lambda: dist.all_reduce(t, op=rop, group=group.pg, async_op=True),
                         async_op, after, count=t.numel())

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, group: Group,
                   async_op: bool = False) -> Handle:
        """Concatenate every member's `inp` along dim 0 into `out` (size = group.size * inp)."""
        if group.size == 1:
            if out.data_ptr() != inp.data_ptr():
                out.copy_(inp.view_as(out))
            return _Done(self)
        return self._run("all_gather", group, out.numel() * out.element_size(),
                         lambda: _all_gather_single(out, inp, group=group.pg, async_op=True),
                         async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, group: Group, op: str = "sum",
                       async_op: bool = False) -> Handle:
        """Reduce `inp` over the group and leave member i the i-th 1/n chunk (dim 0) in `out`."""
        if group.size == 1:
            if out.data_ptr() != inp.data_ptr():
                out.copy_(inp.view_as(out))
            return _Done(self)
        rop = _REDUCE_OPS["sum" if op == "avg" else op]
        after = (lambda: out.div_(group.size)) if op == "avg" else None
        return self._run("reduce_scatter", group, inp.numel() * inp.element_size(),
                         lambda: _reduce_scatter_single(out, inp, op=rop, group=group.pg,
                                                        async_op=True),
                         async_op, after, count=inp.numel())

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, group: Group,
                   async_op: bool = False) -> Handle:
        if group.size == 1:
            out.copy_(inp)
            return _Done(self)
        return self._run("all_to_all", group, inp.numel() * inp.element_size(),
                         lambda: dist.all_to_all_single(out, inp, group=group.pg, async_op=True),
                         async_op)

    def broadcast(self, t: torch.Tensor, src: int, group: Group, async_op: bool = False) -> Handle:
        """Broadcast from group member `src` (a group rank, not a global rank).

        Every other member receives one copy: the source records the group's (n−1)·size."""
        if group.size == 1:
            return _Done(self)
        mine = group.rank == src
        return self._run("broadcast", group, t.numel() * t.element_size() if mine else 0,
                         lambda: dist.broadcast(t, src=group.global_rank(src), group=group.pg,
                                                async_op=True),
                         async_op, count=None if mine else 0)

    def p2p(self, sends: Sequence[tuple[torch.Tensor, int]],
            recvs: Sequence[tuple[torch.Tensor, int]], group: Group,
            async_op: bool = True) -> Handle:
        """Batched point-to-point: `sends`/`recvs` are (tensor, peer group rank) pairs.

        All operations are posted together (batch_isend_irecv), so a pair of ranks that both send
        and receive cannot deadlock on ordering. Bytes recorded: the sum of sent sizes.

        gloo's send and receive read and write the tensor's memory as host memory (a CUDA tensor
        fails with "writev: Bad address"), so over a gloo group CUDA tensors travel through host
        copies: sends are copied to the host first, receives land in host buffers that `wait()`
        copies to the device. This is the one-GPU test mode (several gloo ranks sharing one GPU);
        with NCCL, tensors are sent from device memory as they are.
        """
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device tensor, host buffer) each
        staging = self._host_staged(group, [t for t, _ in (*sends, *recvs)])
        if staging:
            sends = [(t.cpu(), p) for t, p in sends]
            staged = [(t, torch.empty(t.shape, dtype=t.dtype, device="cpu")) for t, _ in recvs]
            recvs = [(host, p) for (_, host), (_, p) in zip(staged, recvs)]
        ops = [dist.P2POp(dist.isend, t, group.global_rank(p), group=group.pg) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, group.global_rank(p), group=group.pg) for t, p in recvs]
        if not ops:
            return _Done(self)
        nbytes = sum(t.numel() * t.element_size() for t, _ in sends)
        t0 = time.perf_counter()
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise self._error("p2p", group.name, e) from e
        rec = self.account("send" if sends else "recv", group, nbytes, time.perf_counter() - t0,
                           count=len(sends))
        held = [t for t, _ in sends] if staging else []  # host copies live as long as the closure

        def unstage():
            for dev, host in staged:
                dev.copy_(host)
            held.clear()

        h = Handle(self, list(works), rec, unstage if staging else None)
        if not async_op:
            h.wait()
        return h

    @staticmethod
    def _host_staged(group: Group, tensors: list[torch.Tensor]) -> bool:
        """True when point-to-point over `group` must go through host memory (gloo with CUDA
        tensors)."""
        return any(t.is_cuda for t in tensors) and dist.get_backend(group.pg) == "gloo"

    def barrier(self, group: Group) -> None:
        if group.size == 1:
            return
        self._run("barrier", group, 0, lambda: dist.barrier(group=group.pg, async_op=True), False)
