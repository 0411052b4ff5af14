"""Gradient compression: codecs, error feedback, exact byte formulas on 2 ranks, training runs.

Byte formulas (per rank per step, n ranks, ring factors as in plait.comm.accounting), computed
here independently of the compressors:
    none      2(n−1)/n · 4d              fp16/bf16  2(n−1)/n · 2d
    int8      2(n−1)/n · (d' + 4d'/512)  d' = d rounded up to 512n
    sign      2(n−1)/n · (d'/8 + 4n)     d' = d rounded up to 8n
    topk      (n−1)/n · n · 8 Σ_t k_t    k_t = max(1, ceil(f · numel_t))
    powersgd  2(n−1)/n · 4 (Σ r(m+n) over compressed matrices + uncompressed elements)
"""

import math

import pytest
import torch
import torch.nn as nn
from common import assert_parity, reference, tiny_cfg, train_run

from plait.comm import Comm, single
from plait.compression import (
    NAMES,
    Int8Compressor,
    NoCompression,
    PowerSGDCompressor,
    SignCompressor,
    TopKCompressor,
    codecs,
    make_compressor,
)
from plait.compression.powersgd import orthogonalize
from plait.config import from_dict, load
from plait.errors import ConfigError
from plait.testing import run_ranks

N = 2  # ranks of the multi-process tests


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _solo(comp):
    """A compressor bound to a one-member group:
    no communication, only the codec and its residual."""
    return comp.bind(single("dp"), Comm())


# -- codecs ------------------------------------------------------------------------------------
def test_bit_packing_round_trip_and_layout():
    bits = _rand(3, 64, seed=0) > 0
    packed = codecs.pack_bits(bits)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    assert torch.equal(codecs.unpack_bits(packed), bits)
    one = torch.zeros(1, 8, dtype=torch.bool)
    one[0, 0] = True  # the first element is the most significant bit
    assert codecs.pack_bits(one).item() == 128


def test_sign_round_trip_is_scaled_sign():
    x = _rand(4, 80, seed=1)
    payload = codecs.encode_sign(x)
    assert payload.shape == (4, codecs.sign_row_bytes(80)) == (4, 4 + 10)
    y = codecs.decode_sign(payload, 80)
    scale = x.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(y, torch.where(x >= 0, scale, -scale), rtol=0, atol=0)
    # the scale minimises the squared error among all multiples of sign(x)
    for a in (0.9, 1.1):
        assert (x - y).pow(2).sum() < (x - a * y).pow(2).sum()


def test_sign_chunked_scales_one_per_chunk():
    x = _rand(2, 512, seed=3) * torch.cat([torch.full((256,), 100.0), torch.full((256,), 0.01)])
    payload = codecs.encode_sign(x, 256)
    assert payload.shape == (2, codecs.sign_row_bytes(512, 256)) == (2, 8 + 64)
    y = codecs.decode_sign(payload, 512, 256)
    scale = x.view(2, 2, 256).abs().mean(-1, keepdim=True)  # each chunk its own mean |x|
    torch.testing.assert_close(y.view(2, 2, 256),
                               torch.where(x.view(2, 2, 256) >= 0, scale, -scale), rtol=0, atol=0)
    # the small chunk keeps its own magnitude instead of the row's mean (dominated by the large one)
    assert y[:, 256:].abs().max() < 0.1 < \
           codecs.decode_sign(codecs.encode_sign(x), 512)[:, 256:].abs().min()
    with pytest.raises(ValueError, match="chunk"):
        codecs.encode_sign(x, 96)


def test_residual_of_other_settings_is_a_clear_error():
    from plait.compression.quantized import SignCompressor

    c = SignCompressor(chunk=256)
    c.load_state_dict(
        {"name": "sign", "steps": 3, "errors": {"0": torch.zeros(1024)}, "server_errors": {}})
    with pytest.raises(ValueError,
                       match="residual has 1024 elements, this run's bucket needs 2048"):
        c.with_error(0, torch.ones(1500), 2048)


