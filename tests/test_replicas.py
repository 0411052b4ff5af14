"""Hierarchical layouts: parallel.replicas (docs/multinode.md, "Hierarchical layouts").

rank = ((replica · pp + pp_index) · dp + dp_index) · tp + tp_index. Dense dp, ZeRO, tp and pp stay
inside a replica; only the replica group (`rep`) crosses nodes and carries [compression] / [sync].

Every layout below trains the tiny model (2 blocks, fp32) and is compared with the plain-PyTorch
single-process reference (plait.parity.plain_reference) within 1e-5, with gradient clipping
active on every step, so a gradient summed over one replica only, or scaled by a wrong factor,
moves the losses and clipped norms far past the tolerance. All 4-rank cases share one spawn, the
2-rank cases another.
"""

import json
from pathlib import Path

import pytest
import torch
from common import DEVICE, TOL, tiny_cfg

from plait import parity
from plait.config import from_dict, validate, validate_layout
from plait.errors import ConfigError
from plait.mesh import Mesh, group_members, rank_of
from plait.testing import run_ranks
from plait.train import Trainer

CLIP = 0.05  # below every step's gradient norm: clipping is active on every step
STEPS = 5


def base(corpus_path: str, **parallel) -> dict:
    return tiny_cfg(corpus_path, model={"n_layers": 2}, optim={"grad_clip": CLIP},
                    train={"steps": STEPS}, parallel=parallel)


def _run_case(cfg_dict: dict) -> dict:
    """Train on this process's world; per step: loss, norm and the step's traffic by op/group."""
    cfg = from_dict(cfg_dict)
    p = cfg.parallel
    mesh = Mesh.build(p.dp, p.tp, p.pp, device=DEVICE, replicas=p.replicas)
    tr = Trainer(cfg, mesh)
    mesh.comm.stats.reset_step(0)
    losses, norms, traffic, states = [], [], [], []
    for _ in range(cfg.train.steps):
        out = tr.train_step()
        traffic.append(mesh.comm.stats.reset_step())
        losses.append(tr.loss_value(out))
        norms.append(None if out["grad_norm"] is None else float(out["grad_norm"]))
        if cfg.sync.strategy != "every_step":  # this rank's parameters after each step
            states.append(torch.cat([q.detach().reshape(-1).clone()
                                     for q in tr.model.module.parameters()]))
    numel = sum(q.numel() for q in tr.model.module.parameters() if q.requires_grad)
    state = {k: v.detach().cpu() for k, v in tr.full_state().items()}
    tr.close()
    return {"losses": losses, "norms": norms, "state": state, "traffic": traffic,
            "states": states, "numel": numel, "replica": mesh.replica_index,
            "dp_index": mesh.dp_index, "rep": mesh.rep.ranks, "dp": mesh.dp.ranks}


def _run_cases(cases: list) -> dict:
    return {name: _run_case(cfg) for name, cfg in cases}


def _cases4(corpus_path):
    return [
        ("dp4", base(corpus_path, dp=4)),
        ("r2-dp2", base(corpus_path, replicas=2, dp=2)),
        ("r2-tp2", base(corpus_path, replicas=2, dp=1, tp=2)),
        ("r2-pp2", base(corpus_path, replicas=2, dp=1, pp=2)),
        ("r2-dp2-zero1", base(corpus_path, replicas=2, dp=2, zero=1)),
        ("r2-dp2-fp16", {**base(corpus_path, replicas=2, dp=2),
                         "compression": {"name": "fp16"}}),
        ("r2-dp2-diloco", {**base(corpus_path, replicas=2, dp=2),
                           "sync": {"strategy": "diloco", "every": 3}}),
    ]


def _cases2(corpus_path):
    return [
        ("dp2-default", base(corpus_path, dp=2)),
        ("dp2-replicas1", base(corpus_path, dp=2, replicas=1)),
        ("r2-dp1", base(corpus_path, replicas=2, dp=1)),
        ("dp2-diloco", {**base(corpus_path, dp=2), "sync": {"strategy": "diloco", "every": 3}}),
    ]


@pytest.fixture(scope="module")
def runs4(corpus_path):
    return run_ranks(_run_cases, 4, args=(_cases4(corpus_path),), timeout=600)


@pytest.fixture(scope="module")
def runs2(corpus_path):
    return run_ranks(_run_cases, 2, args=(_cases2(corpus_path),), timeout=600)


@pytest.fixture(scope="module")
def ref(corpus_path):
    return parity.reference(base(corpus_path), DEVICE)


