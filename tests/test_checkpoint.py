"""Checkpoints: exact resume, resharding, export / import, non-finite steps, bad input.

Spawned process groups are shared: one 2-rank group runs every exact-resume layout (dp with
compression residuals, tp with asynchronous saves, pp, DiLoCo's per-replica state) and the
non-finite cases; one 4-rank group saves under dp2 × tp2 and resumes under four other layouts,
and loads a safetensors export. Each case's failure is reported on its own. Kills, restarts and
hangs go through the command line (tests/test_fault.py).
"""

import hashlib
import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from common import tiny_cfg

from plait.checkpoint import (
    CheckpointError,
    export_safetensors,
    latest,
    load_safetensors,
    read_manifest,
)
from plait.checkpoint.store import check_file
from plait.config import from_dict
from plait.errors import ConfigError
from plait.testing import run_ranks

# one-rank saves and loads are single-process on purpose (DCP says so in a warning each time)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

RTOL = 1e-5


def ckpt_cfg(corpus, steps=6, **sections):
    """The tiny model with a vocabulary of 257 (padded under tp 2 and 4) and 4 kv heads
    (tp 4 divides them)."""
    model = {"vocab_size": 257, "n_kv_heads": 4, **sections.pop("model", {})}
    train = {"steps": steps, **sections.pop("train", {})}
    return tiny_cfg(corpus, model=model, train=train, **sections)


def with_(d: dict, **sections) -> dict:
    out = json.loads(json.dumps(d))
    for sec, body in sections.items():
        out.setdefault(sec, {}).update(body)
    return out


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()
            if x.strip()]


def losses(run) -> list[float]:
    return [r["loss"] for r in metrics(run)]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _train(d, run_dir):
    """train() as a worker runs it, keeping the Trainer (its parameters are checked)."""
    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = from_dict(d)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp))
    return tr, tr.run(Path(run_dir))


def _checksum(tr) -> float:
    return float(sum(p.detach().double().sum() for p in tr.model.parameters()))


# -- 2 ranks: exact resume per layout, non-finite steps --------------------------------------------
def _two_rank_worker(resume_cases, root):
    import torch.distributed as dist

    from plait.train import train

    out = {}
    for name, d in resume_cases.items():
        try:
            train(from_dict(d), f"{root}/{name}/whole")
            first = train(from_dict(with_(d, train={"exit_after_steps": 3})),
                          f"{root}/{name}/split")
            second = train(from_dict(d), f"{root}/{name}/split")
            dist.barrier()
            out[name] = {"whole": losses(f"{root}/{name}/whole"),
                         "split": metrics(f"{root}/{name}/split"), "first": first, "second": second}
        except Exception:  # noqa: BLE001 - reported per case
            out[name] = {"error": traceback.format_exc()}
    base = resume_cases["dp"]
    try:  # rank 1's loss is NaN at step 3: every rank skips it
        tr, summary = _train(with_(base, train={"fault": "nan", "fault_rank": 1, "fault_step": 3,
                                                "max_bad_steps": 2},
                                   checkpoint={"every": 3, "keep": 5}), f"{root}/nan_once")
        saved = sorted(p.name for p in Path(f"{root}/nan_once/checkpoints").iterdir() if p.is_dir())
        out["nan_once"] = {"summary": summary, "checksum": _checksum(tr),
                           "metrics": metrics(f"{root}/nan_once"), "saved": saved}
    except Exception:  # noqa: BLE001
        out["nan_once"] = {"error": traceback.format_exc()}
    try:  # steps 3, 4, 5 are NaN on rank 1 and 2 in a row stop the run
        _train(with_(base, train={"fault": "nan", "fault_rank": 1, "fault_step": 3,
                                  "fault_steps": 3, "max_bad_steps": 2},
                     checkpoint={"every": 1, "keep": 5}), f"{root}/nan_stop")
        out["nan_stop"] = {"error": "no error raised"}
    except Exception as e:  # noqa: BLE001
        ck = Path(f"{root}/nan_stop/checkpoints")
        out["nan_stop"] = {"type": type(e).__name__, "message": str(e), "latest": latest(ck),
                           "all": sorted(p.name for p in ck.iterdir() if p.is_dir())}
    return out


