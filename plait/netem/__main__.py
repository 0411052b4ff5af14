"""`python -m plait.netem`: two emulated nodes on this machine (root).

    python -m plait.netem probe --delay-ms 10 --rate 30mbit
    python -m plait.netem run --delay-ms 10 --rate 30mbit --each \\
        'plait train model.preset=tiny --nnodes 2 --nproc 2 --rdzv-endpoint node0:29500 \\
         --run-dir runs/two-nodes'
    python -m plait.netem run --node0 'CMD' --node1 'CMD'
    python -m plait.netem clean        # namespaces left by a run killed with SIGKILL
    python -m plait.netem wire         # bytes on the wire against plait's count (plait.netem.wire)

In commands, {node} is the node index (0, 1), {addr0} / {addr1} the nodes' link addresses and
{dev} the link device; the nodes' host names `node0` / `node1` resolve to those addresses in
both nodes. Commands are split like a shell line (no shell runs them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from plait.netem.nodes import ADDRS, DEVICE, Link, TwoNodes, cannot


def _link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    p.add_argument("--rate", default="30mbit",
                   help="per direction, tc-style (30mbit, 1gbit) or none")
    p.add_argument("--queue-ms", type=float, default=50.0, help="longest queueing before a drop")


def _commands(args) -> list[list[str]]:
    if args.each and (args.node0 or args.node1):
        raise SystemExit("give either --each or --node0 and --node1")
    templates = [args.each, args.each] if args.each else [args.node0, args.node1]
    if not all(templates):
        raise SystemExit("give --each CMD, or both --node0 CMD and --node1 CMD")
    fields = {"addr0": ADDRS[0], "addr1": ADDRS[1], "dev": DEVICE}
    return [shlex.split(t.format(node=i, **fields)) for i, t in enumerate(templates)]


def clean() -> int:
    """Delete plait's namespaces whose creating process is gone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    gone = 0
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(r"plait-(?:n[01]|ns)-(\d+)-[\w-]+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True).stdout
            if pids.split():  # someone still runs there: leave it
                continue
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)  # the node's hosts file
            gone += 1
    print(f"deleted {gone} stale namespace(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wire"]:  # its own flags: plait.netem.wire
        from plait.netem.wire import main as wire_main

        return wire_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m plait.netem", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="round trip and TCP throughput between the two nodes")
    _link_args(pr)
    pr.add_argument("--seconds", type=float, default=3.0)
    rn = sub.add_parser("run", help="run one command per node, wait for both")
    _link_args(rn)
    rn.add_argument("--each", help="command template run in both nodes ({node} differs)")
    rn.add_argument("--node0")
    rn.add_argument("--node1")
    rn.add_argument("--timeout-s", type=float, default=None)
    sub.add_parser("clean", help="delete namespaces left by runs that were killed")
    sub.add_parser("wire", help="bytes on the wire of every engine against plait's count (--help)")
    args = ap.parse_args(argv)
    if args.cmd == "clean":
        return clean()
    why = cannot()
    if why:
        print(f"plait.netem: {why}", file=sys.stderr)
        return 2
    link = Link(args.delay_ms, None if args.rate == "none" else args.rate, args.queue_ms)
    try:
        with TwoNodes(link) as nodes:
            if args.cmd == "probe":
                got = nodes.probe(args.seconds)
                print(json.dumps({"delay_ms": args.delay_ms, "rate": args.rate, **got}))
                return 0
            codes = nodes.run(_commands(args), timeout_s=args.timeout_s)
    except KeyboardInterrupt:  # the nodes are already deleted: no traceback for a Ctrl-C
        print("plait.netem: interrupted; namespaces and relay removed", file=sys.stderr)
        return 130
    print(f"plait.netem: exit codes {codes}", file=sys.stderr)
    return next((c for c in codes if c), 0) if all(c >= 0 for c in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
