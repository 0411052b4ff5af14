"""Network emulation on one machine, for multi-node runs and byte measurements.

See docs/architecture.md, "Slow networks", and docs/multinode.md.

- `TwoNodes`: two network namespaces ("nodes"), each with a fast loopback for its own ranks,
  joined by a link with a one-way delay and a rate per direction (a userspace delay line between
  TUN devices: this kernel has no netem). `python -m plait.netem run|probe|clean`.
- `Namespace`: one private namespace whose loopback has MTU 1500 and optionally a tbf rate;
  its `counters()` read the loopback's bytes and packets (every byte any rank sends inside it).
"""

from plait.netem.namespace import Namespace, loopback_counters
from plait.netem.nodes import ADDRS, DEVICE, Link, TwoNodes, cannot, parse_rate

__all__ = ["ADDRS", "DEVICE", "Link", "Namespace", "TwoNodes", "cannot", "loopback_counters",
           "parse_rate"]
