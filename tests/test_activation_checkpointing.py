"""Activation checkpointing: the same training run with less saved memory,
and the extra collectives counted.

One 2-rank spawn trains each case for 3 steps: tp = 2 (with and without sequence parallelism),
pp = 2 under the zero-bubble schedule ZB-H1 (its split backward: the input-gradient pass recomputes
each block, the weight pass once more) and dp = 2 (the reducer's post-accumulate-grad hooks), each
with checkpointing off and on; on must equal off.
"""

import traceback

import pytest
import torch
import torch.nn as nn
from common import tiny_cfg

from plait.activation_checkpointing import apply_activation_checkpointing, count_saved_bytes
from plait.comm.accounting import wire_bytes
from plait.config import from_dict
from plait.errors import ConfigError
from plait.mesh import Mesh
from plait.models.gpt import GPT, build_config, lm_loss
from plait.testing import run_ranks

STEPS = 3
CASES = {  # name: (parallel section, modes)
    "tp2": ({"tp": 2}, ("none", "full", "selective")),
    "tp2-sp": ({"tp": 2, "sequence_parallel": True}, ("none", "full")),
    "pp2-zb": ({"pp": 2, "schedule": "zb_h1"}, ("none", "full", "selective")),
    "dp2": ({"dp": 2}, ("none", "full")),
}


def _train(cfg_dict):
    from plait.train import Trainer

    cfg = from_dict(cfg_dict)
    mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device="cpu")
    tr = Trainer(cfg, mesh)
    losses, by_op = [], []
    for _ in range(cfg.train.steps):
        mesh.comm.stats.reset_step()
        losses.append(float(tr.train_step()["loss"]))
        # by the formulas, as wire_bytes gives them here (no process group): gloo's framing aside
        by_op.append(mesh.comm.stats.reset_step()["formula_by_op"])
    return {"losses": losses, "by_op": by_op,
            "state": {k: v.cpu() for k, v in tr.full_state().items()}}


def _worker(cases):
    out = {}
    for name, cfg in cases:
        try:
            out[name] = _train(cfg)
        except Exception:  # noqa: BLE001 - reported by the test of this case
            out[name] = traceback.format_exc()
    return out


def _cfg(corpus, parallel, mode):
    return tiny_cfg(corpus, parallel=parallel,
                    train={"steps": STEPS, "activation_checkpointing": mode})


@pytest.fixture(scope="module")
def two_ranks(corpus_path):
    cases = [(f"{name}-{mode}", _cfg(corpus_path, par, mode))
             for name, (par, modes) in CASES.items() for mode in modes]
    return run_ranks(_worker, 2, args=(cases,), timeout=300)


def _get(results, name):
    for rank, r in enumerate(results):
        assert not isinstance(r[name], str), f"rank {rank} failed:\n{r[name]}"
    return [r[name] for r in results]


@pytest.mark.parametrize("case,mode",
                         [(n, m) for n, (_, modes) in CASES.items() for m in modes if m != "none"])
def test_checkpointing_changes_nothing(two_ranks, case, mode):
    for off, on in zip(_get(two_ranks, f"{case}-none"), _get(two_ranks, f"{case}-{mode}")):
        for a, b in zip(on["losses"], off["losses"]):
            assert abs(a - b) <= 1e-6 * abs(b), (f"losses {on['losses']} vs {off['losses']} "
                                                 "without recomputation")
        assert on["state"].keys() == off["state"].keys()
        for k, b in off["state"].items():
            assert torch.allclose(on["state"][k], b, rtol=1e-6, atol=0), k
        assert off["losses"][-1] < off["losses"][0]


