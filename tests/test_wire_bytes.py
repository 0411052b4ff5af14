"""plait's byte count against the bytes really sent (plait.netem.wire), for dp and a compressor.

Two ranks train a small GPT in a private network namespace; the loopback's TCP payload over N
steps (headers subtracted, fixed costs cancelled by an N and a 2N window) must be within 5 % of
what `mesh.comm.stats` says went on the wire. Needs root and `ip` (CI runs as root); skipped
otherwise, with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from plait.netem import cannot

pytestmark = pytest.mark.skipif(cannot() is not None, reason=f"plait.netem: {cannot()}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def test_wire_bytes_match_the_count(tmp_path):
    out = tmp_path / "wire.json"
    p = subprocess.Popen([sys.executable, "-m", "plait.netem", "wire", "--cases", "dp,topk",
                          "--steps", "4", "--warmup", "2", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = p.communicate(timeout=120)
    finally:
        p.kill()  # only if it still runs: its namespace goes with it
    assert p.returncode == 0, log
    assert f"plait-ns-{p.pid}-0" not in _namespaces(), "the namespace outlived the run"
    rows = {row["case"]: row for row in json.loads(out.read_text())}
    for name in ("dp", "topk"):
        row = rows[name]
        assert 0.95 <= row["ratio"] <= 1.05, row
    # the dense gradients dwarf gloo's framing; top-k's small payloads do not, and are counted
    assert rows["dp"]["count"] > 10 * rows["topk"]["count"]