def test_int8_round_trip_error_bound():
    x = _rand(2, 1024, seed=2) * torch.linspace(0.01, 10, 1024)  # chunks of very different ranges
    payload = codecs.encode_int8(x, 512)
    assert payload.shape == (2, codecs.int8_row_bytes(1024, 512)) == (2, 1024 + 8)
    y = codecs.decode_int8(payload, 1024, 512)
    bound = x.view(2, 2, 512).abs().amax(-1, keepdim=True) / 127 / 2  # half a step of each chunk
    assert ((x - y).view(2, 2, 512).abs() <= bound * (1 + 1e-5)).all()
    zeros = codecs.decode_int8(codecs.encode_int8(torch.zeros(1, 512), 512), 512, 512)
    assert torch.equal(zeros, torch.zeros(1, 512))  # an all-zero chunk has scale 0, no NaN


def test_topk_picks_largest_per_tensor_and_sums_in_rank_order():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 7.0, 0.05])
    spans = [(0, 4), (4, 4)]
    counts = codecs.topk_counts([4, 4], 0.5)
    assert counts == [2, 2] and codecs.topk_counts([1000, 3], 0.01) == [10, 1]
    payload, picked = codecs.encode_topk(x, spans, counts)
    assert payload.dtype == torch.int32 and payload.numel() == 2 * 4
    assert sorted(picked.tolist()) == [1, 3, 5, 6]
    out = codecs.decode_topk_into(torch.full((8,), 9.0), torch.stack([payload, payload]))
    assert out.tolist() == [0, -10.0, 0, 6.0, 0, -0.6000000238418579, 14.0, 0]


