"""Weights in and out of plait for transformers models (model.hf): loading a directory's weights
into any layout, checkpoints of tp runs that resume and reshard, export back to a transformers
directory.

The references use no plait code: weights are written by transformers' own `save_pretrained`
(one file, and sharded), the expected tp slices are cut here from the transformers model's
tensors by a table of how each family splits, the loss is the transformers model's own forward
(`from_pretrained`), and an export is checked by `AutoModelForCausalLM.from_pretrained(OUT)`.

One 2-rank spawn runs the distributed cases in turn (loads at tp 2 / pp 2, the runs that save,
resume and are exported), one 4-rank spawn the dp 2 × tp 2 resumes; the tp = 1 resumes and the
exports run in this process afterwards (~30 s in all).
"""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from common import TOL
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from plait.checkpoint import CheckpointError
from plait.config import from_dict
from plait.data import load_corpus
from plait.errors import ConfigError
from plait.models.hf import build_causal_lm, build_for_training, load_causal_lm, tiny_config
from plait.testing import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB = 257  # odd: tp pads the vocabulary
STEPS = 5
SAVED = 3  # the step the resumed runs start from
PROBE = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
# directory: (family, config overrides, save_pretrained's max_shard_size; None: one file)
DIRS = {"llama": ("llama", {}, None), "llama_sharded": ("llama", {}, "20KB"),
        "gpt2": ("gpt2", {}, None), "gpt2_sharded": ("gpt2", {}, "20KB"),
        "gpt2_untied": ("gpt2", {"tie_word_embeddings": False}, None),
        "phi3": ("phi3", {}, None), "gemma": ("gemma", {}, None),
        # one key/value head: at tp 2 both ranks hold it (replicated inside the packed qkv_proj)
        "phi3_kv1": ("phi3", {"num_key_value_heads": 1}, None)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Weights written by transformers itself; gpt2 has tokenizer files besides."""
    root = tmp_path_factory.mktemp("hf_weights")
    out = {}
    for name, (family, over, shard_size) in DIRS.items():
        torch.manual_seed(7)  # not train.seed: loaded weights must not be a random init's
        lm = build_causal_lm(tiny_config(family, vocab_size=VOCAB, **over))
        kw = {"max_shard_size": shard_size} if shard_size else {}
        lm.save_pretrained(root / name, safe_serialization=True, **kw)
        out[name] = str(root / name)
    _write_tokenizer(Path(out["gpt2"]))
    return out


def _write_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)


def base_cfg(corpus_path: str, model_dir: str, steps: int = STEPS, checkpoint=None,
             train=None, **parallel) -> dict:
    return {
        "model": {"hf": model_dir},
        "data": {"path": corpus_path, "cache_dir": corpus_path + ".cache"},
        "train": {"steps": steps, "global_batch": 8, "micro_batch": 2, "seq_len": 32,
                  "val_every": 0, "val_samples": 0, "threads": 1, **(train or {})},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "grad_clip": 0.05,
                  "eps": 1e-6},
        "log": {"progress": False, "plots": False},
        "checkpoint": checkpoint or {},
        "parallel": parallel,
    }


# -- what each rank holds, cut here from the transformers tensors (no plait code) -----------------
def _split_of(family: str, key: str) -> tuple[int, object] | None:
    """(dim, how) of a weight split over tp: how = 1 (one contiguous split), "vocab" (rows
    padded to a multiple of tp), or the packed blocks' sizes; None: whole on every rank."""
    if key.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
        return 0, "vocab"
    if family == "gpt2":  # Conv1D: weights (in, out)
        if "c_attn" in key:
            return (1 if key.endswith("weight") else 0), 3
        if key.endswith("mlp.c_fc.weight"):
            return 1, 1
        if key.endswith("mlp.c_fc.bias"):
            return 0, 1
        if key.endswith("c_proj.weight"):
            return 0, 1
        return None
    if family == "phi3":
        if "qkv_proj" in key:
            return 0, (64, 32, 32)
        if "gate_up_proj" in key:
            return 0, 2
    if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                     "up_proj.weight")):
        return 0, 1
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return 1, 1
    return None


