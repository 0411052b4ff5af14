"""Mesh coordinates and groups; byte accounting of every collective against the ring formulas."""

import pytest
import torch

from plait.comm import wire_bytes
from plait.comm.accounting import formula_bytes
from plait.errors import ConfigError
from plait.mesh import Mesh, check_layout, rank_of
from plait.testing import RankFailure, run_ranks


def test_rank_order_tp_innermost_pp_outermost():
    dp, tp, pp = 2, 2, 2
    seen = {}
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                seen[rank_of(d, t, p, dp, tp)] = (d, t, p)
    assert sorted(seen) == list(range(8))
    assert seen[1] == (0, 1, 0) and seen[2] == (1, 0, 0) and seen[4] == (0, 0, 1)


def test_layout_mismatch_message():
    with pytest.raises(ConfigError, match="launch 8 processes"):
        check_layout(4, 2, 2, 2)


def _mesh_worker():
    mesh = Mesh.build(dp=2, tp=2, pp=2)
    out = {"rank": mesh.rank, "dp": mesh.dp.ranks, "tp": mesh.tp.ranks, "pp": mesh.pp.ranks,
           "mp": mesh.mp.ranks, "coords": (mesh.dp_index, mesh.tp_index, mesh.pp_index)}
    # each group really connects its members: the sum of global ranks over the group
    for name in ("dp", "tp", "pp", "mp"):
        g = getattr(mesh, name)
        t = torch.tensor([float(mesh.rank)])
        mesh.comm.all_reduce(t, g)
        out["sum_" + name] = float(t)
    return out


def test_mesh_groups_8_ranks():
    res = run_ranks(_mesh_worker, 8, timeout=180)
    for r in res:
        d, t, p = r["coords"]
        assert r["rank"] == rank_of(d, t, p, 2, 2)
        assert r["tp"] == tuple(rank_of(d, i, p, 2, 2) for i in range(2))
        assert r["dp"] == tuple(rank_of(i, t, p, 2, 2) for i in range(2))
        assert r["pp"] == tuple(rank_of(d, t, i, 2, 2) for i in range(2))
        for name in ("dp", "tp", "pp", "mp"):
            assert r["sum_" + name] == sum(r[name])


def _bytes_worker():
    mesh = Mesh.build(dp=4)
    c, g = mesh.comm, mesh.dp
    n = 4
    x = torch.ones(1000)  # 4000 bytes
    c.all_reduce(x, g)
    out = torch.empty(4 * 250)
    c.all_gather(out, torch.full((250,), float(mesh.rank)), g)
    rs = torch.empty(250)
    c.reduce_scatter(rs, torch.ones(1000), g)
    a2a = torch.empty(1000)
    c.all_to_all(a2a, torch.ones(1000), g)
    peer = (g.rank + 1) % n
    recv = torch.empty(100)
    c.p2p([(torch.ones(100), peer)], [(recv, (g.rank - 1) % n)], g).wait()
    h = c.all_reduce(torch.ones(10), g, op="avg", async_op=True)
    h.wait()
    step = c.stats.reset_step()
    return {"bytes": step["comm_bytes"], "by_op": step["by_op"], "gathered": out.tolist()[::250],
            "rs": float(rs[0]), "x": float(x[0]), "formula": step["formula_bytes"],
            "formula_by_op": step["formula_by_op"]}


def _staged_p2p_worker():
    # the host-staged path of gloo with CUDA tensors, forced on CPU tensors: receives land in host
    # buffers and reach the caller's tensors only through wait()
    from plait.comm import Comm

    Comm._host_staged = staticmethod(lambda group, tensors: True)
    mesh = Mesh.build(dp=2)
    g, peer = mesh.dp, 1 - mesh.dp.rank
    recv = torch.zeros(3)
    h = mesh.comm.p2p([(torch.full((3,), 10.0 + mesh.rank), peer)], [(recv, peer)], g,
                      async_op=True)
    before = recv.tolist()  # nothing written into the caller's tensor yet
    h.wait()
    return {"before": before, "after": recv.tolist(),
            "by_op": mesh.comm.stats.reset_step()["by_op"]}


