"""One private network namespace whose loopback carries every byte its processes exchange.

    with Namespace(mtu=1500) as ns:
        ns.run([sys.executable, "script.py"])       # inside: ranks on 127.0.0.1
    # inside, loopback_counters() are the bytes and packets every process there has sent

Its loopback is a wire that only these processes use, so its transmit counters measure what
they really send. Header model (measured on this kernel, see docs/benchmarks.md): the loopback
counts each packet's IPv4 (20 B) and TCP (20 B + 12 B timestamp option) headers, not an
Ethernet header, and it carries TCP segmentation offload super-packets of up to 64 KiB as one
packet, so the TCP payload is exactly `bytes - HEADER_BYTES · packets` (SYNs carry 8 B more of
options; negligible). On a real Ethernet link at MTU 1500 each 1448-B segment costs 66 B of
headers (+4.6 %), plus acknowledgements.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Sequence

HEADER_BYTES = 52  # IPv4 + TCP + timestamp option, per packet the loopback counts
_seq = itertools.count()


def loopback_counters() -> tuple[int, int]:
    """(bytes, packets) sent on `lo` in this process's network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[8]), int(fields[9])
    return 0, 0


def payload_bytes(nbytes: int, packets: int) -> int:
    """TCP payload in a loopback byte count of `packets` packets (the header model above)."""
    return nbytes - HEADER_BYTES * packets


class Namespace:
    """A network namespace with loopback up at `mtu`, optionally rate-limited by tbf; deleted on
    exit (with any process still inside it, all started from here)."""

    def __init__(self, mtu: int = 1500, rate: str | None = None, tag: str | None = None):
        self.mtu, self.rate = mtu, rate
        self.name = f"plait-ns-{tag or f'{os.getpid()}-{next(_seq)}'}"
        self.made = False

    def __enter__(self) -> Namespace:
        try:
            self._sh("ip", "netns", "add", self.name)
            self.made = True
            self._sh("ip", "-n", self.name, "link", "set", "lo", "up", "mtu", str(self.mtu))
            if self.rate:  # a burst above the MTU, else tbf drops full-size packets
                self._sh("ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo",
                         "root", "tbf", "rate", self.rate, "burst", "256kb", "latency", "50ms")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _sh(*cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kw)

    def close(self) -> None:
        if not self.made:
            return
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in r.stdout.split():  # left behind by a command that was interrupted
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self.made = False
