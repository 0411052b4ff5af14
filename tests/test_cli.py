"""The command line: bad input exits non-zero with one clear message, without hanging;
a tiny run works."""

import json
import os
import subprocess
import sys

import pytest

PY = sys.executable


def plait(*args, timeout=120, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([PY, "-m", "plait", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize("args,fragment", [
    (["parallel.dp=2", "--nproc", "3"], "launch 2 processes"),
    (["parallel.dpx=2"], "unknown config key 'parallel.dpx'"),
    (["train.micro_batch=0"], "train.micro_batch = 0: must be positive"),
    (["train.global_batch=12", "train.micro_batch=8"], "not divisible by train.micro_batch"),
    (["train.global_batch=8", "train.micro_batch=8", "--nproc", "2"],
     "not divisible by train.micro_batch × dp"),
    (["data.path=/definitely/missing"], "data.path = '/definitely/missing' does not exist"),
    (["/missing.toml"], "config file '/missing.toml' does not exist"),
])
def test_bad_input_clear_error(args, fragment, tmp_path):
    r = plait("train", *args, "--run-dir", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_worker_level_mismatch_under_torchrun_exits_without_hang(tmp_path):
    # every rank checks the layout against WORLD_SIZE before any collective
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "plait",
         "train", "parallel.dp=4", "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=90, env=env)
    assert r.returncode != 0
    assert "launch 4 processes" in r.stderr + r.stdout


def test_tiny_run_writes_run_folder_and_refuses_to_overwrite(tmp_path, corpus_path):
    run = tmp_path / "run"
    args = ["train", "model.preset=tiny", "train.steps=4", "train.seq_len=32",
            "train.global_batch=8", "train.micro_batch=2", f"data.path={corpus_path}",
            "train.val_every=2", "train.val_samples=4", "--nproc", "2", "--run-dir", str(run)]
    r = plait(*args, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "steps", "tokens", "tokens_per_s", "mfu",
                "comm_bytes_per_step", "layout", "peak_memory_bytes", "wall_s"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 8 * 32
    assert summary["layout"]["dp"] == 2 and summary["comm_bytes_per_step"] > 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert all({"step", "loss", "tokens_per_s", "comm_bytes"} <= x.keys() for x in recs)
    assert sum("val_loss" in x for x in recs) == 2
    assert (run / "config.toml").exists() and (run / "loss.png").exists()
    before = (run / "metrics.jsonl").read_text()
    r2 = plait(*args, timeout=60)
    assert r2.returncode == 2 and "already holds a run" in r2.stderr
    assert (run / "metrics.jsonl").read_text() == before
    r3 = plait("report", str(run))
    assert r3.returncode == 0 and "final_train_loss" in r3.stdout


@pytest.mark.parametrize("argv,expected", [
    (["dp"], {"ranks": "2,4", "steps": 6, "preset": "10m", "reps": 5, "batch": 8}),
    (["sync"], {"ranks": "4", "steps": 300, "preset": "tiny", "reps": 1, "batch": 4}),
    # typed values are kept, also when they equal another benchmark's default
    (["sync", "--steps", "6", "--ranks", "2,4", "--reps", "5"],
     {"ranks": "2,4", "steps": 6, "preset": "tiny", "reps": 5, "batch": 4}),
    (["dp", "--steps", "300", "--preset", "tiny"],
     {"steps": 300, "preset": "tiny", "ranks": "2,4"}),
])
def test_each_benchmark_owns_its_flags(argv, expected, monkeypatch):
    import importlib

    from plait.bench import run_bench

    seen = {}
    module = importlib.import_module(f"plait.bench.{argv[0]}")
    monkeypatch.setattr(module, "main", lambda args: seen.update(vars(args)) or 0)
    assert run_bench(argv[0], argv[1:]) == 0
    assert {k: seen[k] for k in expected} == expected


def test_cli_knows_no_benchmark_flag():
    """`plait bench NAME ...` hands everything after NAME to the benchmark's own parser."""
    from plait.cli import parse

    args = parse(["bench", "sync", "--every", "7", "--bandwidth", "none"])
    assert args.what == "sync" and args.bench_args == ["--every", "7", "--bandwidth", "none"]
    with pytest.raises(SystemExit):  # a flag that benchmark does not have is its parser's error
        from plait.bench import run_bench

        run_bench("dp", ["--every", "7"])


def test_train_takes_options_between_config_and_overrides():
    from plait.cli import parse

    args = parse(["train", "my.toml", "--nproc", "4", "parallel.dp=4", "--run-dir", "runs/x",
                  "train.steps=2"])
    assert args.rest == ["my.toml", "parallel.dp=4", "train.steps=2"] and args.nproc == 4
    assert args.run_dir == "runs/x"
    with pytest.raises(SystemExit):
        parse(["train", "--no-such-flag"])


def test_model_dependent_layout_errors_come_before_the_launch(tmp_path):
    r = plait("train", "model.preset=tiny", "parallel.pp=4", "train.global_batch=32",
              "--nproc", "4", "--run-dir", str(tmp_path / "r"),
              timeout=120)
    assert r.returncode == 2 and "model has 2 blocks" in r.stderr
    assert "SIGTERM" not in r.stderr and "worker" not in r.stderr  # no worker was started
    assert not (tmp_path / "r").exists()


def test_lars_at_an_adam_sized_rate_is_said(capsys):
    from plait.config import load
    from plait.train.model_setup import advice

    assert any("optim.lr=1.0" in a for a in advice(load(None, ["optim.name=lars"])))
    assert advice(load(None, ["optim.name=lars", "optim.lr=1.0"])) == []