def _assert_parity(ref, per_rank, tol=TOL):
    assert all(n > CLIP for n in ref["norms"]), ref["norms"]
    assert ref["losses"][-1] < ref["losses"][0]
    for rank, res in enumerate(per_rank):
        e = parity.errors(ref, res)
        assert e["loss"] <= tol["loss"], (rank, res["losses"], ref["losses"])
        assert e["norm"] <= tol["norm"], (rank, res["norms"], ref["norms"])
        assert e["param"] <= tol["param"], (rank, e)


# -- (7) the rank order, as a pure function -----------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 2, 1, 1), (2, 1, 2, 1), (2, 1, 1, 2), (3, 2, 2, 2),
                                   (1, 2, 2, 2), (2, 2, 3, 1)])
def test_rank_order_matches_the_formula(shape):
    R, dp, tp, pp = shape
    seen = set()
    for i in range(R):
        for p in range(pp):
            for d in range(dp):
                for t in range(tp):
                    r = rank_of(d, t, p, dp, tp, i, pp)
                    assert r == ((i * pp + p) * dp + d) * tp + t
                    seen.add(r)
    assert seen == set(range(R * dp * tp * pp))
    g = group_members(R, dp, tp, pp)
    world = R * dp * tp * pp
    per_replica = dp * tp * pp
    for name in g:  # every dimension partitions the world
        assert sorted(r for grp in g[name] for r in grp) == list(range(world)), name
    for grp in g["dp"] + g["tp"] + g["pp"] + g["mp"]:  # inside one replica
        assert len({r // per_replica for r in grp}) == 1, grp
    for grp in g["rep"]:  # one rank per replica, at the same (pp, dp, tp) coordinates
        assert [r // per_replica for r in grp] == list(range(R))
        assert len({r % per_replica for r in grp}) == 1
    assert [len(x) for x in g["replica_world"]] == [per_replica] * R
    if R == 1:  # the plain mesh's rank formula and groups
        assert g["rep"] == [[r] for r in range(world)]
        assert all(rank_of(d, t, p, dp, tp) == (p * dp + d) * tp + t
                   for p in range(pp) for d in range(dp) for t in range(tp))


# -- (1) replicas = 1 changes nothing -----------------------------------------------------------
def test_replicas_1_is_bit_identical_to_the_plain_layout(runs2, ref):
    for rank in range(2):
        a, b = runs2[rank]["dp2-default"], runs2[rank]["dp2-replicas1"]
        assert a["losses"] == b["losses"] and a["norms"] == b["norms"]
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        assert b["rep"] == (rank,)  # a group of one: no process group, nothing sent
        assert all(t["inter_bytes"] == 0 for t in b["traffic"])
        assert all(not any(k.endswith("/rep") for k in t["by_op"]) for t in b["traffic"])
    _assert_parity(ref, [runs2[r]["dp2-replicas1"] for r in range(2)])


# -- (2), (3), (4) every-step layouts equal the reference ---------------------------------------
def test_two_replicas_of_dp2_equal_dp4_and_the_reference(runs4, ref):
    for rank in range(4):
        a, b = runs4[rank]["r2-dp2"], runs4[rank]["dp4"]
        for x, y in zip(a["losses"], b["losses"]):
            assert abs(x - y) / abs(y) <= 1e-5, (a["losses"], b["losses"])
        e = parity.errors(b, a)
        assert e["param"] <= 1e-5 and e["norm"] <= 1e-5, e
        assert a["rep"] == (rank % 2, rank % 2 + 2) and a["dp"] == (rank // 2 * 2,
                                                                     rank // 2 * 2 + 1)
    _assert_parity(ref, [runs4[r]["r2-dp2"] for r in range(4)])


@pytest.mark.parametrize("name", ["r2-tp2", "r2-pp2", "r2-dp2-zero1"])
def test_replicas_with_tp_pp_zero_inside_equal_the_reference(runs4, ref, name):
    _assert_parity(ref, [runs4[r][name] for r in range(4)])


def test_two_replicas_of_one_rank_equal_the_reference(runs2, ref):
    # dp = 1 inside: the reducer works on the replica group directly
    _assert_parity(ref, [runs2[r]["r2-dp1"] for r in range(2)])
    assert all(t["inter_bytes"] > 0 for t in runs2[0]["r2-dp1"]["traffic"])


# -- (5) the replica exchange carries the compressor, dp stays dense ------------------------------
def test_compressed_replica_exchange_bytes_by_formula(runs4, ref):
    for rank in range(4):
        res = runs4[rank]["r2-dp2-fp16"]
        plain = runs4[rank]["r2-dp2"]
        n = res["numel"]  # this rank's gradient elements (plain reducer: no padding)
        for t, tp_ in zip(res["traffic"], plain["traffic"]):
            f = t["formula_by_op"]
            # dp (2 ranks, fp32, dense): 2(2−1)/2 · 4n; rep (2 replicas, fp16): 2(2−1)/2 · 2n
            assert f["all_reduce/dp"] == pytest.approx(4.0 * n)
            assert f["all_reduce/rep"] == pytest.approx(2.0 * n)
            assert tp_["formula_by_op"]["all_reduce/rep"] == pytest.approx(4.0 * n)
            assert tp_["formula_by_op"]["all_reduce/dp"] == f["all_reduce/dp"]
            assert t["inter_formula_bytes"] == pytest.approx(2.0 * n)
            assert t["inter_bytes"] == pytest.approx(t["by_op"]["all_reduce/rep"])
            assert t["comm_bytes"] - t["inter_bytes"] >= t["by_op"]["all_reduce/dp"]
    # fp16 rounding of the replica sum: close to the reference, not exact
    _assert_parity(ref, [runs4[r]["r2-dp2-fp16"] for r in range(4)],
                   {"loss": 1e-3, "norm": 1e-2, "param": 1e-2})


# -- (6) DiLoCo across replicas, dense dp inside --------------------------------------------------
def test_diloco_across_replicas_syncs_only_every_h_steps(runs4, runs2):
    H = 3
    for rank in range(4):
        res = runs4[rank]["r2-dp2-diloco"]
        for step, t in enumerate(res["traffic"], start=1):
            assert t["by_op"].get("all_reduce/dp", 0) > 0, (step, t["by_op"])  # every step
            rep = sum(v for k, v in t["by_op"].items() if k.endswith("/rep"))
            if step % H and step != STEPS:  # the run's last step syncs too
                assert rep == 0 and t["inter_bytes"] == 0, (step, t["by_op"])
            else:  # the outer step: Δ averaged over the two replicas, fp32
                assert t["formula_by_op"]["all_reduce/rep"] == pytest.approx(4.0 * res["numel"])
    states = [[runs4[r]["r2-dp2-diloco"]["states"][s] for r in range(4)] for s in range(STEPS)]
    for s in range(STEPS):
        # the dp ranks of a replica (ranks 0, 1 and 2, 3) always agree; the replicas only right
        # after a sync
        assert torch.equal(states[s][0], states[s][1]) and torch.equal(states[s][2], states[s][3])
        same = torch.equal(states[s][0], states[s][2])
        assert same == ((s + 1) % H == 0 or s + 1 == STEPS), (s + 1, same)
    # each replica = one dp rank of the 2-rank DiLoCo run (same samples, same outer step)
    for rank in range(4):
        a = runs4[rank]["r2-dp2-diloco"]
        b = runs2[rank // 2]["dp2-diloco"]  # replica r = rank // 2 reads what dp rank r reads
        for x, y in zip(a["states"], b["states"]):
            assert float((x - y).norm() / y.norm()) <= 1e-5
        e = parity.errors(b, a)  # the norm: each replica's own (clipped) gradient, scaled by 2
        assert e["param"] <= 1e-5 and e["norm"] <= 1e-5, e


# -- (8) config errors ---------------------------------------------------------------------
def test_replicas_config_errors(corpus_path):
    with pytest.raises(ConfigError, match="parallel.replicas"):
        validate(from_dict(base(corpus_path, replicas=0)))
    # 8 sequences over 2 replicas × 2 dp × micro-batch 4
    cfg = from_dict({**base(corpus_path, replicas=2, dp=2),
                     "train": {**base(corpus_path)["train"], "micro_batch": 4}})
    with pytest.raises(ConfigError, match=r"parallel.replicas × dp × train.micro_batch"):
        validate_layout(cfg, 4)
    with pytest.raises(ConfigError, match=r"replicas=2 × dp=2"):
        validate_layout(from_dict(base(corpus_path, replicas=2, dp=2)), 6)
    assert validate_layout(from_dict(base(corpus_path, replicas=2)), 4) == 2  # dp = 0: the rest
    with pytest.raises(ConfigError, match="parallel.zero"):
        validate(from_dict({**base(corpus_path, replicas=2, zero=1),
                            "sync": {"strategy": "diloco"}}))
    with pytest.raises(ConfigError, match="onebit_adam"):
        validate(from_dict({**base(corpus_path, replicas=2),
                            "optim": {"name": "onebit_adam"}}))


# -- checkpoints reshard across parallel.replicas -----------------------------------------
def _ckpt_worker(saves: dict, targets: dict, root: str) -> dict:
    import torch.distributed as dist

    from plait.train import train

    out = {}
    for name, d in [*saves.items(), *targets.items()]:
        train(from_dict(d), f"{root}/{name}")
        dist.barrier()
        run = Path(root) / name
        out[name] = {"losses": [json.loads(x)["loss"] for x in
                                (run / "metrics.jsonl").read_text().splitlines() if x.strip()],
                     "summary": json.loads((run / "summary.json").read_text())}
    return out


@pytest.fixture(scope="module")
def resharded(corpus_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas_ckpt")

    def at(ck: str, **parallel):
        return {**base(corpus_path, **parallel), "checkpoint": {"dir": str(root / ck)}}

    def stop(d):
        return {**d, "train": {**d["train"], "exit_after_steps": 3}}

    saves = {"save_r2": stop(at("ck_r2", replicas=2, dp=2)),
             "save_dp4": stop(at("ck_dp4", dp=4))}
    targets = {"dp4_from_r2": at("ck_r2", dp=4), "r2tp2_from_r2": at("ck_r2", replicas=2, tp=2),
               "r2dp2_from_dp4": at("ck_dp4", replicas=2, dp=2)}
    return run_ranks(_ckpt_worker, 4, args=(saves, targets, str(root)), timeout=600)[0]


def test_checkpoints_reshard_between_replicas_and_dp(resharded, ref):
    for name in ("save_r2", "save_dp4"):
        assert len(resharded[name]["losses"]) == 3
    for name in ("dp4_from_r2", "r2tp2_from_r2", "r2dp2_from_dp4"):
        got = resharded[name]["losses"]
        assert len(got) == 2, (name, got)  # steps 4 and 5, after the checkpoint of step 3
        for a, b in zip(got, ref["losses"][3:]):
            assert abs(a - b) / abs(b) <= TOL["loss"], (name, got, ref["losses"])
    # summary.json: bytes per step within a replica (intra) and across replicas (inter)
    s_r2, s_dp4 = resharded["save_r2"]["summary"], resharded["save_dp4"]["summary"]
    assert s_r2["layout"]["replicas"] == 2 and s_dp4["layout"]["replicas"] == 1
    assert s_r2["comm_bytes_inter_per_step"] > 0 and s_dp4["comm_bytes_inter_per_step"] == 0
    for s in (s_r2, s_dp4):
        assert s["comm_bytes_intra_per_step"] + s["comm_bytes_inter_per_step"] == \
            pytest.approx(s["comm_bytes_per_step"])


# -- the replica exchange's order (no processes) ----------------------------------------------
class _Flight:
    """A fake in-flight collective whose completion the test decides."""

    def __init__(self, log: list, name: str):
        self.log, self.name, self.complete = log, name, False

    def is_completed(self) -> bool:
        return self.complete

    def wait(self) -> None:
        self.log.append(("wait", self.name))


def test_replica_exchanges_start_during_backward_in_bucket_order():
    """Bucket k's replica exchange starts at a later gradient hook once k's dp sum is complete
    (overlapping backward), never before an earlier bucket's; at the step every queued one starts
    before any exchange's later phase runs, whatever each rank saw complete: the order of the
    collectives on each group is the same on every rank."""
    from plait.compression.base import Compressor, Pending
    from plait.data_parallel.replicas import TwoLevelExchange

    log: list = []

    class Comm:
        flights: list = []

        def all_reduce(self, flat, group, async_op):
            f = _Flight(log, f"dp{len(self.flights)}")
            self.flights.append(f)
            log.append(("dp", len(self.flights) - 1))
            return f

    class Outer(Compressor):
        def exchange(self, key, flat, views):
            log.append(("rep start", key))
            return Pending(None, lambda: log.append(("rep later phase", key)))

    comm = Comm()
    two = TwoLevelExchange(Outer(), rep=None, comm=comm).bind(None, comm)
    t = torch.zeros(1)
    h0 = two.exchange(0, t, [t])
    comm.flights[0].complete = False
    h1 = two.exchange(1, t, [t])  # bucket 0 still in flight: nothing starts
    comm.flights[1].complete = True  # bucket 1 done before bucket 0: still waits for 0
    h2 = two.exchange(2, t, [t])
    assert [e for e in log if e[0] == "rep start"] == []
    comm.flights[0].complete = True
    h3 = two.exchange(3, t, [t])  # buckets 0 and 1 start now, during backward
    assert log[-5:] == [("wait", "dp0"), ("rep start", 0), ("wait", "dp1"), ("rep start", 1),
                        ("dp", 3)], log
    comm.flights[2].complete = True
    two.poll()  # what each gradient hook calls: bucket 2 starts before any bucket is issued
    assert log[-2:] == [("wait", "dp2"), ("rep start", 2)], log
    for h in (h0, h1, h2, h3):  # the optimizer step waits in bucket order
        h.wait()
    starts = [i for i, e in enumerate(log) if e[0] == "rep start"]
    later = [i for i, e in enumerate(log) if e[0] == "rep later phase"]
    assert [log[i][1] for i in starts] == [0, 1, 2, 3]
    assert max(starts) < min(later), log  # every start before any later phase
    assert [log[i][1] for i in later] == [0, 1, 2, 3]
