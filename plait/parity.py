"""The parity matrix: every dp × tp × pp (× ZeRO) layout against the single-process run.

docs/architecture.md, "Contracts": same seed, same global batch, fp32 → each step's loss, each
step's global gradient norm (before clipping) and, after the last step, every parameter gathered
back to full shape equal the single-process run's within 1e-5 relative. The layouts of one world
size run in one spawn of that many ranks (each case builds its own mesh and trainer), so the matrix
pays for process start and imports once per world size, not once per layout.

    ref = reference(cfg)                              # this process, plain PyTorch (no plait loop)
    got = run_layouts(cfg, matrix(zeros=(0, 1)))     # {layout name: result, or a traceback string}
    errors(ref, got["dp2-tp2-pp1-zero1"])            # {"loss": ..., "norm": ..., "param": ...}

`scripts/parity_matrix.py` runs the whole matrix and writes docs/parity_matrix.md;
tests/test_hybrid.py runs it (or a sample of its 8-rank layouts) as parameterized tests.
"""

from __future__ import annotations

import itertools
import math
import traceback
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from plait.config import Config, from_dict
from plait.data import load_corpus
from plait.mesh import Mesh
from plait.models import GPT
from plait.testing import RankFailure, run_ranks
from plait.train import Trainer, model_config


class Layout(NamedTuple):
    dp: int
    tp: int
    pp: int
    zero: int = 0

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        return f"dp{self.dp}-tp{self.tp}-pp{self.pp}-zero{self.zero}"


def matrix(dps=(1, 2), tps=(1, 2), pps=(1, 2), zeros=(0,)) -> list[Layout]:
    """Every combination except the single process itself. ZeRO shards over dp, and at dp = 1 it is
    the plain path (parallelize builds no ZeRO wrapper), so ZeRO > 0 appears with dp > 1 only."""
    out = []
    for dp, tp, pp, z in itertools.product(dps, tps, pps, zeros):
        if dp * tp * pp == 1 or (z and dp == 1):
            continue
        out.append(Layout(dp, tp, pp, z))
    return out


def layout_config(base: dict, layout: Layout, **train) -> dict:
    d = {k: dict(v) for k, v in base.items()}
    d["parallel"] = {**d.get("parallel", {}), "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
                     "zero": layout.zero}
    d["train"] = {**d.get("train", {}), **train}
    return d


def train_case(cfg_dict: dict, device: str = "cpu", steps: int | None = None) -> dict:
    """Train `cfg_dict` with plait on this process's world: per-step losses and gradient norms, full
    parameters, the validation loss."""
    cfg = from_dict(cfg_dict)
    mesh = Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, device=device,
                      replicas=cfg.parallel.replicas)
    tr = Trainer(cfg, mesh)
    losses, norms = [], []
    for _ in range(steps or cfg.train.steps):
        out = tr.train_step()
        losses.append(tr.loss_value(out))
        norms.append(None if out["grad_norm"] is None else float(out["grad_norm"]))
    state = {k: v.detach().cpu() for k, v in tr.full_state().items()}
    return {"losses": losses, "norms": norms, "state": state, "rank": mesh.rank,
            "dp_index": mesh.dp_index, "comm": mesh.comm.stats.total_bytes, "val": tr.evaluate()}


def single_process(base: dict, device: str = "cpu", steps: int | None = None) -> dict:
    """plait's own loop on one process: the reference for what plain_reference does not cover (a
    sync strategy, compression, LAMB, a batch ramp-up), which then needs a test of its own."""
    torch.set_num_threads(1)
    return train_case(layout_config(base, Layout(1, 1, 1, 0)), device, steps)


def run_cases(cases: list[tuple[str, dict]], device: str = "cpu") -> dict:
    """On every rank: each (name, config) in turn;
    {name: result, or the traceback of its failure}."""
    out = {}
    for name, cfg_dict in cases:
        try:
            out[name] = train_case(cfg_dict, device)
        except Exception:  # noqa: BLE001 - reported per case, the other cases still run
            out[name] = traceback.format_exc()
    return out


PLAIN = {"optim.name": ("adamw", "sgd"), "compression.name": ("none",),
         "sync.strategy": ("every_step", "delayed"), "train.dtype": ("fp32", "bf16"),
         "train.batch_rampup_samples": (0,), "optim.scale_lr_with_batch": (False,)}


