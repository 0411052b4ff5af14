"""Step time of one layout: per-instruction costs, the pipeline simulation, what follows it.

`StepTime` is the time half of `plait.planner.search.Planner` (which adds the rules, memory and
the search). Costs per stage come from plait.planner.compute; the pipeline from
plait.planner.pipesim; after the pipeline, on the slowest pp rank:
- the data-parallel gradient exchange: bucketed all-reduce (ZeRO-0) or reduce-scatter (ZeRO-1/2)
  over the dp group's link, issued from the hooks of the last micro-batch's backward (with a
  pipeline: of each chunk's last weight-gradient instruction) and overlapped (on devices that
  overlap communication), except the last bucket, with that backward and, under a pipeline, the
  backward chain of the earlier stages that follows it (`_slack`); `Job.dp_overlap_under_pp =
  False` models an engine that reduces after the pipeline flush instead (DeepSpeed's);
- ZeRO-1/2's all-gather of the updated parameters (issued after the step, not overlapped);
- ZeRO-3: per micro-batch all-gathers before forward and backward inside the stage costs,
  overlapped with compute on GPUs except the first unit's gather; one reduce-scatter per step
  after the last backward (under a pipeline overlapped with the flush like the buckets above);
- pipeline messages: the hidden state, 1/tp of it with tp > 1 (sequence parallelism splits it,
  else each stage sends its tp slice and the receiver all-gathers over tp);
- the optimizer step: AdamW over the owned elements (GPUs: 40 bytes per element plus 16 per
  gradient element at memory bandwidth; CPUs: the calibrated cost per element and per tensor);
- the gradient norm's scalar all-reduce (latency only);
- shared gradients (plait.shared_grads): a tied embedding's copies summed between the first and
  the last stage (one all-reduce of the embedding shard over 2 ranks on the pp link, 1/dp of it
  under ZeRO), and kv heads replicated over tp (tp > K) summed per group (one all-reduce over tp
  of K times the replicated k / v weights this rank steps);
- a compressor or sync strategy (the config's, or `plait plan --low-comm`'s variants) replaces the
  dense exchange's time by plait.planner.lowcomm's.
A group crosses nodes when its ranks (rank = (pp_i·dp + dp_i)·tp + tp_i) are not in one node.
"""

from __future__ import annotations

import math
from functools import lru_cache

from plait.planner.compute import (
    allreduce_s,
    block_times,
    gather_s,
    reduce_scatter_s,
    scalar_allreduce_s,
    stage_times,
)
from plait.planner.layout import Layout
from plait.planner.lowcomm import exchange_s, strategy_s
from plait.planner.memory import buckets, rank_parts
from plait.planner.shape import StagePart, rank_param_shapes, stage_parts


def _crosses(first: int, last: int, g: int) -> bool:
    return first // g != last // g


@lru_cache(maxsize=4096)
def group_crosses(dp: int, tp: int, pp: int, g: int) -> tuple[bool, bool]:
    """(dp group crosses nodes, pp group crosses nodes) under rank = (pp_i·dp + dp_i)·tp + tp_i."""
    dpx = any(
        _crosses(i * dp * tp + j, i * dp * tp + j + (dp - 1) * tp, g)
        for i in range(pp)
        for j in range(tp)
    )
    ppx = any(_crosses(b, b + (pp - 1) * dp * tp, g) for b in range(dp * tp))
    return dpx, ppx


def _all_parts(shape, tp, p, v) -> list:
    """The parts of every global stage, in stage order (without a pipeline: the whole model)."""
    if p == 1:
        return [StagePart(shape.n_layers, True, True)]
    return list(stage_parts(shape, tp, p, v))


