"""Two emulated nodes on one machine: network namespaces joined by a delayed, rate-limited link.

    with TwoNodes(Link(delay_ms=10, rate="30mbit")) as nodes:
        print(nodes.probe())                              # round trip and TCP throughput
        codes = nodes.run([cmd_for_node0, cmd_for_node1])  # argv lists, run until both exit

Each node is a network namespace with its own loopback (up, default MTU: the ranks of one node
talk over it at memory speed) and one point-to-point device, `link0`: node 0 is 10.77.0.1,
node 1 is 10.77.0.2, MTU 1500. Packets between the nodes cross the relay process
(plait.netem.relay): D ms one way, serialized at R bits/s per direction, queue bounded. A node
that sends to its own link address stays on its loopback, as on a real host.

Each node is also a host of its own name: its commands run in a UTS namespace whose hostname is
`node0` / `node1`, and `ip netns exec` gives them the namespace's own /etc/hosts
(/etc/netns/NS/hosts: node0 -> 10.77.0.1, node1 -> 10.77.0.2). So, as between real hosts, the
hostname resolves to the node's link address on that node and from the other: gloo binds it, the
elastic agent publishes it as the master address, and torch's c10d rendezvous sees that
`node0:PORT` is local on node 0 (its agent hosts the store), which is what lets a restarted node
rejoin a running job. Commands also get GLOO_SOCKET_IFNAME=link0 (what a user sets on real hosts
with several interfaces), TORCH_CPP_LOG_LEVEL=ERROR, PLAIT_NODE=i and PLAIT_NODE0_ADDR=10.77.0.1.

Everything this creates is deleted on every way out, success, failure, exception, Ctrl-C or
SIGTERM: the processes started in the nodes (their process groups, then any process left in the
namespaces), the relay (and with its descriptors the devices), the namespaces. Needs root, `ip`
(iproute2) and /dev/net/tun; only the namespaces it creates and their own addresses are used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from plait.netem import probe as _probe
from plait.netem import relay as _relay

ADDRS = ("10.77.0.1", "10.77.0.2")
HOSTS = ("node0", "node1")  # each node's hostname, resolving to its address on both nodes
DEVICE = "link0"
_seq = itertools.count()


def parse_rate(rate: str | None) -> float:
    """A tc-style rate ('30mbit', '1gbit', '500kbit', '1000bit') in bits/s; none / 0: unlimited."""
    if rate is None or str(rate).lower() in ("none", "0", ""):
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", str(rate).lower())
    if not m:
        raise ValueError(f"rate {rate!r}: give a tc-style rate such as 30mbit, 1gbit or 500kbit, "
                         f"or none")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


@dataclass(frozen=True)
class Link:
    """The link between the nodes: one-way delay, rate per direction, longest queueing allowed."""

    delay_ms: float = 0.0
    rate: str | None = None  # tc-style, e.g. "30mbit"; None: no rate limit
    queue_ms: float = 50.0  # a packet that would wait longer before serialization is dropped


def cannot() -> str | None:
    """Why two nodes cannot be emulated here, or None."""
    if os.geteuid() != 0:
        return "emulating two nodes needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return "`ip` not found (package iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN support)"
    if shutil.which("unshare") is None:
        return "`unshare` not found (package util-linux)"
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextlib.contextmanager
def _exit_on_signals():
    """SIGTERM / SIGHUP raise SystemExit in the main thread, so `finally` blocks clean up."""
    def handler(sig, _frame):
        raise SystemExit(128 + sig)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class TwoNodes:
    """Two namespaces joined by a relay; a context manager (see the module docstring)."""

    def __init__(self, link: Link | None = None, tag: str | None = None):
        self.link = link or Link()
        self.seq = next(_seq)
        self.tag = tag or f"{os.getpid()}-{self.seq}"
        self.names = tuple(f"plait-n{i}-{self.tag}" for i in range(2))
        self.relay: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._signals = None

    # -- building and tearing down ---------------------------------------------------------
    def __enter__(self) -> TwoNodes:
        self._signals = _exit_on_signals()
        self._signals.__enter__()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        why = cannot()
        if why:
            raise RuntimeError(why)
        rate = parse_rate(self.link.rate)
        for ns in self.names:
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns  # `ip netns exec` mounts these files over /etc's
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{a} {h}\n" for a, h in zip(ADDRS, HOSTS)))
        fds = []
        try:
            for i, ns in enumerate(self.names):
                tmp = f"plt{os.getpid():x}x{self.seq:x}n{i}"  # unique in the root namespace
                fds.append(_relay.open_tun(tmp))
                _ip("link", "set", tmp, "netns", ns)
                _ip("-n", ns, "link", "set", tmp, "name", DEVICE)
                # no IPv6 on the link: router solicitations would cross it and count as traffic
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                                f"net.ipv6.conf.{DEVICE}.disable_ipv6=1"], capture_output=True)
                _ip("-n", ns, "link", "set", DEVICE, "mtu", "1500", "up")
                _ip("-n", ns, "addr", "add", ADDRS[i], "peer", ADDRS[1 - i], "dev", DEVICE)
            self.relay = subprocess.Popen(
                [sys.executable, _relay.__file__, str(fds[0]), str(fds[1]),
                 str(self.link.delay_ms / 1e3), str(rate), str(self.link.queue_ms / 1e3)],
                pass_fds=fds, start_new_session=True)
        finally:
            for fd in fds:  # the relay holds them now; the devices live as long as it does
                os.close(fd)

    def close(self) -> None:
        """Stop everything started, the relay, and delete the namespaces (idempotent)."""
        for p in self.procs:
            self._stop(p)
        self.procs.clear()
        for ns in self._made:  # anything still inside a namespace was started by this object
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        if self.relay is not None:
            self._stop(self.relay, grace_s=3.0)
            self.relay = None
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()
        if self._signals is not None:
            self._signals.__exit__(None, None, None)
            self._signals = None

    @staticmethod
    def _stop(p: subprocess.Popen, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group started for `p`, then SIGKILL after `grace_s`."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the group may outlive its leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def kill(self, node: int) -> None:
        """SIGKILL to every process in the node, as when that machine goes down: a launcher
        agent's workers run in sessions of their own, outside the agent's process group."""
        r = subprocess.run(["ip", "netns", "pids", self.names[node]], capture_output=True,
                           text=True)
        for pid in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def set_link(self, node: int, up: bool) -> None:
        """Take the node's link device down (every packet to and from it dropped) or up."""
        _ip("-n", self.names[node], "link", "set", DEVICE, "up" if up else "down")

    # -- running things in the nodes -------------------------------------------------------
    def env(self, node: int, extra: dict | None = None) -> dict:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=DEVICE, PLAIT_NODE=str(node),
                   PLAIT_NODE0_ADDR=ADDRS[0])
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        env.update(extra or {})
        return env

    def argv(self, node: int, argv: Sequence[str]) -> list[str]:
        """`argv` run in the node's network namespace under the node's hostname."""
        return ["ip", "netns", "exec", self.names[node], "unshare", "--uts", "sh", "-c",
                f'hostname {HOSTS[node]} && exec "$@"', "sh", *argv]

    def start(self, node: int, argv: Sequence[str], env: dict | None = None,
              **popen) -> subprocess.Popen:
        """Start `argv` in `node` (its own process group), stopped by close() at the latest."""
        p = subprocess.Popen(self.argv(node, argv), env=self.env(node, env), start_new_session=True,
                             **popen)
        self.procs.append(p)
        return p

    def run(self, cmds: Sequence[Sequence[str]], env: dict | None = None,
            timeout_s: float | None = None, grace_s: float = 30.0) -> list[int]:
        """Run cmds[i] in node i, all at once; their exit codes once all have ended.

        When one fails, the others get `grace_s` to end on their own (a distributed job's peers
        usually fail soon after), then are stopped. Past `timeout_s` all are stopped and
        TimeoutError is raised.
        """
        procs = [self.start(i, c, env) for i, c in enumerate(cmds)]
        t0, failed_at = time.monotonic(), None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > grace_s:
                for p in procs:
                    self._stop(p)
            if timeout_s is not None and now - t0 > timeout_s:
                for p in procs:
                    self._stop(p)
                raise TimeoutError(f"the nodes' commands ran past {timeout_s:.0f} s")
            time.sleep(0.1)
        return [p.returncode for p in procs]

    def probe(self, seconds: float = 2.0, port: int = 5201) -> dict:
        """Round trip (one-byte TCP ping-pong) and TCP throughput from node 0 to node 1."""
        server = self.start(1, [sys.executable, _probe.__file__, "serve", str(port)])
        try:
            r = subprocess.run(self.argv(0, [sys.executable, _probe.__file__, "measure", ADDRS[1],
                                             str(port), str(seconds)]),
                               capture_output=True, text=True, timeout=seconds + 60)
            if r.returncode:
                raise RuntimeError(f"probe failed: {r.stderr.strip()}")
            return json.loads(r.stdout)
        finally:
            self._stop(server, grace_s=2.0)
