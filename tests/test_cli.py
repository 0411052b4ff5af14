"""The command line: bad input exits non-zero with one clear message, without hanging; a tiny run works."""

import json
import os
import subprocess
import sys

import pytest

PY = sys.executable


def plait(*args, timeout=120, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([PY, "-m", "plait", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


@pytest.mark.parametrize("args,fragment", [
    (["parallel.dp=2", "--nproc", "3"], "launch 2 processes"),
    (["parallel.dpx=2"], "unknown config key 'parallel.dpx'"),
    (["train.micro_batch=0"], "train.micro_batch = 0: must be positive"),
    (["train.global_batch=12", "train.micro_batch=8"], "not divisible by train.micro_batch"),
    (["train.global_batch=8", "train.micro_batch=8", "--nproc", "2"], "not divisible by train.micro_batch × dp"),
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
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "plait",
                        "train", "parallel.dp=4", "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=90, env=env)
    assert r.returncode != 0
    assert "launch 4 processes" in r.stderr + r.stdout


def test_tiny_run_writes_run_folder_and_refuses_to_overwrite(tmp_path, corpus_path):
    run = tmp_path / "run"
    args = ["train", "model.preset=tiny", "train.steps=4", "train.seq_len=32", "train.global_batch=8",
            "train.micro_batch=2", f"data.path={corpus_path}", "train.val_every=2", "train.val_samples=4",
            "--nproc", "2", "--run-dir", str(run)]
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
    (["bench", "dp"], {"ranks": "2,4", "steps": 6, "preset": "10m", "reps": 5, "batch": 0}),
    (["bench", "sync"], {"ranks": "4", "steps": 300, "preset": "tiny", "reps": 1, "batch": 4}),
    # typed values are kept, also when they equal another benchmark's default
    (["bench", "sync", "--steps", "6", "--ranks", "2,4", "--reps", "5"],
     {"ranks": "2,4", "steps": 6, "preset": "tiny", "reps": 5, "batch": 4}),
    (["bench", "dp", "--steps", "300", "--preset", "tiny"], {"steps": 300, "preset": "tiny", "ranks": "2,4"}),
])
def test_bench_flags_keep_typed_values_and_fill_own_defaults(argv, expected):
    from plait.bench import resolve_defaults
    from plait.cli import build_parser

    args = build_parser().parse_args(argv)
    resolve_defaults(args.what, args)
    assert {k: getattr(args, k) for k in expected} == expected