def plain_reference(cfg: Config, device: str = "cpu", steps: int | None = None) -> dict:
    """The single-process run of `cfg` in plain PyTorch: plait's GPT class and its data order, but
    `torch.optim.AdamW` / `SGD`, `torch.nn.utils.clip_grad_norm_`, gradient accumulation and the
    learning-rate schedule written out here. No plait loop, parallelize, optimizer wrapper,
    clipping or schedule code, so a fault in those cannot hide in both sides of a comparison.

    Fine-tuning data (a loss mask) and data.document_masking are followed: each micro-batch's
    loss is summed over its trained targets and divided by the global batch's count of them,
    counted here; the model gets the documents' positions.

    sync.strategy = delayed (stale gradients, sync.delay = τ): step t's gradient is kept and the
    update of step t uses step t − τ's (the first τ steps do not update); the run's last step
    applies every kept gradient in order. Clipping is on the gradient applied.

    Returns per-step losses (the global batch's mean token loss) and gradient norms (before
    clipping, of the last gradient applied; None without clipping or without an update), every
    parameter after the last step, and the validation loss over the first train.val_samples
    validation sequences.
    """
    for key, ok in PLAIN.items():
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) not in ok:
            raise ValueError(f"plain_reference covers {key} in {ok}, not "
                             f"{getattr(getattr(cfg, sec), name)!r}: compare such runs with "
                             "single_process()")
    t, o = cfg.train, cfg.optim
    corpus = load_corpus(cfg.data, cfg.model.vocab_size)
    torch.manual_seed(t.seed)
    model = GPT(model_config(cfg.model, corpus.vocab_size, t.seq_len)).to(device)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    else:
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) \
        if t.dtype == "bf16" else nullcontext
    # with the data's loss mask (targets -100) and, under data.document_masking, positions
    masking = cfg.data.document_masking
    data = corpus.sampler("train", t.seq_len, t.seed, document_masking=masking)
    G, m, n = t.global_batch, t.micro_batch, steps or t.steps
    losses, norms = [], []
    delay = cfg.sync.delay if cfg.sync.strategy == "delayed" else 0
    kept: list[list[torch.Tensor | None]] = []  # gradients not applied yet (oldest first)
    for step in range(n):
        if o.warmup_steps and step < o.warmup_steps:  # linear warm-up, then the decay, by hand
            f = (step + 1) / o.warmup_steps
        elif o.schedule == "constant" or t.steps <= o.warmup_steps:
            f = 1.0
        else:
            prog = min(1.0, (step - o.warmup_steps) / max(1, t.steps - o.warmup_steps))
            shape = 0.5 * (1 + math.cos(math.pi * prog)) if o.schedule == "cosine" else 1 - prog
            f = o.min_lr_ratio + (1 - o.min_lr_ratio) * shape
        for g in opt.param_groups:
            g["lr"] = o.lr * f
        total = 0.0
        # the global batch: samples [step·G, (step + 1)·G), in micro-batches; the loss is the
        # sum over its trained targets (not -100) divided by their count in the whole batch
        mbs = [[v.to(device) for v in data.batch(step * G + k * m, m)] for k in range(G // m)]
        trained = sum(int((mb[1] != -100).sum()) for mb in mbs)
        for x, y, *extras in mbs:
            with autocast():
                logits = model(x, *extras)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                   ignore_index=-100) / trained
            loss.backward()
            total += float(loss.detach())
        kept.append([p.grad for p in params])
        opt.zero_grad(set_to_none=True)
        applied = kept[:1] if len(kept) > delay else []
        if step == t.steps - 1:  # the run's last step: everything still kept
            applied = list(kept)
        del kept[:len(applied)]
        norm = None
        for grads in applied:
            for p, g in zip(params, grads):
                p.grad = g
            if o.grad_clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
        norms.append(norm)
        losses.append(total)
    val = None
    if t.val_samples and len(corpus.val) > t.seq_len:
        vdata = corpus.sampler("val", t.seq_len, t.seed, document_masking=masking)
        s = c = 0.0
        with torch.no_grad():
            for lo in range(0, t.val_samples, m):
                x, y, *extras = (v.to(device) for v in vdata.batch(lo, min(m, t.val_samples - lo)))
                with autocast():
                    logits = model(x, *extras)
                s += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                           reduction="sum", ignore_index=-100))
                c += int((y != -100).sum())
        val = s / c
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "state": state, "val": val}


def reference(base: dict, device: str = "cpu", steps: int | None = None) -> dict:
    """The independent single-process reference of `base` (plain PyTorch, in this process)."""
    torch.set_num_threads(1)
    return plain_reference(from_dict(layout_config(base, Layout(1, 1, 1, 0))), device, steps)


def run_layouts(base: dict, layouts: list[Layout], timeout: float = 600.0,
                device: str = "cpu") -> dict:
    """Run `layouts` grouped by world size, one spawn per size;
    {name: [result per rank] or traceback}."""
    results: dict = {}
    for world in sorted({lay.world for lay in layouts}):
        cases = [(lay.name, layout_config(base, lay)) for lay in layouts if lay.world == world]
        try:
            per_rank = run_ranks(run_cases, world, args=(cases, device), timeout=timeout)
        except RankFailure as e:  # a hang or crash takes the whole spawn: every case of it failed
            results.update({name: str(e) for name, _ in cases})
            continue
        for name, _ in cases:
            failed = [r[name] for r in per_rank if isinstance(r[name], str)]
            results[name] = failed[0] if failed else [r[name] for r in per_rank]
    return results


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def worst(errors) -> float:
    """The largest error, NaN-aware: any NaN (a NaN loss, norm or parameter) is an infinite error
    (Python's max would skip it or not, depending on where it stands)."""
    errors = list(errors)
    if any(math.isnan(e) for e in errors):
        return math.inf
    return max(errors, default=0.0)


def errors(ref: dict, got: dict) -> dict:
    """Largest relative errors of one rank's result:
    per-step loss, per-step gradient norm, parameter."""
    if len(got["losses"]) != len(ref["losses"]):
        return {"loss": math.inf, "norm": math.inf, "param": math.inf}
    loss = worst(_rel(a, b) for a, b in zip(got["losses"], ref["losses"]))
    if [a is None for a in got["norms"]] != [b is None for b in ref["norms"]]:
        norm = math.inf  # one side clipped (measured a norm) and the other did not
    else:
        norm = worst(_rel(a, b) for a, b in zip(got["norms"], ref["norms"]) if b is not None)
    params = []
    for k, b in ref["state"].items():
        a = got["state"].get(k)
        if a is None or a.shape != b.shape:
            return {"loss": loss, "norm": norm, "param": math.inf, "bad_key": k}
        params.append(float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)))
    if set(got["state"]) != set(ref["state"]):
        params.append(math.inf)
    return {"loss": loss, "norm": norm, "param": worst(params)}
