"""A userspace delay line between two TUN devices: one-way delay D and rate R per direction.

This kernel has no netem qdisc (tbf limits a rate but adds no delay), so the link between two
emulated nodes is a process that holds both TUN file descriptors: each IP packet read from one
device is written to the other D seconds after it has been serialized at R bits/s, the way a
real link delivers it (serialization, then propagation):

    start    = max(arrival, end of the previous packet's serialization in this direction)
    end      = start + 8·len / R
    delivery = end + D

A packet that would wait more than `queue_s` before its serialization starts is dropped (the
tail drop of a bounded router queue; TCP backs off on it), so a sender faster than R cannot grow
the queue, and the delay, without limit. Each direction is a FIFO: delivery times only grow.
Without a rate (R = 0) packets only wait D.

Run as `python -m plait.netem.relay FD_A FD_B DELAY_S RATE_BPS QUEUE_S` by plait.netem.nodes,
which opens the devices and passes the descriptors; the relay ends on SIGTERM / SIGINT, or when
its parent dies, and the devices vanish with their last descriptor.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1


def open_tun(name: str) -> int:
    """A non-persistent TUN device `name` (IP packets, no packet-info header); its descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class Direction:
    """Packets read from `src`, waiting to be written to `dst`: (delivery time, packet)."""

    def __init__(self, src: int, dst: int, delay_s: float, rate_bps: float, queue_s: float):
        self.src, self.dst = src, dst
        self.delay_s, self.rate_bps, self.queue_s = delay_s, rate_bps, queue_s
        self.busy_until = 0.0  # end of the last accepted packet's serialization
        self.pending: deque[tuple[float, bytes]] = deque()
        self.dropped = 0

    def arrive(self, packet: bytes, now: float) -> None:
        if self.rate_bps <= 0:
            self.pending.append((now + self.delay_s, packet))
            return
        start = max(now, self.busy_until)
        if start - now > self.queue_s:
            self.dropped += 1
            return
        self.busy_until = start + 8 * len(packet) / self.rate_bps
        self.pending.append((self.busy_until + self.delay_s, packet))

    def deliver(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            _, packet = self.pending.popleft()
            try:
                os.write(self.dst, packet)
            except OSError:  # the other side is down or its queue is full: the link loses it
                self.dropped += 1

    def read_all(self, now: float) -> None:
        while True:
            try:
                packet = os.read(self.src, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    return
                raise
            if not packet:
                return
            self.arrive(packet, now)


def run(fd_a: int, fd_b: int, delay_s: float, rate_bps: float, queue_s: float) -> None:
    """Forward packets both ways until SIGTERM / SIGINT."""
    ways = [Direction(fd_a, fd_b, delay_s, rate_bps, queue_s),
            Direction(fd_b, fd_a, delay_s, rate_bps, queue_s)]
    by_fd = {w.src: w for w in ways}
    while True:
        now = time.monotonic()
        for w in ways:
            w.deliver(now)
        due = [w.pending[0][0] for w in ways if w.pending]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        readable, _, _ = select.select(list(by_fd), [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            by_fd[fd].read_all(now)


def _die_with_parent() -> None:
    # a relay outliving its namespaces would hold the devices forever: SIGTERM when the parent dies
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    fd_a, fd_b = int(argv[0]), int(argv[1])
    delay_s, rate_bps, queue_s = float(argv[2]), float(argv[3]), float(argv[4])
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for fd in (fd_a, fd_b):
        os.set_blocking(fd, False)
    try:
        run(fd_a, fd_b, delay_s, rate_bps, queue_s)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