def expected_slice(family: str, key: str, full: torch.Tensor, rank: int, tp: int):
    """(tensor tp rank `rank` holds, bytes of real data in it)."""
    split = _split_of(family, key)
    if split is None or tp == 1:
        return full, full.numel() * full.element_size()
    dim, how = split
    if how == "vocab":
        padded = -(-full.shape[0] // tp) * tp
        rows = padded // tp
        t = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
        real = max(0, min(rows, full.shape[0] - rank * rows))
        return t.chunk(tp, 0)[rank], real * full[0].numel() * full.element_size()
    if how == 1:
        t = full.chunk(tp, dim)[rank]
    else:
        sizes = how if isinstance(how, tuple) else (full.shape[dim] // how,) * how
        t = torch.cat([b.chunk(tp, dim)[rank] for b in full.split(sizes, dim)], dim)
    return t, t.numel() * t.element_size()


def step_batches(cfg_dict: dict, steps: int = 1) -> list:
    cfg = from_dict(cfg_dict)
    t = cfg.train
    data = load_corpus(cfg.data, 0).sampler("train", t.seq_len, t.seed)
    m = t.micro_batch
    return [[data.batch(s * t.global_batch + k * m, m)[:2] for k in range(t.global_batch // m)]
            for s in range(steps)]


def transformers_step(model_dir: str, mbs) -> tuple[float, float]:
    """The first step's loss and gradient norm of the model transformers loads from `model_dir`:
    Σ token losses over the global batch / its token count, and its gradient's 2-norm."""
    lm = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                              dtype=torch.float32)
    tokens = sum(y.numel() for _, y in mbs)
    total = 0.0
    for x, y in mbs:
        loss = F.cross_entropy(lm(input_ids=x).logits.flatten(0, 1), y.flatten(),
                               reduction="sum") / tokens
        loss.backward()
        total += float(loss.detach())
    return total, float(torch.nn.utils.get_total_norm([p.grad for p in lm.parameters()]))


# -- the 2-rank spawn -----------------------------------------------------------------------------
def _guarded(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported per case, the other cases still run
        return traceback.format_exc()


def _load_case(cfg_dict):
    """Build the Trainer (counting the bytes each rank reads from the files), then one step."""
    from plait.checkpoint.slices import SafetensorsFiles
    from plait.mesh import Mesh
    from plait.train import Trainer

    read = SafetensorsFiles.read
    count = [0]

    def counting(self, key, index):
        t = read(self, key, index)
        count[0] += t.numel() * t.element_size()
        return t

    cfg = from_dict(cfg_dict)
    SafetensorsFiles.read = counting
    try:
        tr = Trainer(cfg, Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp))
    finally:
        SafetensorsFiles.read = read
    params = {n.removeprefix("lm."): p.detach().clone()
              for n, p in tr.model.module.named_parameters()}
    out = tr.train_step()
    return {"params": params, "bytes": count[0], "loss": tr.loss_value(out),
            "norm": float(out["grad_norm"]), "tp_index": tr.mesh.tp_index}


def _losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if x.strip()]


def _saving_run(cfg_dict, run_dir):
    """Train (saving checkpoints); then the full state and the logits of PROBE, gathered over tp
    from the tp-split model's own forward."""
    import torch.distributed as dist

    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = from_dict(cfg_dict)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp))
    tr.run(Path(run_dir))
    state = {k: v.detach().cpu().clone() for k, v in tr.full_state().items()}
    logits = None
    if tr.mesh.pp_size == 1:
        with torch.no_grad():
            local = tr.model.module(PROBE.to(tr.mesh.device))  # this rank's vocabulary columns
        parts = [local]
        if tr.mesh.tp_size > 1:
            parts = [torch.empty_like(local) for _ in range(tr.mesh.tp_size)]
            dist.all_gather(parts, local, group=tr.mesh.tp.pg)
        logits = torch.cat(parts, -1)[..., :VOCAB].cpu()
    return {"state": state, "logits": logits, "losses": _losses(run_dir)}


def _cases(load_cases: dict, runs: list, root: str):
    """Every case of one spawn in turn: {"load": {name: result}, "runs": {name: result}}; a
    failure is its traceback. `runs`: (name, config, run folder) in order (later ones resume
    earlier ones' checkpoints); a config that is a folder name: rank 0 copies that checkpoint
    folder to the run folder."""
    import torch.distributed as dist

    out = {"load": {n: _guarded(_load_case, d) for n, d in load_cases.items()}, "runs": {}}
    for name, d, run_dir in runs:
        if isinstance(d, str):
            if dist.get_rank() == 0:
                shutil.copytree(d, run_dir)
        else:
            out["runs"][name] = _guarded(_saving_run, d, f"{root}/{run_dir}")
        dist.barrier()
    return out


