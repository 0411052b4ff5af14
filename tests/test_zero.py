"""ZeRO-1/2/3 over dp: parity with one process, bit-exact element-wise steps,
memory and bytes by formula."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from common import assert_parity, reference, tiny_cfg, train_run

from plait.config import CompressionConfig, ParallelConfig
from plait.errors import ConfigError
from plait.testing import run_ranks


# -- parity with the single-process run (gradient accumulation and clipping on) --------------------
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_parity_dp2(corpus_path, zero):
    # global batch 8, micro-batch 2, dp 2: two accumulated micro-batches per rank; grad_clip 1.0
    cfg = tiny_cfg(corpus_path, parallel={"dp": 2, "zero": zero})
    ref = reference(cfg)
    for got in run_ranks(train_run, 2, args=(cfg,), timeout=180):
        assert_parity(ref, got)


@pytest.mark.parametrize("zero,sp", [(1, False), (2, False), (3, True)])
def test_zero_parity_dp2_tp2(corpus_path, zero, sp):
    cfg = tiny_cfg(corpus_path, parallel={"dp": 2, "tp": 2, "zero": zero, "sequence_parallel": sp})
    ref = reference(cfg)
    for got in run_ranks(train_run, 4, args=(cfg,), timeout=240):
        assert_parity(ref, got)


# -- a small model with odd sizes: padding everywhere --------------------------------------------
class Odd(nn.Module):
    """129 parameters; every dim 0 odd, so ZeRO-3 pads each tensor, ZeRO-1/2 each odd bucket."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 7)])
        self.scale = nn.Parameter(torch.ones(7))
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x * self.scale)


def _data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)


def _factory(name: str):
    from plait.optim import LAMB, LARS, param_groups

    def build(params):
        groups = param_groups(list(params), 0.1)
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
        if name == "sgd":
            return torch.optim.SGD(groups, lr=1e-1, momentum=0.9)
        if name == "lamb":
            return LAMB(groups, lr=1e-2)
        return LARS(groups, lr=1.0, momentum=0.9)

    return build


def _train_odd(mesh, zero: int, opt_name: str, steps: int = 3, bucket_mb: float = 64 / 2**20,
               clip: float = 0.0, micro: int = 1):
    """Returns (full parameters after each step, model, optimizer, comm bytes by op per step)."""
    from plait.parallelize import ParallelOptions, parallelize

    torch.manual_seed(0)
    par = ParallelConfig(dp=mesh.dp_size, zero=zero, bucket_mb=bucket_mb)
    model, opt = parallelize(Odd(), _factory(opt_name), mesh,
                             ParallelOptions(parallel=par, grad_clip=clip))
    history, by_op = [], []
    for step in range(steps):
        mesh.comm.stats.reset_step()
        x, y = _data(mesh.dp_index, step)
        # gradient accumulation: all but the last micro-batch inside no_sync()
        for k in range(micro):
            with model.no_sync() if k < micro - 1 else contextlib.nullcontext():
                xs, ys = x[k::micro], y[k::micro]
                (model(xs) - ys).pow(2).sum().div(4 * mesh.dp_size).backward()
        opt.step()
        # by the formulas: on gloo the wire differs (reduce-scatter runs as an all-reduce, 144 B of
        # framing per message; plait.comm.accounting, measured by scripts/wire_bytes.py)
        by_op.append(mesh.comm.stats.reset_step()["formula_by_op"])
        if step < steps - 1:
            opt.zero_grad()
        history.append({k: v.clone() for k, v in model.full_state_dict().items()})
    return history, model, opt, by_op


def _bitwise_worker():
    from plait.mesh import Mesh

    mesh = Mesh.build(dp=2)
    out = {}
    for name in ("adamw", "sgd", "lamb", "lars"):
        plain, *_ = _train_odd(mesh, 0, name)
        for zero in (1, 2, 3):
            got, *_ = _train_odd(mesh, zero, name)
            same = all(torch.equal(a[k], b[k]) for a, b in zip(got, plain) for k in a)
            err = max(float((a[k] - b[k]).norm() / b[k].norm()) for a, b in zip(got, plain)
                      for k in a)
            out[(name, zero)] = (same, err)
    return out


