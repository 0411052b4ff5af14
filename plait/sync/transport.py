"""How a sync strategy averages a flat fp32 tensor over the replicas: plain or quantized, inline or
in the background.

Communication contract
- `average(x, group, comm, codec)`: x (L,) fp32 becomes the mean of every member's x, identical on
  every member. Without a codec: one ring all-reduce, 2(n−1)/n · 4L bytes sent per rank. With a
  codec (fp16, int8, fp4), the two-phase exchange of compressed chunks that cannot be summed on
  the wire: x is cut into n chunks, each encoded; an all-to-all gives member j every member's chunk
  j, which it decodes, averages in fp32 and re-encodes; an all-gather returns every averaged chunk.
  Bytes per rank: (n−1)/n · n·C twice = 2(n−1)/n · L·b, the ring all-reduce formula at b bytes per
  element (`Codec.bytes_per_element`, scales included). L must be a multiple of n · codec.block.
- `Background`: one daemon thread ("plait-sync") runs jobs in submission order on its own
  duplicate of the replicas' group (`duplicate_group`: dp, or rep when parallel.replicas > 1),
  so the main thread's collectives on the mesh's groups and the background's never interleave on
  one group and every rank issues the same background collectives in the same order. The thread
  has its own `Comm`: plait's Comm is not thread-safe for its statistics, so each job counts
  into a fresh CommStats, and the main thread merges the job's records into the mesh's Comm when
  it collects the result (`Job.wait`), adding the time it blocked there. Bytes therefore appear
  in the step that applies the exchange.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from plait.comm import Comm, CommStats, Group, single
from plait.mesh import Mesh, group_members


# -- codecs ----------------------------------------------------------------------------------
class Codec:
    """Encode a fp32 vector into bytes for transport; `block` elements share one fp32 scale."""

    name = "none"
    block = 1
    bytes_per_element = 4.0

    def payload_bytes(self, k: int) -> int:
        return int(k * self.bytes_per_element)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (k,) fp32 -> (payload_bytes(k),) uint8
        raise NotImplementedError

    def decode(self, buf: torch.Tensor, k: int) -> torch.Tensor:  # -> (k,) fp32
        raise NotImplementedError


class FP16(Codec):
    name, block, bytes_per_element = "fp16", 1, 2.0

    def encode(self, x):
        return x.to(torch.float16).view(torch.uint8)

    def decode(self, buf, k):
        return buf.view(torch.float16).float()


def _scales(xb: torch.Tensor, top: float) -> torch.Tensor:
    # per-block absmax mapped onto the largest code; an all-zero block gets scale 1 (codes 0)
    s = xb.abs().amax(dim=1) / top
    return torch.where(s > 0, s, torch.ones_like(s))


class Int8(Codec):
    """Symmetric int8 with one fp32 scale per 256 elements: 1 + 4/256 bytes per element."""

    name, block = "int8", 256
    bytes_per_element = 1.0 + 4.0 / 256

    def encode(self, x):
        xb = x.view(-1, self.block)
        s = _scales(xb, 127.0)
        q = torch.round(xb / s[:, None]).clamp_(-127, 127).to(torch.int8)
        return torch.cat([q.view(torch.uint8).reshape(-1), s.view(torch.uint8)])

    def decode(self, buf, k):
        q = buf[:k].view(torch.int8).view(-1, self.block).float()
        s = buf[k:].view(torch.float32)
        return (q * s[:, None]).reshape(-1)


class FP4(Codec):
    """4-bit floats (E2M1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}), two per byte, one fp32 scale per 64
    elements: 0.5 + 4/64 bytes per element. Round to nearest."""

    name, block = "fp4", 64
    bytes_per_element = 0.5 + 4.0 / 64
    GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

    def encode(self, x):
        xb = x.view(-1, self.block)
        s = _scales(xb, 6.0)
        v = xb / s[:, None]
        grid = torch.tensor(self.GRID, device=x.device)
        mid = (grid[1:] + grid[:-1]) / 2
        code = torch.bucketize(v.abs(), mid).to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)
        code = code.reshape(-1)
        packed = (code[0::2] << 4) | code[1::2]
        return torch.cat([packed, s.view(torch.uint8)])

    def decode(self, buf, k):
        packed = buf[: k // 2]
        code = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
        grid = torch.tensor(self.GRID, device=buf.device)
        v = grid[code & 7] * (1.0 - 2.0 * (code >> 3).float())
        s = buf[k // 2:].view(torch.float32)
        return (v.view(-1, self.block) * s[:, None]).reshape(-1)


CODECS: dict[str, type[Codec]] = {"fp16": FP16, "int8": Int8, "fp4": FP4}


def make_codec(name: str) -> Codec | None:
    return None if name == "none" else CODECS[name]()


def exchange_bytes(numel: int, n: int, codec: Codec | None) -> float:
    """Bytes one rank sends to average `numel` elements over n members
    (the formula `average` meets)."""
    if n <= 1:
        return 0.0
    per = 4.0 if codec is None else codec.bytes_per_element
    return 2.0 * (n - 1) / n * numel * per


# -- the exchange ----------------------------------------------------------------------------
def average(x: torch.Tensor, group: Group, comm: Comm, codec: Codec | None = None) -> torch.Tensor:
    """Average x (L,) fp32 over `group` in place (see the module docstring for the bytes)."""
    n = group.size
    if n == 1:
        return x
    if codec is None:
        comm.all_reduce(x, group, op="avg")
        return x
    L = x.numel()
    if L % (n * codec.block):
        raise ValueError(f"average: length {L} is not a multiple of members × block = {n} × "
                         f"{codec.block}")
    k = L // n
    # (n, C) uint8: chunk j goes to member j
    send = torch.stack([codec.encode(c) for c in x.view(n, k)])
    recv = torch.empty_like(send)
    comm.all_to_all(recv.view(-1), send.view(-1), group)
    # (k,) the average of my chunk
    mine = torch.stack([codec.decode(r, k) for r in recv]).mean(dim=0)
    gathered = torch.empty_like(send)
    comm.all_gather(gathered.view(-1), codec.encode(mine), group)
    torch.cat([codec.decode(g, k) for g in gathered], out=x)
    return x


# -- the background thread -------------------------------------------------------------------
def duplicate_group(mesh: Mesh, over: str = "dp") -> Group:
    """A second process group with the members of this rank's `over` group ("dp" or "rep"),
    named "dp_bg" / "rep_bg" (collective: every rank calls it).

    Every rank creates every such group's duplicate, in Mesh.build's order (torch requires every
    rank to take part in each new_group call), and keeps its own.
    """
    name, own = f"{over}_bg", getattr(mesh, over)
    if own.size == 1:
        return single(name, mesh.rank)
    members = group_members(mesh.replicas, mesh.dp_size, mesh.tp_size, mesh.pp_size)[over]
    mine = None
    for ranks in members:
        pg = dist.new_group(ranks)
        if mesh.rank in ranks:
            mine = Group(name, tuple(ranks), ranks.index(mesh.rank), pg)
    assert mine is not None and mine.ranks == own.ranks, (mine, own)
    return mine


class Job:
    """A background exchange: `wait()` (main thread only) returns its result and merges its
    bytes."""

    def __init__(self, fn: Callable[[], torch.Tensor], ready=None):
        self.fn = fn
        # a CUDA event recorded after the payload was produced on the main stream
        self.ready = ready
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.stats: CommStats | None = None
        self.merged = False

    def wait(self, into: Comm) -> tuple[torch.Tensor, float]:
        """Block until done; merge its records into `into` once;
        return (result, seconds blocked)."""
        t0 = time.perf_counter()
        self.done.wait()
        blocked = time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        if not self.merged and self.stats is not None:
            recs = [into.stats.record(r.op, r.group, r.nbytes, r.wire, 0.0)
                    for r in self.stats.recent]
            if recs:
                into.stats.add_wait(recs[0], blocked)
            self.merged = True
        assert self.result is not None
        return self.result, blocked


class Background:
    """The one background thread of a strategy:
    jobs run in FIFO order on `group` with its own Comm."""

    def __init__(self, group: Group, rank: int, device: torch.device):
        self.group = group
        self.comm = Comm(rank)
        self.device = device
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="plait-sync", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], torch.Tensor]) -> Job:
        ready = None
        # the payload is produced on the main thread's stream: mark when
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        job = Job(fn, ready)
        self._q.put(job)
        return job

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            job = self._q.get()
            if job is None:
                return
            self.comm.stats = CommStats(history=1024)  # only this thread touches this Comm
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                job.result = job.fn()
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread by Job.wait
                job.error = e
            job.stats = self.comm.stats
            job.done.set()

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=60)