def test_host_staged_p2p_delivers_on_wait():
    for rank, r in enumerate(run_ranks(_staged_p2p_worker, 2, timeout=60)):
        assert r["before"] == [0.0, 0.0, 0.0]
        assert r["after"] == [10.0 + (1 - rank)] * 3
        assert r["by_op"] == {"send/dp": 12.0 + 144}  # one message: its bytes, 144 B of framing


def test_comm_bytes_match_ring_formulas():
    res = run_ranks(_bytes_worker, 4, timeout=120)
    n = 4
    expect = {
        "all_reduce/dp": 2 * (n - 1) / n * 4000 + 2 * (n - 1) / n * 40,
        "all_gather/dp": (n - 1) / n * 4000,
        "reduce_scatter/dp": (n - 1) / n * 4000,
        "all_to_all/dp": (n - 1) / n * 4000,
        "send/dp": 400.0,
    }
    # on the wire (measured with loopback counters, scripts/wire_bytes.py): gloo's reduce-scatter
    # is an all-reduce of the whole input, and each message costs 144 B of framing; its ring
    # all-reduce sends 2(n-1)/n of 2n segments per rank, all-gather 2(n-1) messages, all-to-all n-1
    f = 144
    wire = {
        "all_reduce/dp": 2 * (n - 1) / n * 4040 + 2 * f * 2 * (n - 1) / n * 2 * n,
        "all_gather/dp": (n - 1) / n * 4000 + f * 2 * (n - 1),
        "reduce_scatter/dp": 2 * (n - 1) / n * 4000 + f * 2 * (n - 1) / n * 2 * n,
        "all_to_all/dp": (n - 1) / n * 4000 + f * (n - 1),
        "send/dp": 400.0 + f,
    }
    for r in res:
        assert r["formula_by_op"] == pytest.approx(expect)
        assert r["formula"] == pytest.approx(sum(expect.values()))
        assert r["by_op"] == pytest.approx(wire)
        assert r["bytes"] == pytest.approx(sum(wire.values()))
        assert r["gathered"] == [0.0, 1.0, 2.0, 3.0]
        assert r["rs"] == 4.0 and r["x"] == 4.0


def test_wire_bytes_single_member_sends_nothing():
    assert wire_bytes("all_reduce", 1000, 1) == 0.0
    assert wire_bytes("all_reduce", 1000, 2) == 1000.0


def test_wire_bytes_by_backend():
    # no process group here: "default" is the formula
    assert wire_bytes("reduce_scatter", 1000, 4) == 750.0
    assert formula_bytes("reduce_scatter", 1000, 4) == 750.0
    assert wire_bytes("reduce_scatter", 1000, 4, "nccl") == 750.0
    # gloo: an all-reduce of the whole input, 12 messages of 144 B framing (4(n-1) at n = 4)
    rs = wire_bytes("reduce_scatter", 1000, 4, "gloo")
    assert rs == 1500.0 + 12 * 144 and rs.formula == 750.0
    # 2 elements: 2 of the ring's 4 segments hold data, 2 messages
    assert wire_bytes("all_reduce", 8, 2, "gloo", count=2) == 8.0 + 2 * 144
    # the source records the group's total; the members that only receive, nothing
    assert wire_bytes("broadcast", 1000, 4, "gloo") == 3000.0 + 3 * 144
    assert wire_bytes("broadcast", 0, 4, "gloo", count=0) == 0.0


def _skip_collective_worker():
    from plait.comm import CommError

    mesh = Mesh.build(dp=2)
    t = torch.ones(4)
    mesh.comm.all_reduce(t, mesh.dp)
    if mesh.rank == 1:
        return "skipped"
    try:
        mesh.comm.all_reduce(t, mesh.dp)  # rank 1 never joins: must time out with a diagnosis
    except CommError as e:
        return str(e)
    return "no error"


def test_missing_peer_becomes_a_named_error():
    res = run_ranks(_skip_collective_worker, 2, timeout=60, pg_timeout=3)
    msg = res[0]
    assert "rank 0: all_reduce on group dp failed at step 0" in msg, msg
    assert "last collectives of rank 0" in msg and "all_reduce on dp" in msg


def _raise_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on one rank")
    return 1


def test_harness_reports_failing_rank_traceback():
    with pytest.raises(RankFailure, match="boom on one rank") as e:
        run_ranks(_raise_on_rank_1, 2, timeout=60)
    assert "---- rank 1 ----" in str(e.value)