class StepTime:
    """Mixin: needs self.job, self.shape, self.cluster, self.rates and the cache dicts."""

    def _stage_costs(self, L: Layout) -> tuple[tuple, tuple, tuple]:
        key = (L.tp, L.pp, L.virtual_stages, L.micro_batch, L.activation_checkpointing,
               L.sequence_parallel, L.schedule == "zb_h1", L.zero == 3 and L.dp > 1, L.dp)
        if key not in self._cost_cache:
            self._cost_cache[key] = self._stage_costs_uncached(L)
        return self._cost_cache[key]

    def _stage_costs_uncached(self, L: Layout) -> tuple[tuple, tuple, tuple]:
        j, sh = self.job, self.shape
        b, s = L.micro_batch, j.seq_len
        blk = block_times(sh, self.rates, self.cluster, b, s, L.tp, L.sequence_parallel,
                          L.activation_checkpointing, j.dtype)
        zb = L.schedule == "zb_h1" and L.pp > 1
        F, B, W = [], [], []
        for part in _all_parts(sh, L.tp, L.pp, L.virtual_stages):
            f, bi, w = stage_times(sh, self.rates, self.cluster, part, blk, b, s, L.tp,
                                   L.sequence_parallel, j.dtype,
                                   zb and L.activation_checkpointing == "full")
            if L.zero == 3 and L.dp > 1:
                f, bi = self._zero3_exposed(L, part, f, bi, w)
            F.append(f)
            B.append(bi if zb else bi + w)
            W.append(w if zb else 0.0)
        return tuple(F), tuple(B), tuple(W)

    def _zero3_exposed(self, L, part, f, bi, w):
        """ZeRO-3 per micro-batch: all-gather before forward and backward, reduce-scatter after each
        backward under a pipeline; overlapped with compute on GPUs but for the first gather."""
        sh, c = self.shape, self.cluster
        dpx, _ = group_crosses(L.dp, L.tp, L.pp, c.gpus_per_node)
        link = c.link(dpx)
        psi = part.blocks * sh.block_params(L.tp) + (part.embedding + part.head) * math.prod(
            sh.emb_shape(L.tp)
        )
        ag = gather_s(4 * psi, L.dp, link)
        first = gather_s(4 * sh.block_params(L.tp), L.dp, link)
        if c.comm_overlap:
            return f + max(0.0, ag - f) + first, bi + max(0.0, ag - bi - w) + first
        return f + ag, bi + ag

    def _p2p(self, L: Layout) -> float:
        c, j = self.cluster, self.job
        _, ppx = group_crosses(L.dp, L.tp, L.pp, c.gpus_per_node)
        bw, lat = c.link(ppx)
        nbytes = 4 * L.micro_batch * j.seq_len * self.shape.d_model
        if L.tp > 1 and not L.sequence_parallel:  # 1/tp of it, then an all-gather over tp
            return lat + nbytes / L.tp / bw + gather_s(nbytes, L.tp, c.link(False))
        return lat + nbytes / L.tp / bw  # sequence parallel: already 1/tp

    def _after(self, L: Layout, costs) -> tuple[float, dict]:
        key = (L.tp, L.pp, L.virtual_stages, L.zero, L.dp, costs, L.compression, L.sync,
               L.micro_batch)
        if key not in self._after_cache:
            self._after_cache[key] = self._after_uncached(L, costs)
        return self._after_cache[key]

    def _after_uncached(self, L: Layout, costs) -> tuple[float, dict]:
        """Seconds after the pipeline (the slowest pp rank): exposed gradient exchange, ZeRO-1/2's
        parameter all-gather, the optimizer step, the gradient-norm all-reduce."""
        c, sh = self.cluster, self.shape
        dpx, _ = group_crosses(L.dp, L.tp, L.pp, c.gpus_per_node)
        link = c.link(dpx)
        worst, parts = 0.0, {}
        for r in self._representatives(L):  # ranks with equal layers finish alike
            shapes = rank_param_shapes(sh, L.tp, L.pp, L.virtual_stages, r)
            bks = [sum(x) for x in buckets(shapes, int(self.job.bucket_mb * 2**20))]
            psi = sum(bks)
            dp_s = gather_ag = 0.0
            if L.dp > 1 and L.zero in (0, 1, 2):
                if L.zero == 0:
                    per = [allreduce_s(4 * n, L.dp, link) for n in bks]
                else:
                    padded = [math.ceil(n / L.dp) * L.dp for n in bks]
                    per = [reduce_scatter_s(4 * n, L.dp, link, c) for n in padded]
                    gather_ag = sum(gather_s(4 * n, L.dp, link) for n in padded)
                total = sum(per)
                overlap = c.comm_overlap and (L.pp == 1 or self.job.dp_overlap_under_pp)
                slack = self._slack(L, costs, r)
                # the last backward issues them (with pp: each chunk's last weight gradient)
                dp_s = max(per[-1], total - slack) if overlap else total
                if L.sync != "every_step":
                    dp_s = strategy_s(L.sync, psi, L.dp, link, self.job.settings,
                                      self._compute_s(L, costs), dp_s, self.rates.bytes_s)
                elif L.compression != "none":
                    members = buckets(shapes, int(self.job.bucket_mb * 2**20))
                    dp_s = exchange_s(L.compression, shapes, members, L.dp, link, self.job.settings,
                                      slack, overlap, self.rates.bytes_s)
            elif L.dp > 1 and L.zero == 3:
                # one reduce-scatter per step; under a pipeline each unit's starts from the chunk's
                # last weight gradient, overlapping the flush
                dp_s = reduce_scatter_s(4 * psi, L.dp, link, c)
                if L.pp > 1 and c.comm_overlap and self.job.dp_overlap_under_pp:
                    dp_s = max(0.0, dp_s - self._slack(L, costs, r))
            owned = psi if (L.zero == 0 or L.dp == 1) else -(-psi // L.dp)
            opt = self._optimizer_s(owned, psi if L.zero < 2 else owned, len(shapes))
            norm = scalar_allreduce_s(
                L.world if L.zero else L.tp * L.pp, c.link(L.world > c.gpus_per_node)
            )
            shared = self._shared_s(L, r)
            t = dp_s + gather_ag + opt + norm + shared
            if t >= worst:
                worst, parts = (
                    t,
                    {
                        "dp_exchange_s": dp_s,
                        "param_allgather_s": gather_ag,
                        "optimizer_s": opt,
                        "grad_norm_s": norm,
                        "shared_grads_s": shared,
                    },
                )
        return worst, parts

    def _shared_s(self, L: Layout, r: int) -> float:
        """pp rank r's sums of shared gradients (the module docstring), after the dp exchange."""
        sh, c = self.shape, self.cluster
        parts = rank_parts(sh, L.tp, L.pp, L.virtual_stages, r)
        share = L.dp if (L.zero and L.dp > 1) else 1  # ZeRO: this rank's piece
        out = 0.0
        if sh.tie_embeddings and L.pp > 1 and any(pt.embedding or pt.head for pt in parts):
            _, ppx = group_crosses(L.dp, L.tp, L.pp, c.gpus_per_node)
            out += allreduce_s(4 * math.prod(sh.emb_shape(L.tp)) / share, 2, c.link(ppx))
        if L.tp > sh.kv_heads:
            n = sum(pt.blocks for pt in parts) * 2 * sh.head_dim * sh.d_model / share
            out += allreduce_s(4 * sh.kv_heads * n, L.tp, c.link(False))
        return out

    def _slack(self, L: Layout, costs, r: int) -> float:
        """From the start of pp rank r's last weight-gradient instruction to the pipeline's end:
        that backward itself, then the backward chain of the stages before it (each one's last
        backward and a message), during which rank r only waits."""
        F, B, W = costs
        if L.pp == 1:
            return B[0] + W[0]
        t = self._p2p(L)
        return B[r] + W[r] + sum(B[s] + t for s in range(r))

    def _compute_s(self, L: Layout, costs) -> float:
        """The busiest pp rank's compute in a step (what a background exchange can hide behind)."""
        m = self.job.global_batch // (L.dp * L.micro_batch)
        F, B, W = costs
        return m * max(sum(F[c * L.pp + r] + B[c * L.pp + r] + W[c * L.pp + r]
                           for c in range(L.virtual_stages)) for r in range(L.pp))

    def _optimizer_s(self, owned: int, grads: int, tensors: int) -> float:
        c = self.cluster
        if c.is_cpu:
            share = self.rates.share * self.rates.threads
            return (
                c.adam_s_per_elem * owned + c.adam_s_per_tensor * tensors
            ) / share + self.rates.bytes_s(12 * grads)
        return self.rates.bytes_s(40 * owned + 16 * grads)

    def peak_per_rank(self) -> float:
        c = self.cluster
        return c.peak_flops * (self.rates.threads * self.rates.share if c.is_cpu else 1.0)

    def lower_bound(self, L: Layout) -> float:
        """A step time no simulation of this layout can beat (see the module docstring).

        Rank r starts with the forward of micro-batch 0 on its first stage, which needs the forwards
        of every stage before it (Σ_{s<r} F_s + r·p2p); it ends (the atomic-backward schedules) with
        the backward of its first stage for the last micro-batch, after which every earlier stage
        still runs its backward (Σ_{s<r} B_s + r·p2p); in between it computes busy_r."""
        j = self.job
        m = j.global_batch // (L.dp * L.micro_batch)
        F, B, W = self._stage_costs(L)
        p, v = L.pp, L.virtual_stages
        busy = [
            m * sum(F[c * p + r] + B[c * p + r] + W[c * p + r] for c in range(v)) for r in range(p)
        ]
        lb = max(busy)
        if p > 1:
            t, head, tail = self._p2p(L), 0.0, 0.0
            for r in range(p):
                lb = max(lb, head + busy[r] + (0.0 if L.schedule == "zb_h1" else tail))
                head += F[r] + t
                tail += B[r] + t
        return lb + self._after(L, (F, B, W))[0]
