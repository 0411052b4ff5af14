"""The gradient path of a hierarchical layout (`parallel.replicas` > 1): dense dp inside a replica,
then the replica exchange (`mesh.rep`, the one that crosses nodes) with its own compressor.

Communication contract, per gradient bucket, in bucket order on every rank:
- dp > 1: the bucket is all-reduced (SUM, dense, fp32) over `mesh.dp` from the reducer's hooks
  during backward, as in plain data parallelism (`TwoLevelExchange`); then the configured
  compressor exchanges the dp-summed bucket over `mesh.rep` (a plain all-reduce without
  [compression]). Replica exchanges start in bucket order, each once its bucket's dp sum is
  complete: at any later gradient hook (so they overlap the rest of backward) or at the
  optimizer step, which first starts every one still queued and only then runs any exchange's
  later phases. So every rank issues the same collectives in the same order on each group
  (when a rank sees a dp sum complete changes only when it issues, never the order).
- dp = 1: the reducer works on `mesh.rep` directly, with the configured compressor, as plain data
  parallelism over replicas (overlapped with backward).
Bytes per rank and bucket of d fp32 elements: 2(dp−1)/dp · 4d on dp (intra-node), and the
compressor's formula for `replicas` members on rep (inter-node; none: 2(R−1)/R · 4d).

The result is the SUM over every rank of every replica: with the loop's loss normalized by the
global batch's token count, the single-process gradient of the global mean loss, as with
dp = replicas · dp. ZeRO-1/2 (plait.data_parallel.zero) instead reduce-scatter over dp and
all-reduce this rank's shard over rep; ZeRO-3 all-reduces its local gradient shards over rep in
`finish()` (HSDP: shards inside a replica, replicated across).
"""

from __future__ import annotations

import torch.nn as nn

from plait.comm import Comm, Group
from plait.compression.base import Compressor, NoCompression, Pending
from plait.data_parallel.reducer import GradReducer
from plait.mesh import Mesh


class TwoLevelExchange(Compressor):
    """GradReducer's bucket exchange when dp > 1 and replicas > 1: a dense SUM all-reduce over the
    bound (dp) group, then `outer` (a compressor bound to the rep group) on the summed bucket,
    started as early as the order allows (module docstring).

    Checkpoint state, name and step count are the outer compressor's (the dp sum keeps none).
    """

    def __init__(self, outer: Compressor, rep: Group, comm: Comm):
        super().__init__(error_feedback=False)
        self.outer = outer.bind(rep, comm)
        self.name = outer.name
        self._queued: list[list] = []  # [key, flat, views, dp handle, outer handle], bucket order

    def exchange(self, key, flat, views):
        self._start(block=False)
        entry = [key, flat, views, self.comm.all_reduce(flat, self.group, async_op=True), None]
        self._queued.append(entry)
        return Pending(None, lambda: self._finish(entry))

    def poll(self) -> None:
        self._start(block=False)

    def _start(self, block: bool) -> None:
        """Start the outer exchange of queued buckets in order: those whose dp sum is complete
        (`block` False: stop at the first one still in flight), or all of them."""
        while self._queued and (block or self._queued[0][3].is_completed()):
            entry = self._queued.pop(0)
            entry[3].wait()
            entry[4] = self.outer.exchange(*entry[:3])

    def _finish(self, entry: list) -> None:
        self._start(block=True)  # every outer exchange started before any later phase runs
        entry[4].wait()

    def end_step(self) -> None:
        super().end_step()
        self.outer.end_step()

    def state_dict(self) -> dict:
        return self.outer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.outer.load_state_dict(sd)


def grad_reducer(params: list[nn.Parameter], mesh: Mesh, *, bucket_bytes: int,
                 compressor: Compressor | None, segments=None,
                 across_replicas: bool = True) -> GradReducer | None:
    """The plain (non-ZeRO) gradient path: over mesh.dp, then (`across_replicas` and
    replicas > 1) over mesh.rep with `compressor`; None when there is nobody to exchange with.

    `across_replicas` False (a sync strategy other than every_step owns the replica exchange):
    dense dp only, inside the replica."""
    rep = mesh.replicas > 1 and across_replicas
    if not rep:
        if mesh.dp_size == 1:
            return None
        return GradReducer(params, mesh.dp, mesh.comm, bucket_bytes=bucket_bytes,
                           compressor=compressor, segments=segments)
    if mesh.dp_size == 1:
        return GradReducer(params, mesh.rep, mesh.comm, bucket_bytes=bucket_bytes,
                           compressor=compressor, segments=segments)
    two = TwoLevelExchange(compressor if compressor is not None else NoCompression(), mesh.rep,
                           mesh.comm)
    return GradReducer(params, mesh.dp, mesh.comm, bucket_bytes=bucket_bytes, compressor=two,
                       segments=segments)
