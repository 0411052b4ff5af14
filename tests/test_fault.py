"""Faults through the command line: SIGKILL during a save and at a random moment, an elastic restart
after a worker is killed, a rank that skips a collective, the export command.

The debug faults (train.fault) fire once per checkpoint folder (a marker file), so a restarted or
re-run command trains on normally.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from common import tiny_cfg

from plait.checkpoint import export_safetensors, latest, read_manifest
from plait.checkpoint.store import check_file
from plait.config import ConfigError, from_dict, to_toml
from plait.testing import run_ranks

# one-rank saves and loads are single-process on purpose (DCP says so in a warning each time)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

PY = sys.executable


def plait(*args, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([PY, "-m", "plait", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def config_file(tmp_path, corpus, name="cfg.toml", **sections) -> tuple[str, dict]:
    """A TOML file of the tiny model (vocabulary 257, 6 steps) for the command line,
    and its dict."""
    train = {"steps": 6, **sections.pop("train", {})}
    d = tiny_cfg(corpus, model={"vocab_size": 257, "n_kv_heads": 4}, train=train, **sections)
    path = tmp_path / name
    path.write_text(to_toml(from_dict(d)))
    return str(path), d


def final_loss(run) -> float:
    return json.loads((Path(run) / "summary.json").read_text())["final_train_loss"]


def _whole_run(d, run):
    from plait.train import train

    return train(from_dict(d), run)["final_train_loss"]


def test_worker_killed_mid_run_restarts_and_matches_uninterrupted(tmp_path, corpus_path):
    cfg, d = config_file(tmp_path, corpus_path, parallel={"dp": 2}, compression={"name": "int8"})
    want = run_ranks(_whole_run, 2, args=(d, str(tmp_path / "whole")), timeout=300)[0]
    run = tmp_path / "run"
    r = plait("train", "--nproc", "2", "--max-restarts", "1", "--run-dir", str(run), cfg,
              "checkpoint.every=2", "train.fault=kill", "train.fault_rank=1", "train.fault_step=5",
              timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "exitcode: -9" in out  # rank 1 was SIGKILLed once ...
    # ... and every rank resumed
    assert f"resuming from {run / 'checkpoints' / 'step-00000004'}" in out
    assert final_loss(run) == want
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [5, 6] and 4 in steps


def test_rank_skipping_a_collective_is_a_named_error(tmp_path, corpus_path):
    cfg, _ = config_file(tmp_path, corpus_path, parallel={"dp": 2})
    r = plait("train", "--nproc", "2", "--run-dir", str(tmp_path / "run"), cfg, "train.timeout_s=3",
              "train.fault=skip_collective", "train.fault_rank=1", "train.fault_step=2",
              timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    # the comm layer counts steps from 0: the second step is step 1
    assert "CommError: rank 0: all_reduce on group world failed at step 1" in out, out[-3000:]
    assert "last collectives of rank 0" in out and "all_reduce on world" in out


def test_kill_inside_a_save_keeps_the_previous_checkpoint(tmp_path, corpus_path):
    from plait.train import train

    cfg, d = config_file(tmp_path, corpus_path)
    want = train(from_dict(d), str(tmp_path / "whole"))["final_train_loss"]
    run = tmp_path / "run"
    args = ["train", "--nproc", "1", "--run-dir", str(run), cfg, "checkpoint.every=2",
            "train.fault=kill_in_save", "train.fault_step=4"]
    r = plait(*args)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    ck = run / "checkpoints"
    assert (ck / ".tmp-step-00000004" / ".metadata").exists()  # the data was written ...
    assert not (ck / "step-00000004").exists()  # ... but never made visible
    assert latest(ck) == ck / "step-00000002"
    r = plait(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {ck / 'step-00000002'}" in r.stdout
    assert final_loss(run) == want
    assert not any(p.name.startswith(".tmp-step-") for p in ck.iterdir())


def test_kill_at_a_random_moment_leaves_complete_checkpoints(tmp_path, corpus_path):
    cfg, _ = config_file(tmp_path, corpus_path, train={"steps": 200})
    run = tmp_path / "run"
    ck = run / "checkpoints"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([PY, "-m", "plait", "train", "--nproc", "1", "--run-dir", str(run), cfg,
                          "checkpoint.every=1", "checkpoint.keep=3"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while (not (ck / "step-00000003").exists() and time.monotonic() < deadline
                and p.poll() is None):
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.3))  # saving every step: most moments are inside a save
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    found = latest(ck)
    assert found is not None
    for d in (x for x in ck.iterdir() if x.name.startswith("step-")):
        manifest = read_manifest(d)
        assert all(check_file(d, f) is None for f in manifest["files"]), d
    out = export_safetensors(found, tmp_path / "export")  # the latest one loads
    assert out[0].stat().st_size > 0


def test_export_command(tmp_path, corpus_path):
    from plait.train import train

    _, d = config_file(tmp_path, corpus_path, checkpoint={"every": 3}, train={"steps": 3})
    train(from_dict(d), str(tmp_path / "run"))
    out = tmp_path / "model.safetensors"
    r = plait("export", str(tmp_path / "run"), "--format", "safetensors", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.exists() and json.loads(out.with_suffix(".json").read_text())["step"] == 3
    from safetensors.torch import load_file

    tensors = load_file(str(out))
    assert tensors["tok_emb.weight"].shape == (257, 32)
    r = plait("export", str(tmp_path / "run"), str(out))
    assert r.returncode == 2 and "exists already" in r.stderr  # nothing is overwritten
    r = plait("export", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_saving_without_a_folder_is_a_clear_error(corpus_path):
    from plait.mesh import Mesh
    from plait.train import Trainer

    cfg = from_dict(tiny_cfg(corpus_path, checkpoint={"every": 2}))
    with pytest.raises(ConfigError,
                       match="checkpoint.every saves checkpoints, but this run has no folder"):
        Trainer(cfg, Mesh.single()).run(None)
