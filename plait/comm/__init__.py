"""plait's communication layer: every collective, its byte count and its time."""

from plait.comm.accounting import CommStats, wire_bytes
from plait.comm.group import Group, single
from plait.comm.ops import Comm, CommError, Handle

__all__ = ["Comm", "CommError", "CommStats", "Group", "Handle", "single", "wire_bytes"]