def test_zero_elementwise_steps_are_bit_exact():
    """AdamW and SGD on pieces = on full tensors, bit for bit;
    LAMB / LARS (norm reducer over dp) within 1e-6."""
    for res in run_ranks(_bitwise_worker, 2, timeout=180):
        for (name, zero), (same, err) in res.items():
            if name in ("adamw", "sgd"):
                assert same, (f"{name} ZeRO-{zero}: not bit-identical to plain DP "
                              f"(max rel err {err:.2e})")
            else:
                assert err < 1e-6, f"{name} ZeRO-{zero}: relative error {err:.2e} against plain DP"


# -- memory and bytes by formula -------------------------------------------------------------------
def _owned_and_padding(zero: int, n: int, r: int, model, opt):
    """Ψ_r and P from the layout alone (bucket sizes, parameter shapes), not from held tensors."""
    if zero == 3:
        shapes = [p.shape for p in model.parameters()]
        pad = sum((math.ceil(s[0] / n) * n - s[0]) * math.prod(s[1:]) for s in shapes)
        owned = sum(
            max(0, min(math.ceil(s[0] / n), s[0] - r * math.ceil(s[0] / n))) * math.prod(s[1:])
            for s in shapes)
        return owned, pad
    sizes = [b.numel for b in opt.reducer.buckets]
    pad = sum(math.ceil(m / n) * n - m for m in sizes)
    owned = sum(max(0, min(m, (r + 1) * math.ceil(m / n)) - r * math.ceil(m / n)) for m in sizes)
    return owned, pad


class _CountFSDP:
    """Counts the bytes torch.distributed is asked to all-gather / reduce-scatter (FSDP2's own
    traffic; plait.comm keeps references of its own, so its calls are not counted). Logical array
    sizes."""

    # torch 2.13 names them all_gather_single / reduce_scatter_single, 2.11 *_into_tensor / *_tensor
    NAMES = (("all_gather_single", "all_gather"), ("all_gather_into_tensor", "all_gather"),
             ("reduce_scatter_single", "reduce_scatter"),
             ("reduce_scatter_tensor", "reduce_scatter"))

    def __enter__(self):
        import torch.distributed as dist

        self.seen = {"all_gather": 0, "reduce_scatter": 0}
        self.orig = {f: getattr(dist, f) for f, _ in self.NAMES if hasattr(dist, f)}
        for f, op in self.NAMES:
            if f in self.orig:
                setattr(dist, f, self._counting(self.orig[f], op))
        return self

    def _counting(self, fn, op):
        def call(*a, **k):
            # output first in both
            out, inp = [t for t in (*a, *k.values()) if torch.is_tensor(t)][:2]
            self.seen[op] += (out if op == "all_gather" else inp).numel() * inp.element_size()
            return fn(*a, **k)

        return call

    def __exit__(self, *exc):
        import torch.distributed as dist

        for f, fn in self.orig.items():
            setattr(dist, f, fn)


def _memory_worker():
    from plait.data_parallel.zero_memory import memory_breakdown, zero_formula
    from plait.mesh import Mesh

    mesh = Mesh.build(dp=2)
    n, r = 2, mesh.dp_index
    psi = sum(p.numel() for p in Odd().parameters())
    rows = {}
    for zero, micro in ((0, 1), (1, 1), (2, 1), (3, 1), (3, 2)):
        with _CountFSDP() as traffic:
            _, model, opt, by_op = _train_odd(mesh, zero, "adamw", steps=2, micro=micro)
        mem = memory_breakdown(model, opt)
        owned, pad = (psi, 0) if zero == 0 else _owned_and_padding(zero, n, r, model.module, opt)
        n_pieces = len(opt.optimizer.pieces) if zero else len(list(model.parameters()))
        rows[zero if micro == 1 else "3/2"] = {
            "mem": mem, "expect": zero_formula(zero, psi, n, pad, owned), "scalars": 4 * n_pieces,
            "owned": owned, "pad": pad, "by_op": by_op[-1], "fsdp_traffic": traffic.seen}
    return rows