@pytest.mark.parametrize("name,bound", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_cast_round_trip_error_bound(name, bound):
    comp = _solo(make_compressor(name))
    x = _rand(1000, seed=3)
    flat = x.clone()
    comp.exchange(0, flat, [flat]).wait()
    assert ((flat - x).abs() <= x.abs() * bound).all()
    assert not comp.errors  # unbiased: no residual kept


def test_linear_flags_and_linearity():
    linear = {n for n in NAMES if make_compressor(n).linear}
    assert linear == {"none", "fp16", "bf16", "powersgd"}
    a, b = _rand(1000, seed=4) * 1e-2, _rand(1000, seed=5) * 1e-2
    # casts: the sum of two payloads (what all-reduce computes) decodes to the sum
    for dt, tol in ((torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)):
        s = (a.to(dt) + b.to(dt)).float()
        assert ((s - (a + b)).abs() <= (a.abs() + b.abs()) * tol).all()
    # PowerSGD: P = MQ and Q = MᵀP are linear in M for the shared Q and shared orthogonal P
    ma, mb = _rand(12, 9, seed=6), _rand(12, 9, seed=7)
    q = _rand(9, 3, seed=8)
    torch.testing.assert_close(ma @ q + mb @ q, (ma + mb) @ q)
    p = orthogonalize((ma + mb) @ q)
    torch.testing.assert_close(p @ (ma.t() @ p).t() + p @ (mb.t() @ p).t(),
                               p @ ((ma + mb).t() @ p).t())
    # int8: payloads with per-rank scales do not add up (why it is exchanged in two phases)
    ea, eb = (codecs.encode_int8(a.view(1, -1)[:, :512], 512),
              codecs.encode_int8(3 * b.view(1, -1)[:, :512], 512))
    qa = ea[:, 4:].view(torch.int8).int()
    qb = eb[:, 4:].view(torch.int8).int()
    scale_a = ea[:, :4].reshape(-1).clone().view(torch.float32)
    wrong = (qa + qb).float() * scale_a
    assert (wrong - (a[:512] + 3 * b[:512])).abs().max() > 1e-3


def test_powersgd_orthogonalize_and_exact_on_low_rank():
    p = orthogonalize(_rand(50, 4, seed=9))
    torch.testing.assert_close(p.t() @ p, torch.eye(4), atol=1e-5, rtol=0)
    comp = _solo(PowerSGDCompressor(rank=2))
    low = _rand(30, 2, seed=10) @ _rand(2, 20, seed=11)  # rank 2
    bias = _rand(20, seed=12)
    flat = torch.cat([low.reshape(-1), bias])
    views = [flat[:600].view(30, 20), flat[600:]]
    comp.exchange(0, flat, views).wait()
    torch.testing.assert_close(views[0], low, atol=1e-4, rtol=1e-4)  # in the span of one power step
    assert torch.equal(views[1], bias)  # 1-D: sent uncompressed
    assert comp.errors["0"][:600].abs().max() < 1e-4 and comp.errors["0"][600:].abs().max() == 0


# -- error feedback ----------------------------------------------------------------------------
def test_error_feedback_keeps_the_exact_residual():
    comp = _solo(TopKCompressor(0.1))
    g1, g2 = _rand(100, seed=13), _rand(100, seed=14)
    flat = g1.clone()
    comp.exchange(0, flat, [flat]).wait()
    assert int((flat != 0).sum()) == 10
    assert torch.equal(flat + comp.errors["0"], g1)  # sent + kept = input, bit for bit
    e1 = comp.errors["0"].clone()
    flat = g2.clone()
    comp.exchange(0, flat, [flat]).wait()
    # the residual is added to the next gradient
    assert torch.equal(flat + comp.errors["0"], g2 + e1)
    # everything sent over both steps plus what is still kept equals everything that came in
    for comp in (_solo(SignCompressor()), _solo(Int8Compressor()),
                 _solo(PowerSGDCompressor(rank=1))):
        sent = torch.zeros(2048)
        total = torch.zeros(2048)
        for s in range(4):
            g = _rand(2048, seed=20 + s)
            flat = g.clone()
            comp.exchange(0, flat, [flat.view(64, 32)]).wait()
            sent += flat
            total += g
        kept = (comp.errors["0"][:2048]
                + sum(e[:2048] for e in getattr(comp, "server_errors", {}).values()))
        torch.testing.assert_close(sent + kept, total, atol=1e-5, rtol=1e-5)


def test_error_feedback_off_keeps_nothing():
    for comp in (TopKCompressor(0.1, error_feedback=False), SignCompressor(False),
                 Int8Compressor(False), PowerSGDCompressor(1, error_feedback=False)):
        comp = _solo(comp)
        g = _rand(1024, seed=30)
        outs = []
        for _ in range(2):
            flat = g.clone()
            comp.exchange(0, flat, [flat.view(32, 32)]).wait()
            outs.append(flat)
        assert not comp.errors and not getattr(comp, "server_errors", {})
        # (its warm-started Q is memory of another kind)
        if not isinstance(comp, PowerSGDCompressor):
            # no residual: the same input gives the same output
            assert torch.equal(outs[0], outs[1])


def test_state_dict_round_trip_resumes_exactly():
    for make in (lambda: TopKCompressor(0.05), lambda: SignCompressor(),
                 lambda: PowerSGDCompressor(2)):
        a, b = _solo(make()), _solo(make())
        for s in range(2):
            flat = _rand(512, seed=40 + s)
            a.exchange(0, flat, [flat.view(16, 32)]).wait()
            a.end_step()
        b.load_state_dict(a.state_dict())
        fa, fb = _rand(512, seed=50), _rand(512, seed=50)
        a.exchange(0, fa, [fa.view(16, 32)]).wait()
        b.exchange(0, fb, [fb.view(16, 32)]).wait()
        assert torch.equal(fa, fb) and b.steps == a.steps
    with pytest.raises(ValueError, match="compression.name"):
        TopKCompressor().load_state_dict(SignCompressor().state_dict())


# -- config ------------------------------------------------------------------------------------
def test_config_section_and_errors():
    cfg = load(None, ["compression.name=powersgd", "compression.rank=2",
                      "compression.error_feedback=false"])
    assert (cfg.compression.name, cfg.compression.rank, cfg.compression.error_feedback) == \
           ("powersgd", 2, False)
    with pytest.raises(ConfigError, match="compression.name"):
        load(None, ["compression.name=zip"])
    with pytest.raises(ConfigError, match="compression.topk_fraction"):
        load(None, ["compression.topk_fraction=0"])
    with pytest.raises(ConfigError, match="compression.rank"):
        load(None, ["compression.rank=0"])
    with pytest.raises(ConfigError, match="compression.name=none"):
        load(None, ["optim.name=onebit_adam", "compression.name=sign"])
    with pytest.raises(ConfigError, match="compression.warmup_steps"):
        load(None, ["optim.name=onebit_adam", "compression.warmup_steps=0"])


# -- 2 ranks: bytes, sums, bit-identity -----------------------------------------------------------
class _Net(nn.Module):
    """Matrices PowerSGD compresses, one it does not (4×3 at rank 2), a 3-D tensor, 1-D tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)
        self.small = nn.Parameter(torch.randn(4, 3))
        self.cube = nn.Parameter(torch.randn(6, 4, 5))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h).sum() + (self.small.sum() + self.cube.pow(2).sum()) * h.mean()


def _reducer_run(mesh, comp, steps: int, seed: int = 0, optimizer=None):
    from plait.data_parallel import GradReducer

    torch.manual_seed(seed)
    model = _Net()
    red = GradReducer(list(model.parameters()), mesh.dp, mesh.comm, bucket_bytes=1600,
                      first_bucket_bytes=800, compressor=comp)
    opt = optimizer(model) if optimizer else torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _rand(5, 16, seed=100 + mesh.rank)
    mesh.comm.stats.reset_step()  # count from here
    step_bytes = []
    for _ in range(steps):
        red.zero_grad()
        model(x).pow(2).backward()
        red.finish()
        opt.step()
        # the payload formulas: comm_bytes adds gloo's framing (144 B a message, plait.comm)
        step_bytes.append(mesh.comm.stats.reset_step()["formula_bytes"])
    layout = [[tuple(p.shape) for p in b.params] for b in red.buckets]
    return {"bytes": step_bytes, "layout": layout,
            "params": [p.detach().clone() for p in model.parameters()]}


def _sum_check(mesh, comp) -> dict:
    """One exchange of a rank-specific bucket: inputs, output and residuals,
    to check Σ in = out + Σ kept."""
    comp.bind(mesh.dp, mesh.comm)
    x = _rand(700, seed=200 + mesh.rank)
    flat = x.clone()
    comp.exchange(0, flat, [flat[:600].view(20, 30), flat[600:]]).wait()
    kept = comp.errors.get("0", torch.zeros(0))
    server = getattr(comp, "server_errors", {}).get("0", torch.zeros(0))
    return {"in": x, "out": flat, "kept": kept, "server": server}


def _two_rank_worker() -> dict:
    from plait.compression import OneBitExchange
    from plait.mesh import Mesh
    from plait.optim.onebit_adam import OneBitAdam

    mesh = Mesh.build(dp=N)
    out = {"bytes": {}, "sums": {}}
    for name in NAMES:
        comp = make_compressor(name, rank=2, topk_fraction=0.1, warmup_steps=0)
        out["bytes"][name] = _reducer_run(mesh, comp, steps=2)
    out["warm"] = _reducer_run(mesh, PowerSGDCompressor(rank=2, warmup_steps=1), steps=2)
    out["plain"] = _reducer_run(mesh, None, steps=3)
    out["none"] = _reducer_run(mesh, NoCompression(), steps=3)
    for name in ("int8", "sign", "topk", "powersgd"):
        out["sums"][name] = _sum_check(mesh, make_compressor(name, rank=2, topk_fraction=0.1))
    ex = OneBitExchange(warmup_steps=1)
    out["onebit"] = _reducer_run(mesh, ex, steps=2,
                                 optimizer=lambda m: OneBitAdam(m.parameters(), lr=1e-2,
                                                                exchange=ex))
    out["onebit_state"] = ex.state_dict()
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_two_rank_worker, N, timeout=180)


def _ring(nbytes: float) -> float:
    return 2 * (N - 1) / N * nbytes


def _expected_bytes(name: str, layout: list[list[tuple]]) -> float:
    total = 0.0
    for shapes in layout:
        numels = [math.prod(s) for s in shapes]
        d = sum(numels)
        if name == "none":
            total += _ring(4 * d)
        elif name in ("fp16", "bf16"):
            total += _ring(2 * d)
        elif name == "int8":
            dp = math.ceil(d / (512 * N)) * 512 * N
            total += _ring(dp + 4 * dp // 512)
        elif name == "sign":  # compression.sign_chunk = 256: one fp32 scale per 256 elements
            dp = math.ceil(d / (256 * N)) * 256 * N
            total += _ring(dp / 8 + 4 * dp / 256)
        elif name == "topk":
            k = sum(max(1, math.ceil(0.1 * n)) for n in numels)
            total += (N - 1) / N * N * 8 * k
        elif name == "powersgd":
            elems = 0
            for s, n in zip(shapes, numels):
                m, c = (s[0], n // s[0]) if len(s) >= 2 else (n, 1)
                r = min(2, m, c)
                elems += r * (m + c) if len(s) >= 2 and r * (m + c) < m * c else n
            total += _ring(4 * elems)
    return total


@pytest.mark.parametrize("name", NAMES)
def test_bytes_equal_formula(two_ranks, name):
    res = two_ranks[0]["bytes"][name]
    assert len(res["layout"]) > 1  # several buckets: the formula is summed per bucket
    expected = _expected_bytes(name, res["layout"])
    assert res["bytes"] == [pytest.approx(expected, rel=1e-12)] * 2
    assert two_ranks[1]["bytes"][name]["bytes"] == res["bytes"]
    # every rank ends with the same parameters: the exchanged sum is identical everywhere
    for a, b in zip(two_ranks[0]["bytes"][name]["params"], two_ranks[1]["bytes"][name]["params"]):
        assert torch.equal(a, b)
    # (int8 pads each bucket to 512·n elements: more than these tiny buckets)
    if name not in ("none", "int8"):
        assert expected < _expected_bytes("none", res["layout"])


def test_powersgd_bytes_during_warmup_are_dense(two_ranks):
    res = two_ranks[0]["warm"]
    assert res["bytes"][0] == pytest.approx(_expected_bytes("none", res["layout"]))
    assert res["bytes"][1] == pytest.approx(_expected_bytes("powersgd", res["layout"]))


def test_none_is_bit_identical_to_plain_reducer(two_ranks):
    for r in two_ranks:
        assert r["none"]["bytes"] == r["plain"]["bytes"]
        for a, b in zip(r["none"]["params"], r["plain"]["params"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["int8", "sign", "topk", "powersgd"])
def test_exchanged_sum_plus_residuals_equals_input_sum(two_ranks, name):
    a, b = two_ranks[0]["sums"][name], two_ranks[1]["sums"][name]
    assert torch.equal(a["out"], b["out"])
    kept = a["kept"][:700] + b["kept"][:700]
    server = (torch.cat([a["server"], b["server"]])[:700] if a["server"].numel()
              else torch.zeros(700))
    torch.testing.assert_close(a["out"] + kept + server, a["in"] + b["in"], atol=1e-5, rtol=1e-5)
    assert (a["out"] - (a["in"] + b["in"])).abs().max() > 1e-3  # it did compress


def test_onebit_adam_bytes_dense_then_compressed(two_ranks):
    res = two_ranks[0]["onebit"]
    d = sum(math.prod(s) for shapes in res["layout"] for s in shapes)
    # warm-up: dense gradients
    assert res["bytes"][0] == pytest.approx(_expected_bytes("none", res["layout"]))
    dp = math.ceil(d / (8 * N)) * 8 * N
    assert res["bytes"][1] == pytest.approx(_ring(dp / 8 + 4 * N))  # then only the 1-bit momentum
    st = two_ranks[0]["onebit_state"]
    assert st["steps"] == 2 and st["momentum"]["errors"]["momentum"].numel() == dp
    for a, b in zip(two_ranks[0]["onebit"]["params"], two_ranks[1]["onebit"]["params"]):
        assert torch.equal(a, b)


# -- training runs ---------------------------------------------------------------------------------
def _train_worker(cfg: dict, runs: dict) -> dict:
    """Several short trainings on the same 2 ranks (one spawn):
    name -> losses, val, bytes, snapshots."""
    from plait.mesh import Mesh
    from plait.train import Trainer

    out = {}
    for tag, over in runs.items():
        d = {k: dict(v) for k, v in cfg.items()}
        for sec, body in over.items():
            d.setdefault(sec, {}).update(body)
        c = from_dict(d)
        tr = Trainer(c, Mesh.build(dp=N, device="cpu"))
        losses, bytes_, snaps = [], [], []
        for _ in range(c.train.steps):
            losses.append(float(tr.train_step()["loss"]))
            bytes_.append(tr.mesh.comm.stats.reset_step()["comm_bytes"])
            if len(losses) == 3:
                snaps.append(tr.full_state())
        out[tag] = {"losses": losses, "bytes": bytes_, "val": tr.evaluate(),
                    "snap": snaps[0] if snaps else None}
    return out


def test_each_compressor_trains_on_two_ranks(corpus_path):
    steps = 12
    cfg = tiny_cfg(corpus_path, parallel={"dp": N}, train={"steps": steps, "micro_batch": 2},
                   optim={"warmup_steps": 2})
    runs = {
        name: {"compression": {"name": name, "rank": 2, "topk_fraction": 0.05, "warmup_steps": 3}}
        for name in NAMES}
    runs["sign_no_ef"] = {"compression": {"name": "sign", "error_feedback": False}}
    runs["onebit_adam"] = {"optim": {"name": "onebit_adam"}, "compression": {"warmup_steps": 4}}
    runs["onebit_warmup_only"] = {"optim": {"name": "onebit_adam"},
                                  "compression": {"warmup_steps": steps}}
    runs["adamw"] = {}
    got = run_ranks(_train_worker, N, args=(cfg, runs), timeout=240)
    r0 = got[0]
    for tag, res in r0.items():
        assert res["losses"] == got[1][tag]["losses"], tag
        assert res["losses"][-1] < 0.85 * res["losses"][0], f"{tag}: {res['losses']}"
    # compressors cut the traffic after powersgd's warm-up (3 dense steps)
    dense = r0["none"]["bytes"][-1]
    for name in ("fp16", "bf16", "int8", "topk", "sign", "powersgd"):
        assert r0[name]["bytes"][-1] < 0.6 * dense, name
    # powersgd during warm-up is plain dp, bit for bit: the same losses and parameters after 3 steps
    assert r0["powersgd"]["losses"][:4] == r0["none"]["losses"][:4]
    for k, v in r0["none"]["snap"].items():
        assert torch.equal(r0["powersgd"]["snap"][k], v), k
    assert r0["powersgd"]["losses"][4:] != r0["none"]["losses"][4:]
    assert r0["powersgd"]["bytes"][:3] == r0["none"]["bytes"][:3]
    # 1-bit Adam's warm-up is AdamW
    for a, b in zip(r0["onebit_warmup_only"]["losses"], r0["adamw"]["losses"]):
        assert abs(a - b) <= 1e-6 * abs(b)
    assert r0["onebit_adam"]["bytes"][-1] < 0.1 * r0["adamw"]["bytes"][-1]


def test_compression_none_keeps_dp_parity(corpus_path):
    cfg = tiny_cfg(corpus_path, parallel={"dp": N}, compression={"name": "none"})
    ref = reference(cfg)
    for g in run_ranks(train_run, N, args=(cfg,), timeout=120):
        assert_parity(ref, g)


# -- the slow-network benchmark's refusals ---------------------------------------------------------
def test_bench_compression_refuses_clearly_without_root(monkeypatch, capsys):
    from plait.bench import compression as bench
    from plait.bench import run_bench

    monkeypatch.delenv("PLAIT_BENCH_NETNS", raising=False)
    monkeypatch.setattr(bench.os, "geteuid", lambda: 1000)
    assert run_bench("compression", ["--bandwidth", "100mbit", "--reps", "1"]) == 2
    assert "needs root" in capsys.readouterr().err
    assert run_bench("compression", ["--bandwidth", "fast"]) == 2
    assert "100mbit" in capsys.readouterr().err
