"""PowerSGD (Vogels et al. 2019): rank-r approximation by one step of power iteration per step.

For each gradient matrix M (m × n; a tensor of higher rank is viewed as shape[0] × rest) with
error feedback M ← g + e:

    P = M Q              (Q: n × r, warm-started from the previous step's Q)
    all-reduce P         (SUM; together with every uncompressed tensor of the bucket)
    P ← orthogonalize(P) (Gram–Schmidt; every rank has the same P, so the same result)
    Q = Mᵀ P
    all-reduce Q         (SUM)
    M̂ = P Qᵀ             = P Pᵀ Σ_ranks M: the sum of every rank's projection (linear)
    e ← M − M̂ / n        (this rank's share of what the projection dropped)

1-D tensors, and matrices where r(m + n) ≥ m·n (compression would not save bytes), travel
uncompressed in the first all-reduce. For the first `warmup_steps` optimizer steps the bucket is
all-reduced densely, exactly as without compression. Momentum is the optimizer's, applied after
decompression.

Bytes per rank per bucket: 2(n_ranks−1)/n_ranks · 4 · (Σ r(m + n) over compressed matrices +
elements of the uncompressed tensors), in two all-reduces (P with the uncompressed tensors, then
Q). Phase 1 is issued asynchronously from `exchange`; orthogonalization and the Q all-reduce run
in `wait()`, in bucket order.
"""

from __future__ import annotations

import torch

from plait.compression.base import Compressor, Pending


def orthogonalize(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """In-place Gram–Schmidt on the columns of p (m × r); a zero column stays zero."""
    r = p.shape[1]
    for i in range(r):
        col = p[:, i: i + 1]
        col.div_(col.norm() + eps)
        if i + 1 < r:
            rest = p[:, i + 1:]
            rest.sub_(col @ (col.t() @ rest))
    return p


Span = tuple[int, int]  # (offset in the bucket, numel)
Matrix = tuple[int, int, int, int, int]  # (view index, offset, m, n, r)


def matrix_plan(flat: torch.Tensor, views, rank: int) -> tuple[list[Span], list[Matrix]]:
    """Split a bucket into uncompressed spans (offset, numel) and matrices
    (index, offset, m, n, r)."""
    dense, mats = [], []
    for i, v in enumerate(views):
        off = v.storage_offset() - flat.storage_offset()
        if v.dim() >= 2:
            m = v.shape[0]
            n = v.numel() // m
            r = min(rank, m, n)
            if r * (m + n) < m * n:
                mats.append((i, off, m, n, r))
                continue
        dense.append((off, v.numel()))
    return dense, mats


class PowerSGDCompressor(Compressor):
    name = "powersgd"
    linear = True
    biased = True

    def __init__(self, rank: int = 4, warmup_steps: int = 0, error_feedback: bool = True,
                 seed: int = 0):
        super().__init__(error_feedback)
        if rank < 1:
            raise ValueError(f"compression.rank = {rank}: must be a positive integer")
        self.rank = rank
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.qs: dict[str, torch.Tensor] = {}  # warm-start Q per (bucket, tensor)

    def _q(self, key: int, index: int, n: int, r: int, device: torch.device) -> torch.Tensor:
        name = f"{key}.{index}"
        q = self.qs.get(name)
        if q is None or q.shape != (n, r):
            # the same seed on every rank: the same initial Q everywhere, whatever the device
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + key * 10_007 + index)
            q = torch.randn(n, r, generator=g).to(device)
        return q

    def exchange(self, key, flat, views):
        if self.steps < self.warmup_steps:
            return Pending(self.comm.all_reduce(flat, self.group, async_op=True))
        dense, mats = matrix_plan(flat, views, self.rank)
        x = self.with_error(key, flat)  # fp32: g + e
        n_dense = sum(n for _, n in dense)
        first = torch.empty(n_dense + sum(m * r for _, _, m, _, r in mats), dtype=torch.float32,
                            device=flat.device)
        pos = 0
        for off, n in dense:
            first[pos: pos + n].copy_(x[off: off + n])
            pos += n
        ps = []
        for i, off, m, n, r in mats:
            p = first[pos: pos + m * r].view(m, r)
            torch.matmul(x[off: off + m * n].view(m, n), self._q(key, i, n, r, flat.device), out=p)
            ps.append(p)
            pos += m * r
        h = self.comm.all_reduce(first, self.group, async_op=True)

        def then():
            pos = 0
            for off, n in dense:
                flat[off: off + n].copy_(first[pos: pos + n])
                x[off: off + n].zero_()  # sent exactly: nothing left over
                pos += n
            if mats:
                second = torch.empty(sum(n * r for _, _, _, n, r in mats), dtype=torch.float32,
                                     device=flat.device)
                qs, pos = [], 0
                for p, (_, off, m, n, r) in zip(ps, mats):
                    orthogonalize(p)
                    q = second[pos: pos + n * r].view(n, r)
                    torch.matmul(x[off: off + m * n].view(m, n).t(), p, out=q)
                    qs.append(q)
                    pos += n * r
                self.comm.all_reduce(second, self.group)
                for p, q, (i, off, m, n, _) in zip(ps, qs, mats):
                    approx = p @ q.t()  # the sum over ranks of every projection
                    flat[off: off + m * n].view(m, n).copy_(approx)
                    x[off: off + m * n].view(m, n).sub_(approx, alpha=1.0 / self.world)
                    self.qs[f"{key}.{i}"] = q.clone()
            self.keep_error(key, x)

        return Pending(h, then)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["qs"] = {k: v.clone() for k, v in self.qs.items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.qs = {k: v.clone() for k, v in sd["qs"].items()}