@pytest.fixture(scope="module")
def two_rank(corpus_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_rank")
    cases = {
        # residuals per rank
        "dp": ckpt_cfg(corpus_path, parallel={"dp": 2}, compression={"name": "int8"}),
        "tp": ckpt_cfg(corpus_path, parallel={"tp": 2},
                       checkpoint={"async_save": True, "every": 2}),
        "pp": ckpt_cfg(corpus_path, parallel={"pp": 2}),
        "diloco": ckpt_cfg(corpus_path, parallel={"dp": 2},
                           sync={"strategy": "diloco", "every": 2}),
        # parameters sharded over dp too
        "zero3": ckpt_cfg(corpus_path, parallel={"dp": 2, "zero": 3}),
    }
    return run_ranks(_two_rank_worker, 2, args=(cases, str(root)), timeout=600)


@pytest.mark.parametrize("layout", ["dp", "tp", "pp", "diloco", "zero3"])
def test_stop_and_resume_is_bit_identical(two_rank, layout):
    for rank, got in enumerate(two_rank):
        r = got[layout]
        assert "error" not in r, r.get("error")
        assert r["first"]["stopped"] == "train.exit_after_steps" and r["first"]["steps"] == 3
        assert r["second"]["resumed_from_step"] == 3 and r["second"]["steps"] == 6
        split = r["split"]
        assert [x["step"] for x in split] == [1, 2, 3, 4, 5, 6]  # appended, never truncated
        assert split[3]["resumed_from"] == 3
        # exactly
        assert [x["loss"] for x in split] == r["whole"], f"rank {rank}: resumed run differs"


def test_nonfinite_step_is_skipped_on_every_rank(two_rank):
    a, b = (got["nan_once"] for got in two_rank)
    assert "error" not in a, a.get("error")
    assert a["summary"]["skipped_steps"] == 1 and a["summary"]["steps"] == 6
    assert a["checksum"] == b["checksum"], "the replicas differ: not every rank skipped the step"
    recs = a["metrics"]
    assert recs[2]["skipped"] and recs[2]["loss"] != recs[2]["loss"]  # NaN logged, step counted
    assert all(x["loss"] == x["loss"] for i, x in enumerate(recs) if i != 2)
    # the save due at the skipped step 3 (checkpoint.every = 3) is made on the next good step
    assert a["saved"] == ["step-00000004", "step-00000006"]


def test_nonfinite_streak_stops_and_keeps_the_last_good_checkpoint(two_rank):
    for got in two_rank:
        r = got["nan_stop"]
        assert r.get("type") == "NonFiniteError", r
        assert "train.max_bad_steps = 2" in r["message"] and "steps 3 to 4" in r["message"]
        assert "step-00000002" in r["message"]
        assert (r["latest"].name == "step-00000002"
                and r["all"] == ["step-00000001", "step-00000002"])
        manifest = read_manifest(r["latest"])
        assert all(check_file(r["latest"], f) is None for f in manifest["files"])


# -- 4 ranks: resharding and import ----------------------------------------------------------------
def _four_rank_worker(save, targets, export_to, import_cfg, root):
    import torch.distributed as dist

    from plait.mesh import Mesh
    from plait.train import Trainer, train

    out = {}
    train(from_dict(save), f"{root}/save")
    dist.barrier()
    for name, d in targets.items():
        try:
            train(from_dict(d), f"{root}/{name}")
            dist.barrier()
            out[name] = losses(f"{root}/{name}")
        except Exception:  # noqa: BLE001
            out[name] = traceback.format_exc()
    try:
        if dist.get_rank() == 0:
            export_safetensors(save["checkpoint"]["dir"], export_to)
        dist.barrier()
        cfg = from_dict(import_cfg)
        tr = Trainer(cfg, Mesh.build(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp))
        load_safetensors(tr.model, export_to, tr.mesh, tr.model_cfg)
        out["imported"] = tr.full_state()
    except Exception:  # noqa: BLE001
        out["imported"] = traceback.format_exc()
    return out


def _reference(d, steps_before: int, run_steps: int | None = None):
    """Single process: the losses of the first `run_steps` steps (default all), the parameters after
    `steps_before` steps, and the trainer."""
    from plait.mesh import Mesh
    from plait.train import Trainer

    torch.set_num_threads(1)
    cfg = from_dict(with_(d, parallel={"dp": 1, "tp": 1, "pp": 1}))
    tr = Trainer(cfg, Mesh.single())
    out, state = [], None
    for i in range(run_steps or cfg.train.steps):
        if i == steps_before:
            state = {k: v.clone() for k, v in tr.full_state().items()}
        out.append(float(tr.train_step()["loss"]))
    return out, state, tr


@pytest.fixture(scope="module")
def four_rank(corpus_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("four_rank")
    ck = str(root / "ckpt")

    # every run reads the one checkpoint; none of them saves (checkpoint.every = 0)
    def at(**parallel):
        return ckpt_cfg(corpus_path, steps=5, parallel=parallel, checkpoint={"dir": ck})

    # optimizer state sharded over dp
    save = with_(at(dp=2, tp=2, zero=1), train={"exit_after_steps": 3})
    targets = {"tp4": at(tp=4), "dp4_zero3": at(dp=4, zero=3), "tp2_pp2": at(tp=2, pp=2),
               "dp2_pp2_zero2": at(dp=2, pp=2, zero=2)}
    got = run_ranks(_four_rank_worker, 4,
                    args=(save, targets, str(root / "export"), at(tp=2, pp=2), str(root)),
                    timeout=600)
    return {"ranks": got, "ck": Path(ck), "export": root / "export", "cfg": at(dp=1), "root": root}


def test_resharding_continues_the_reference_run(four_rank, tmp_path):
    ref, _, _ = _reference(four_rank["cfg"], 3)
    got = dict(four_rank["ranks"][0])
    from plait.train import train  # dp = 1: this process

    train(from_dict(four_rank["cfg"]), str(tmp_path / "dp1"))
    got["dp1"] = losses(tmp_path / "dp1")
    for name in ("tp4", "dp4_zero3", "tp2_pp2", "dp2_pp2_zero2", "dp1"):
        assert isinstance(got[name], list), got[name]
        # steps 4 and 5, after the checkpoint of step 3
        assert len(got[name]) == 2, (name, got[name])
        for step, (a, b) in enumerate(zip(got[name], ref[3:]), start=4):
            assert abs(a - b) / abs(b) <= RTOL, f"{name}, step {step}: loss {a} vs reference {b}"
    manifest = read_manifest(latest(four_rank["ck"]))
    assert (manifest["layout"]["dp"] == 2 and manifest["layout"]["tp"] == 2
            and manifest["layout"]["zero"] == 1)
    assert manifest["step"] == 3


def test_export_loads_into_another_layout(four_rank):
    _, state, _ = _reference(four_rank["cfg"], 3)
    imported = four_rank["ranks"][0]["imported"]
    assert isinstance(imported, dict), imported
    assert imported.keys() == state.keys()
    for k, b in state.items():
        a = imported[k]
        assert a.shape == b.shape, k
        assert (a.double() - b.double()).norm() / b.double().norm() <= RTOL, k
    config = json.loads((four_rank["export"] / "config.json").read_text())
    assert config["step"] == 3 and config["model"]["vocab_size"] == 257
    assert config["tensors"]["lm_head.weight"] == [257, 32]  # unpadded, whole
    with pytest.raises(CheckpointError, match="exists already"):
        export_safetensors(four_rank["ck"], four_rank["export"])


def test_init_from_export_starts_from_its_weights(four_rank, tmp_path):
    from plait.data import micro_batches
    from plait.train import train

    _, _, tr = _reference(four_rank["cfg"], 3, run_steps=3)  # the exported weights: step 3 of 5
    # the loss of the exported weights on the first batch
    expect = float(tr.model.train_step(micro_batches(tr.train_data, 0, 8, 2), 8 * 32))
    d = with_(four_rank["cfg"], checkpoint={"dir": "", "init_from": str(four_rank["export"])},
              train={"steps": 1})
    summary = train(from_dict(d), str(tmp_path / "init"))
    assert summary["resumed_from_step"] is None and summary["steps"] == 1
    assert abs(losses(tmp_path / "init")[0] - expect) / expect <= RTOL


# -- one process: bad input ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(corpus_path, tmp_path_factory):
    from plait.train import train

    d = ckpt_cfg(corpus_path, checkpoint={"every": 2})
    run = tmp_path_factory.mktemp("saved") / "run"
    summary = train(from_dict(d), str(run))
    return {"cfg": d, "run": run, "summary": summary}


def test_periodic_saves_keep_the_last_k(saved_run):
    ck = saved_run["run"] / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000004", "step-00000006"]  # keep = 2
    m = read_manifest(ck / "step-00000006")
    assert m["step"] == 6 and m["samples"] == 48 and m["model"]["d_model"] == 32
    assert {f["name"] for f in m["files"]} >= {".metadata", "__0_0.distcp"}
    assert saved_run["summary"]["checkpoint"].endswith("step-00000006")


def _damage(kind: str, ckpt: Path) -> str:
    f = ckpt / ("__0_0.distcp" if kind != "truncated" else ".metadata")
    if kind == "corrupted":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif kind == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    else:
        f.unlink()
    return f.name


@pytest.mark.parametrize("kind,fragment", [("corrupted", "corrupted"), ("truncated", "truncated"),
                                           ("missing", "is missing")])
def test_damaged_newest_checkpoint_falls_back_to_one_that_verifies(saved_run, tmp_path, kind,
                                                                   fragment, capsys):
    from plait.train import train

    run = tmp_path / "run"
    shutil.copytree(saved_run["run"], run)
    ck = run / "checkpoints"
    name = _damage(kind, ck / "step-00000006")
    damaged = tree_digest(ck / "step-00000006")
    summary = train(from_dict(with_(saved_run["cfg"], train={"steps": 6})), str(run))
    out = capsys.readouterr().out
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    assert fragment in out and name in out and "Falling back to step-00000004" in out
    # kept as it was, beside the new step 6
    assert tree_digest(ck / "step-00000006.damaged") == damaged
    assert read_manifest(ck / "step-00000006")["step"] == 6


@pytest.mark.parametrize("kind,fragment", [("corrupted", "corrupted"), ("missing", "is missing")])
def test_damage_with_nothing_to_fall_back_to_is_a_clear_error_and_nothing_changes(
        saved_run, tmp_path, kind, fragment):
    from plait.train import train

    run = tmp_path / "run"
    shutil.copytree(saved_run["run"], run)
    _damage(kind, run / "checkpoints" / "step-00000006")
    name = _damage(kind, run / "checkpoints" / "step-00000004")
    before = tree_digest(run)
    with pytest.raises(CheckpointError, match=fragment) as e:
        train(from_dict(with_(saved_run["cfg"], train={"steps": 8})), str(run))
    assert name in str(e.value) and "step-00000004" in str(e.value)
    assert tree_digest(run) == before  # nothing written, nothing deleted


def test_other_model_shape_is_a_clear_error(saved_run, tmp_path):
    from plait.train import train

    run = tmp_path / "run"
    shutil.copytree(saved_run["run"], run)
    before = tree_digest(run)
    d = with_(saved_run["cfg"], model={"d_model": 64}, train={"steps": 8})
    with pytest.raises(CheckpointError, match=r"d_model = 32 there, 64 here") as e:
        train(from_dict(d), str(run))
    assert "manifest.json" in str(e.value) and "model.d_model=32" in str(e.value)
    assert tree_digest(run) == before


def test_other_optimizer_resumes_with_fresh_optimizer_state(saved_run, tmp_path, capsys):
    from plait.train import train

    run = tmp_path / "run"
    shutil.copytree(saved_run["run"], run)
    summary = train(from_dict(with_(saved_run["cfg"], optim={"name": "sgd"}, train={"steps": 7})),
                    str(run))
    assert (summary["resumed_from_step"] == 6 and summary["steps"] == 7
            and summary["tokens"] == 7 * 8 * 32)
    assert ("optim.name changed (adamw -> sgd): the optimizer state starts fresh"
            in capsys.readouterr().out)


def test_run_folder_without_checkpoint_is_refused(saved_run, tmp_path):
    from plait.train.metrics import prepare_run_dir

    run = tmp_path / "run"
    shutil.copytree(saved_run["run"], run)
    prepare_run_dir(run)  # a complete checkpoint: resumable
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        prepare_run_dir(run)


def test_finished_run_resumes_to_nothing(saved_run, capsys):
    from plait.train import train

    before = tree_digest(saved_run["run"])
    summary = train(from_dict(saved_run["cfg"]), str(saved_run["run"]))
    assert summary["final_train_loss"] == saved_run["summary"]["final_train_loss"]
    assert "nothing to do" in capsys.readouterr().out
    after = tree_digest(saved_run["run"])
    assert {k: v for k, v in after.items() if not k.startswith("config.")} == \
           {k: v for k, v in before.items() if not k.startswith("config.")}


def test_export_of_an_incomplete_checkpoint_is_refused(saved_run, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(saved_run["run"] / "checkpoints" / "step-00000006", half)
    (half / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        export_safetensors(half, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_loss_scale_continues_after_resume(corpus_path, tmp_path):
    from plait.train import train

    # a scale far too large: every step overflows and halves it, so a restarted scale would show
    d = tiny_cfg(corpus_path, train={"steps": 5, "dtype": "fp16", "loss_scale_init": 2.0**30})
    train(from_dict(d), str(tmp_path / "whole"))
    train(from_dict(with_(d, train={"exit_after_steps": 2})), str(tmp_path / "split"))
    summary = train(from_dict(d), str(tmp_path / "split"))
    scales = [(r["loss"], r["loss_scale"]) for r in metrics(tmp_path / "split")]
    assert scales == [(r["loss"], r["loss_scale"]) for r in metrics(tmp_path / "whole")]
    assert summary["overflow_steps"] == 5


def test_time_based_saves_and_stop(corpus_path, tmp_path):
    from plait.train import train

    # every_minutes tiny: a save after every step;
    # exit_after_minutes tiny: stop (and save) after the first
    d = tiny_cfg(corpus_path, train={"steps": 3},
                 checkpoint={"every_minutes": 1e-6, "keep": 0, "async_save": True})
    train(from_dict(d), str(tmp_path / "often"))
    assert sorted(p.name for p in (tmp_path / "often" / "checkpoints").iterdir()) == \
           ["step-00000001", "step-00000002", "step-00000003"]
    summary = train(from_dict(with_(d, train={"exit_after_minutes": 1e-6})), str(tmp_path / "stop"))
    assert summary["stopped"] == "train.exit_after_minutes" and summary["steps"] == 1
    assert latest(tmp_path / "stop" / "checkpoints").name == "step-00000001"
