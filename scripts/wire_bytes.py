"""Bytes on the wire of every engine against plait's own count, in one command (root).

    .venv/bin/python scripts/wire_bytes.py                        # the table in docs/benchmarks.md
    .venv/bin/python scripts/wire_bytes.py --cases dp,zero2,topk --steps 4 --json out.json

Creates a private network namespace (loopback MTU 1500), runs every case inside it and deletes
it on every way out; see plait/netem/wire.py for the method and the header model.
"""

import sys

from plait.netem.wire import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