LOADS = {  # name: (directory, parallel)
    "llama-tp2": ("llama", {"tp": 2}), "llama_sharded-pp2": ("llama_sharded", {"pp": 2}),
    # the norms' gradient all-reduce hooks are set on the meta device, before the storage exists
    "llama-tp2-sp": ("llama", {"tp": 2, "sequence_parallel": True}),
    "gpt2_sharded-tp2": ("gpt2_sharded", {"tp": 2}), "gpt2_untied-pp2": ("gpt2_untied", {"pp": 2}),
    "phi3-tp2": ("phi3", {"tp": 2}),
}
# tp 2 runs saved at step 3, resumed under tp 2, dp 2, tp 1 and dp 2 x tp 2
RESUMED = ("gpt2", "phi3", "phi3_kv1")
EXPORTED = {  # name: (directory, parallel, steps): runs whose last checkpoint is exported
    "llama-pp2": ("llama", {"pp": 2}, 3), "gemma-tp2": ("gemma", {"tp": 2}, 2),
}


@pytest.fixture(scope="module")
def spawn(corpus_path, dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_weights_runs")
    loads = {n: base_cfg(corpus_path, dirs[d], **p) for n, (d, p) in LOADS.items()}
    runs = []
    for f in RESUMED:
        ck, ck_dp = str(root / f"{f}-ck"), str(root / f"{f}-ck-dp2")
        runs += [(f"{f}-whole", base_cfg(corpus_path, dirs[f], tp=2), f"{f}-whole"),
                 (f"{f}-save", base_cfg(corpus_path, dirs[f], tp=2,
                                        train={"exit_after_steps": SAVED},
                                        checkpoint={"dir": ck, "every": SAVED}), f"{f}-save"),
                 (f"{f}-copy", ck, ck_dp),
                 (f"{f}-tp2", base_cfg(corpus_path, dirs[f], tp=2, checkpoint={"dir": ck}),
                  f"{f}-tp2"),
                 # saves its last step too: exported from a dp layout
                 (f"{f}-dp2", base_cfg(corpus_path, dirs[f], dp=2,
                                       checkpoint={"dir": ck_dp, "every": STEPS}), f"{f}-dp2")]
    for name, (d, p, steps) in EXPORTED.items():
        runs.append((name, base_cfg(corpus_path, dirs[d], steps=steps,
                                    checkpoint={"dir": str(root / f"{name}-ck"), "every": steps},
                                    **p), name))
    got = run_ranks(_cases, 2, args=(loads, runs, str(root)), timeout=600)
    # 4 ranks: the tp 2 checkpoints resumed under dp 2 × tp 2 with ZeRO-1, saving the last step
    # (each packed shard offered by two dp replicas, written once)
    runs4 = []
    for f in RESUMED:
        ck = str(root / f"{f}-ck-dp2tp2")
        runs4 += [(f"{f}-copy", str(root / f"{f}-ck"), ck),
                  (f"{f}-dp2tp2", base_cfg(corpus_path, dirs[f], dp=2, tp=2, zero=1,
                                           checkpoint={"dir": ck, "every": STEPS}),
                   f"{f}-dp2tp2")]
    got4 = run_ranks(_cases, 4, args=({}, runs4, str(root)), timeout=600)
    return {"ranks": got, "ranks4": got4, "root": root, "loads": loads}


def _ok(result, label):
    assert not isinstance(result, str), f"{label} failed:\n{result}"
    return result


# -- (a) loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOADS))
def test_each_rank_holds_its_slices_and_the_first_loss_is_transformers(spawn, dirs, name):
    d, parallel = LOADS[name]
    family = DIRS[d][0]
    files = sorted(Path(dirs[d]).glob("*.safetensors"))
    sharded = DIRS[d][2] is not None
    assert (len(files) >= 2 if sharded else [f.name for f in files] == ["model.safetensors"])
    assert (Path(dirs[d]) / "model.safetensors.index.json").is_file() == sharded
    full = {}
    for f in files:
        full.update(load_file(str(f)))
    total = sum(t.numel() * t.element_size() for t in full.values())
    tp = parallel.get("tp", 1)
    ranks = [_ok(r["load"][name], name) for r in spawn["ranks"]]
    held = set()
    for rank, got in enumerate(ranks):
        want_bytes = 0
        for key, local in got["params"].items():
            want, real = expected_slice(family, key, full[key], got["tp_index"], tp)
            assert torch.equal(local, want), f"{name} rank {rank}: {key}"
            want_bytes += real
            held.add(key)
        # read: exactly its own slices, nothing of what it does not hold
        assert got["bytes"] == want_bytes, (name, rank, got["bytes"], want_bytes)
        assert got["bytes"] < total
    assert held == set(full), f"{name}: not every tensor of the files is held by a rank"
    loss, norm = transformers_step(dirs[d], step_batches(spawn["loads"][name])[0])
    for rank, got in enumerate(ranks):
        assert abs(got["loss"] - loss) <= TOL["loss"] * loss, (name, rank, got["loss"], loss)
        assert abs(got["norm"] - norm) <= TOL["norm"] * norm, (name, rank, got["norm"], norm)


# -- checkpoints of tp runs: resume, reshard --------------------------------------------------
@pytest.fixture(scope="module")
def resumed_tp1(spawn, corpus_path, dirs):
    """The tp 2 checkpoints resumed by one process (tp 1): packed blocks put back in place."""
    return {f: _saving_run(base_cfg(corpus_path, dirs[f], checkpoint={
        "dir": str(spawn["root"] / f"{f}-ck")}), spawn["root"] / f"{f}-tp1") for f in RESUMED}


@pytest.mark.parametrize("family", RESUMED)
def test_tp2_checkpoint_resumes_under_tp2_dp2_and_tp1(spawn, resumed_tp1, family):
    """GPT-2 (tied, c_attn packed q | k | v), Phi-3 (qkv_proj packed 64+32+32, gate_up_proj
    packed) and Phi-3 with one key/value head (64+16+16, the k and v blocks replicated on both
    tp ranks: one range of the full tensor offered by both, written once, read by both): a tp 2
    run stopped at step 3 continues as the uninterrupted run: under tp 2 exactly,
    under dp 2, tp 1 and dp 2 × tp 2 ZeRO-1 (other reductions) within the parity tolerance:
    losses of steps 4 and 5 (the resharded weights, then the resharded Adam moments) and every
    final parameter (a packed block put back in the wrong place is a permuted tensor, far off)."""
    runs = spawn["ranks"][0]["runs"]
    whole = _ok(runs[f"{family}-whole"], "whole")
    saved = _ok(runs[f"{family}-save"], "save")["losses"]
    assert len(whole["losses"]) == STEPS and saved == whole["losses"][:SAVED]
    got = {"tp2": _ok(runs[f"{family}-tp2"], "tp2"), "dp2": _ok(runs[f"{family}-dp2"], "dp2"),
           "tp1": resumed_tp1[family],
           "dp2tp2": _ok(spawn["ranks4"][0]["runs"][f"{family}-dp2tp2"], "dp2tp2")}
    # new run folders: their metrics are the resumed steps only
    assert got["tp2"]["losses"] == whole["losses"][SAVED:], f"{family}: tp 2 resume differs"
    for layout, res in got.items():
        assert len(res["losses"]) == STEPS - SAVED, (layout, res["losses"])
        for step, (a, b) in enumerate(zip(res["losses"], whole["losses"][SAVED:]), SAVED + 1):
            assert abs(a - b) <= TOL["loss"] * abs(b), f"{family} {layout} step {step}: {a} vs {b}"
        assert res["state"].keys() == whole["state"].keys()
        for k, b in whole["state"].items():
            err = float((res["state"][k] - b).norm() / b.norm()) if b.norm() else 0.0
            assert err <= TOL["param"], f"{family} {layout}: {k} off by {err:.2e}"


# -- (b) export to a transformers directory -------------------------------------------------------
EXPORTS = {  # name: (the run, its checkpoints folder, its model directory, --max-shard-size)
    "gpt2-tp2": ("gpt2-save", "gpt2-ck", "gpt2", "20KB"),
    "gpt2-dp2": ("gpt2-dp2", "gpt2-ck-dp2", "gpt2", None),
    "phi3-tp2": ("phi3-save", "phi3-ck", "phi3", None),
    "phi3-dp2tp2": ("phi3-dp2tp2", "phi3-ck-dp2tp2", "phi3", None),
    "phi3_kv1-tp2": ("phi3_kv1-save", "phi3_kv1-ck", "phi3_kv1", None),
    "llama-pp2": ("llama-pp2", "llama-pp2-ck", "llama", None),
    "gemma-tp2": ("gemma-tp2", "gemma-tp2-ck", "gemma", None),
}


@pytest.fixture(scope="module")
def exports(spawn, tmp_path_factory):
    """Each export written through the command line."""
    from plait.cli import main

    root = tmp_path_factory.mktemp("exports")
    for name, (_, ck, _, size) in EXPORTS.items():
        args = ["export", str(spawn["root"] / ck), str(root / name), "--format", "hf"]
        assert main(args + (["--max-shard-size", size] if size else [])) == 0
    return root


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=PROBE).logits


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_plaits_logits(spawn, dirs, exports, name):
    run, _, d, size = EXPORTS[name]
    res = _ok({**spawn["ranks"][0]["runs"], **spawn["ranks4"][0]["runs"]}[run], run)
    out = exports / name
    got = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(got.parameters()).dtype == torch.float32
    # the reference: the source directory's model with plait's gathered state, by plain torch
    ref = AutoModelForCausalLM.from_pretrained(dirs[d], attn_implementation="sdpa",
                                              dtype=torch.float32)
    state = {k.removeprefix("lm."): v for k, v in res["state"].items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert torch.equal(_logits(got), _logits(ref)), name
    if res["logits"] is not None:  # plait's own forward (tp: vocab shards gathered)
        a, b = _logits(got), res["logits"]
        if "tp2" in name:  # row-parallel layers sum partial products in another order
            assert (a - b).abs().max() <= 1e-6 * b.abs().max(), float((a - b).abs().max())
        else:
            assert torch.equal(a, b)
    # the files: transformers' own keys, as save_pretrained wrote them into the source directory
    files = sorted(out.glob("*.safetensors"))
    keys = [k for f in files for k in load_file(str(f))]
    source = [k for f in Path(dirs[d]).glob("*.safetensors") for k in load_file(str(f))]
    assert sorted(keys) == sorted(source) and len(keys) == len(set(keys))
    if size is not None:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(files) >= 2 and sorted(index["weight_map"]) == sorted(keys)
        for f in files:
            assert all(index["weight_map"][k] == f.name for k in load_file(str(f)))
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    src = json.loads((Path(dirs[d]) / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dtype"} == {
        k: v for k, v in src.items() if k != "dtype"} and config["dtype"] == "float32"


def test_export_copies_the_tokenizer_files(dirs, exports):
    from transformers import AutoTokenizer

    src, out = Path(dirs["gpt2"]), exports / "gpt2-tp2"
    names = [n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json") if (src / n).is_file()]
    assert "tokenizer.json" in names
    for n in names:
        assert (out / n).read_bytes() == (src / n).read_bytes(), n
    assert AutoTokenizer.from_pretrained(str(out))("a b").input_ids == [1, 2]
    assert not (exports / "llama-pp2" / "tokenizer.json").exists()  # none there, none copied


def test_export_refusals(spawn, dirs, exports, tmp_path):
    from plait.models.hf_export import export_hf

    ck = spawn["root"] / "phi3-ck"
    with pytest.raises(CheckpointError, match="exists already"):
        export_hf(ck, exports / "phi3-tp2")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        export_hf(ck, tmp_path / "other", source=dirs["llama"])
    with pytest.raises(CheckpointError, match="max-shard-size"):
        export_hf(ck, tmp_path / "other", max_shard_size="big")
    gpt = tmp_path / "gpt-ck"
    shutil.copytree(ck, gpt)
    step = next(gpt.glob("step-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["config"]["model"]["hf"] = ""
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="--format safetensors"):
        export_hf(gpt, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# -- (c) weights that do not match config.json ----------------------------------------------------
def _variant(dirs, tmp_path, change) -> str:
    d = tmp_path / "variant"
    shutil.copytree(dirs["llama"], d)
    change(d)
    return str(d)


def _drop_key(d: Path) -> None:
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _bigger_mlp(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))


def _extra_key(d: Path) -> None:
    sd = load_file(str(d / "model.safetensors"))
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, str(d / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.mark.parametrize("change,match", [
    (_drop_key, r"missing \['model.norm.weight'\]"),
    (_bigger_mlp, r"shapes: model.layers.0.mlp.\w+_proj.weight is \[\d+, \d+\] there"),
    (_extra_key, r"unexpected \['model.extra.weight'\]"),
], ids=["missing-key", "wrong-shape", "unexpected-key"])
def test_mismatched_weights_are_a_clear_error(dirs, tmp_path, change, match):
    d = _variant(dirs, tmp_path, change)
    for load in (build_for_training, load_causal_lm):  # the training path, the standalone one
        with pytest.raises(ConfigError, match="the weights do not match config.json") as e:
            load(d, 0)
        assert e.match(match)


def test_missing_shard_is_named(dirs, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(dirs["llama_sharded"], d)
    gone = sorted(d.glob("model-*.safetensors"))[-1]
    gone.unlink()
    with pytest.raises(ConfigError, match=gone.name):
        build_for_training(str(d), 0)


def test_without_weights_the_random_init_is_unchanged(tmp_path):
    """No weights: the model is the transformers model initialized from the seed, as before."""
    tiny_config("llama", vocab_size=VOCAB).save_pretrained(tmp_path)
    model, init = build_for_training(str(tmp_path), 3)
    torch.manual_seed(3)
    ref = build_causal_lm(tiny_config("llama", vocab_size=VOCAB))
    assert init is None
    assert all(torch.equal(a, b) for a, b in zip(model.lm.state_dict().values(),
                                                  ref.state_dict().values()))