def test_zero_memory_and_bytes_equal_formulas():
    """Per-rank bytes of parameters, gradients and Adam state, measured from the tensors held at the
    optimizer step, equal the fp32 ZeRO formulas with the padding counted; bytes per step too."""
    results = run_ranks(_memory_worker, 2, timeout=180)
    psi, n = 129, 2
    # ring all-gather / reduce-scatter bytes
    wire = lambda elems: (n - 1) / n * 4 * elems  # noqa: E731
    for rank, rows in enumerate(results):
        for zero, row in rows.items():
            if zero == "3/2":
                continue
            mem, exp = row["mem"], row["expect"]
            for key in ("parameters", "gradients", "optimizer_state"):
                assert mem[key] == exp[key], (f"rank {rank} ZeRO-{zero} {key}: {mem[key]} B, "
                                              f"formula {exp[key]} B")
            assert mem["optimizer_scalars"] == row["scalars"]
            assert mem["psi"] == psi and mem["padding"] == row["pad"]
            full = psi + row["pad"]
            if zero == 0:
                assert exp["parameters"] + exp["gradients"] + exp["optimizer_state"] == 16 * psi
                assert row["by_op"] == {"all_reduce/dp": 2 * wire(psi)}
            elif zero in (1, 2):
                assert row["by_op"] == {"reduce_scatter/dp": wire(full),
                                        "all_gather/dp": wire(full)}
            else:  # one micro-batch: gathered in forward and again in backward, reduced once: 3Ψ
                assert row["by_op"]["all_gather/dp"] == 2 * wire(full)
                assert row["by_op"]["reduce_scatter/dp"] == wire(full)
                # plait's records equal what FSDP2 really moved (two steps, logical array sizes)
                assert row["fsdp_traffic"] == {"all_gather": 2 * 2 * 4 * full,
                                               "reduce_scatter": 2 * 4 * full}
        # two micro-batches: gathered twice each, gradients reduce-scattered once
        # (no_sync on the first)
        acc = rows["3/2"]
        assert acc["by_op"]["all_gather/dp"] == 4 * wire(psi + acc["pad"])
        assert acc["by_op"]["reduce_scatter/dp"] == wire(psi + acc["pad"])
        assert acc["fsdp_traffic"] == {"all_gather": 2 * 4 * 4 * (psi + acc["pad"]),
                                       "reduce_scatter": 2 * 4 * (psi + acc["pad"])}
    for zero in (1, 2, 3):  # the optimizer state is split without overlap: Σ_r Ψ_r = Ψ
        assert sum(rows[zero]["owned"] for rows in results) == psi
        assert sum(rows[zero]["mem"]["optimizer_state"] for rows in results) == 8 * psi
    z2 = results[0][2]["mem"]
    # ZeRO-2 holds only the gradient shard
    assert z2["gradients"] == 4 * (psi + results[0][2]["pad"]) // n


# -- checkpoints: sharded <-> full-shape optimizer state -------------------------------------------
def _shard_state(z) -> dict:
    return {id(pc.leaf): {k: v.clone() for k, v in z.state[pc.leaf].items()} for pc in z.pieces}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def _state_worker():
    from plait.mesh import Mesh

    mesh = Mesh.build(dp=2)
    _, _, plain, _ = _train_odd(mesh, 0, "adamw", steps=2)
    ref = plain.optimizer.state_dict()
    out = {}
    for zero in (1, 2, 3):
        _, _, opt, _ = _train_odd(mesh, zero, "adamw", steps=2)
        z = opt.optimizer
        full = z.full_state_dict()
        shard, before = z.state_dict(), _shard_state(z)
        z.load_full_state_dict(full)  # keep the local slice of the full state: the same shard again
        again = _same_state(before, _shard_state(z))
        z.load_full_state_dict(ref)  # a plain (ZeRO-0) checkpoint of the same, bit-identical run
        from_plain = _same_state(before, _shard_state(z))
        z.inner.state.clear()
        z.load_state_dict(shard)
        out[zero] = (full, again and from_plain and _same_state(before, _shard_state(z)))
    return ref, out


