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
    assert not any(os.path.exists(f"/etc/netns/{ns}") for ns in nodes.names), "hosts file left"


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


def test_each_node_is_a_host_of_its_own_name():
    """Each node's hostname resolves to its link address, on itself and on the other node (what
    gloo binds, what the agent publishes as master address, what c10d's rendezvous compares)."""
    from plait.netem.nodes import ADDRS, HOSTS

    with TwoNodes(Link(delay_ms=1)) as nodes:
        relay = nodes.relay.pid
        for i in range(2):
            out = subprocess.run(nodes.argv(i, ["sh", "-c", "hostname; getent hosts node0 node1"]),
                                 capture_output=True, text=True, timeout=20).stdout.split()
            assert out[0] == HOSTS[i], out
            assert out[1:] == [ADDRS[0], HOSTS[0], ADDRS[1], HOSTS[1]], out
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() not in HOSTS
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


def test_two_launcher_agents_train_a_hierarchical_layout(tmp_path):
    """Two nodes, each its own `plait train` agent with 2 ranks (one replica of dp 2 per node,
    DiLoCo across): the run ends on both, the replica exchange is the only inter-node traffic,
    and it trains exactly as the same config on one machine with 4 ranks."""
    import json
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [os.path.join(root, "examples", "two_nodes_diloco.toml"), "train.steps=6",
            "sync.every=3", "train.val_every=0", "log.plots=false"]
    cmd = [sys.executable, "-m", "plait", "train", *args]
    with TwoNodes(Link(delay_ms=10, rate="30mbit")) as nodes:
        # the command line of two real hosts: c10d rendezvous at node 0's name, one run folder
        codes = nodes.run([[*cmd, "--nnodes", "2", "--node-rank", str(i), "--nproc", "2",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
                            "--run-dir", str(tmp_path / "two")] for i in range(2)],
                          env={"PYTHONPATH": root}, timeout_s=240)
    assert codes == [0, 0], codes
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["layout"]["replicas"] == 2 and two["layout"]["world_size"] == 4
    assert two["comm_bytes_inter_per_step"] > 0 and two["comm_bytes_intra_per_step"] > 0
    one = subprocess.run([*cmd, "--nproc", "4", "--run-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, PYTHONPATH=root))
    assert one.returncode == 0, one.stdout + one.stderr
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert two["final_train_loss"] == single["final_train_loss"]
    assert two["comm_bytes_inter_per_step"] == single["comm_bytes_inter_per_step"]


def test_a_killed_node_rejoins_and_the_run_resumes(tmp_path):
    """Node 1 dies (agent and workers killed) after the second checkpoint and its agent is started
    again: node 0's agent restarts its workers into a new rendezvous round with the new node 1,
    every rank resumes from the newest checkpoint, and the run ends as one machine's uninterrupted
    run of the same config (scripts/two_node_faults.py also cuts the link)."""
    import json
    import sys
    import time

    from plait.netem.nodes import HOSTS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "plait", "train",
           os.path.join(root, "examples", "two_nodes_diloco.toml"), "train.steps=8",
           "sync.every=3", "train.val_every=0", "log.plots=false", "checkpoint.every=2",
           "train.timeout_s=20"]
    run = tmp_path / "two"
    node = [*cmd, "--nnodes", "2", "--nproc", "2", "--max-restarts", "1", "--rdzv-backend",
            "c10d", "--rdzv-endpoint", f"{HOSTS[0]}:29500", "--run-dir", str(run)]
    env = {"PYTHONPATH": root}

    def saved() -> int:
        return len(list(run.glob("checkpoints/step-*/manifest.json")))

    with TwoNodes(Link(delay_ms=10, rate="30mbit")) as nodes:
        procs = [nodes.start(i, node, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(2)]
        deadline = time.monotonic() + 120
        while saved() < 2 and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert saved() >= 2 and all(p.poll() is None for p in procs), "no checkpoint to resume"
        nodes.kill(1)
        procs[1].wait(10)
        time.sleep(2.0)
        procs[1] = nodes.start(1, node, env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        for p in procs:
            p.wait(240)
    assert [p.returncode for p in procs] == [0, 0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["resumed_from"] for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and 2 <= resumed[0] < 8, resumed
    two = json.loads((run / "summary.json").read_text())
    one = subprocess.run([*cmd, "--nproc", "4", "--run-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, PYTHONPATH=root))
    assert one.returncode == 0, one.stdout + one.stderr
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert two["steps"] == single["steps"] == 8
    assert two["final_train_loss"] == single["final_train_loss"]