def test_recomputed_tp_collectives_are_counted(two_ranks):
    # micro-batch (b, s, h) = (2, 32, 32) fp32, 4 micro-batches, 2 blocks, tp = 2. Recomputing a
    # block repeats the forward collectives up to its last saved tensor: without SP the attention
    # output's all-reduce (the MLP's final one feeds nothing saved), with SP the two region
    # all-gathers and the attention reduce-scatter.
    # Selective recomputation (the attention core) repeats none.
    nbytes, n = 2 * 32 * 32 * 4, 4 * 2
    key_ar, key_ag, key_rs = "all_reduce/tp", "all_gather/tp", "reduce_scatter/tp"
    for step in range(STEPS):
        off = _get(two_ranks, "tp2-none")[0]["by_op"][step]
        full = _get(two_ranks, "tp2-full")[0]["by_op"][step]
        sel = _get(two_ranks, "tp2-selective")[0]["by_op"][step]
        assert full[key_ar] - off[key_ar] == n * wire_bytes("all_reduce", nbytes, 2)
        assert sel == off
        off = _get(two_ranks, "tp2-sp-none")[0]["by_op"][step]
        full = _get(two_ranks, "tp2-sp-full")[0]["by_op"][step]
        assert full[key_ag] - off[key_ag] == 2 * n * wire_bytes("all_gather", nbytes, 2)
        assert full[key_rs] - off[key_rs] == n * wire_bytes("reduce_scatter", nbytes, 2)
        # the norm weights' gradient all-reduces are not recomputed
        assert full[key_ar] == off[key_ar]


# -- one process -----------------------------------------------------------------------------------
def _saved_bytes(mode, layers, B=2, T=64):
    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=64, n_layers=layers))
    assert apply_activation_checkpointing(model, mode) == \
           {"none": 0, "full": layers, "selective": layers}[mode]
    x = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    with count_saved_bytes(list(model.parameters())) as saved:
        loss = lm_loss(model(x), x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return saved[0], float(loss.detach()), grads


def test_saved_activation_memory_drops():
    B, T, D, H, E = 2, 64, 32, 4, 8  # the tiny preset: d_model 32, 4 heads of 8
    got = {m: {L: _saved_bytes(m, L, B, T) for L in (2, 4)} for m in ("none", "full", "selective")}
    per_block = {m: (got[m][4][0] - got[m][2][0]) / 2 for m in got}
    # full: a block keeps only its input (B, T, D) fp32
    assert per_block["full"] == B * T * D * 4
    # selective: at least the attention core's output (B, H, T, E) is no longer kept
    assert per_block["none"] - per_block["selective"] >= B * H * T * E * 4
    assert got["full"][4][0] < got["selective"][4][0] < got["none"][4][0]
    assert per_block["none"] > 10 * per_block["full"]
    for m in ("full", "selective"):  # and the gradients are the same
        assert got[m][4][1] == got["none"][4][1]
        for k, g in got["none"][4][2].items():
            assert torch.equal(got[m][4][2][k], g), k


def test_no_grad_forward_is_plain_and_wrapping_is_idempotent():
    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = model(x)
    assert apply_activation_checkpointing(model, "full") == 2
    assert apply_activation_checkpointing(model, "full") == 0
    with torch.no_grad(), count_saved_bytes() as saved:
        assert torch.equal(model(x), ref)
    assert saved[0] == 0


def test_bad_modes():
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), "full")
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        apply_activation_checkpointing(GPT(build_config("tiny", vocab_size=64)), "some")
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        from_dict({"train": {"activation_checkpointing": "ful"}})


def test_zero_bubble_split_backward_recomputes_each_block_once_per_pass():
    from torch.utils import checkpoint as ckpt

    from plait.pipeline.split_backward import backward_input, backward_weight

    def run(mode):
        torch.manual_seed(0)
        model = GPT(build_config("tiny", vocab_size=64, n_layers=2))
        calls = [0]
        # the attention's forward runs once per forward or recomputation of its block
        for b in model.blocks:
            b.attn.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
        apply_activation_checkpointing(model, mode)
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        h = x
        for b in model.blocks:  # a pipeline stage of two blocks: hidden state in, hidden state out
            h = b(h, model.rope_cos[:16], model.rope_sin[:16])
        counts = [calls[0]]
        work = backward_input(h, torch.ones_like(h), x)  # B: the input gradient
        counts.append(calls[0])
        # W: the weight gradients, many autograd calls
        backward_weight(work, list(model.blocks.parameters()))
        counts.append(calls[0])
        return counts, x.grad, {n: p.grad for n, p in model.blocks.named_parameters()}

    (c0, gx0, gw0), (c1, gx1, gw1) = run("none"), run("full")
    assert c0 == [2, 2, 2]
    assert c1[:2] == [2, 4]  # B recomputes each block once
    if hasattr(ckpt, "GraphExecGroup"):  # W's calls share one recomputation (torch >= 2.10)
        assert c1[2] == 6
    assert torch.equal(gx0, gx1) and all(torch.equal(gw0[k], gw1[k]) for k in gw0)