def test_zero_state_dict_full_shape_round_trip():
    for ref, out in run_ranks(_state_worker, 2, timeout=180):
        for zero, (full, again) in out.items():
            assert again, f"ZeRO-{zero}: load_full_state_dict(full_state_dict()) changed the shard"
            assert [g["params"] for g in full["param_groups"]] == \
                   [g["params"] for g in ref["param_groups"]]
            assert [g["weight_decay"] for g in full["param_groups"]] == [0.1, 0.0]
            assert full["state"].keys() == ref["state"].keys()
            for i, st in ref["state"].items():
                assert float(full["state"][i]["step"]) == float(st["step"])
                for k in ("exp_avg", "exp_avg_sq"):
                    a, b = full["state"][i][k], st[k]
                    assert a.shape == b.shape and torch.equal(a, b), f"ZeRO-{zero} slot {i} {k}"


# -- combinations that are refused ---------------------------------------------------------------
def test_zero_config_errors():
    from plait.data_parallel.zero import check_zero

    mesh = SimpleNamespace(pp_size=2, dp_size=2)
    with pytest.raises(ConfigError, match="compression.name"):
        check_zero(ParallelConfig(zero=2), mesh, CompressionConfig(name="fp16"))
    with pytest.raises(ConfigError, match="parallel.schedule = zb_h1"):
        check_zero(ParallelConfig(zero=3, schedule="zb_h1"), mesh)
    with pytest.raises(ConfigError, match="onebit_adam"):
        check_zero(ParallelConfig(zero=1), mesh, None, SimpleNamespace(dp_exchange=object()))
    check_zero(ParallelConfig(zero=2, schedule="zb_h1"), mesh, CompressionConfig(name="none"))
    from plait.config import from_dict

    with pytest.raises(ConfigError, match="parallel.zero"):
        from_dict({"parallel": {"zero": 1}, "sync": {"strategy": "diloco"}})


# -- the run summary's per-rank breakdown ----------------------------------------------------------
def _summary_worker(cfg_dict):
    from plait.config import from_dict
    from plait.mesh import Mesh
    from plait.train import Trainer

    out = {}
    for zero in (0, 2, 3):
        d = {k: dict(v) for k, v in cfg_dict.items()}
        d["parallel"]["zero"] = zero
        cfg = from_dict(d)
        out[zero] = Trainer(cfg, Mesh.build(dp=2)).run(None)["memory"]
    return out


def test_summary_reports_memory_breakdown(corpus_path):
    cfg = tiny_cfg(corpus_path, parallel={"dp": 2}, train={"steps": 2})
    for res in run_ranks(_summary_worker, 2, args=(cfg,), timeout=180):
        psi = res[0]["psi"]
        assert (res[0]["parameters"] == res[0]["gradients"] == 4 * psi
                and res[0]["optimizer_state"] == 8 * psi)
        for zero, mem in res.items():
            assert mem["zero"] == zero and mem["dp"] == 2 and mem["psi"] == psi
            for key in ("parameters", "gradients"):
                assert mem[key] == mem["formula"][key], (zero, key, mem)
            # AdamW: two fp32 moments per owned element
            assert mem["optimizer_state"] == 8 * mem["owned"]
        assert res[2]["gradients"] == 4 * (psi + res[2]["padding"]) // 2
        assert res[3]["parameters"] == 4 * (psi + res[3]["padding"]) // 2
