"""Two emulated nodes (plait.netem): the link has the delay asked for, and nothing outlives a run.

Needs root, `ip` and /dev/net/tun (CI runs as root); skipped otherwise, with the reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from plait.netem import Link, TwoNodes, cannot, parse_rate

pytestmark = pytest.mark.skipif(cannot() is not None, reason=f"plait.netem: {cannot()}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def _gone(nodes: TwoNodes, relay_pid: int) -> None:
    assert not set(nodes.names) & _namespaces(), "a namespace outlived the run"
    assert not os.path.exists(f"/proc/{relay_pid}"), "the relay outlived the run"


def test_parse_rate():
    assert parse_rate("30mbit") == 30e6 and parse_rate("1gbit") == 1e9 and parse_rate("none") == 0
    with pytest.raises(ValueError, match="tc-style"):
        parse_rate("30mbps")


def test_round_trip_and_cleanup():
    with TwoNodes(Link(delay_ms=10, rate="30mbit")) as nodes:
        relay = nodes.relay.pid
        got = nodes.probe(seconds=1.0)
    # 10 ms each way: a round trip of 20 ms plus the relay's and the stacks' own time
    assert 20.0 <= got["rtt_ms_median"] < 40.0, got
    assert 3.0 < got["tcp_mbit_s"] < 30.0, got  # below the rate: TCP/IP headers, slow start
    _gone(nodes, relay)


def test_cleanup_when_a_command_fails():
    with TwoNodes(Link(delay_ms=1)) as nodes:
        relay = nodes.relay.pid
        # node 0 fails at once; node 1 would run for a minute: it is stopped after the grace time
        codes = nodes.run([["false"], ["sleep", "60"]], grace_s=0.5, timeout_s=20)
    assert codes[0] == 1 and codes[1] != 0
    _gone(nodes, relay)


def test_cleanup_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with TwoNodes(Link(delay_ms=1)) as nodes:
            relay = nodes.relay.pid
            nodes.start(1, ["sleep", "60"])
            raise RuntimeError("boom")
    _gone(nodes, relay)
