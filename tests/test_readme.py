"""Every `plait` command in the README runs as written (with tiny overrides where it would train
long), so the README cannot rot. Multi-node lines need a second machine: their command lines are
parsed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = ["model.preset=tiny", "train.steps=4", "train.seq_len=32", "train.global_batch=8",
        "train.micro_batch=2", "train.val_samples=4", "train.val_every=0", "log.progress=false",
        "log.plots=false"]


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, the output line shown under it or None) for each `plait` line of a shell block."""
    out, fence, lines = [], None, README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = None if fence is not None else line.strip()[3:]  # "" opens a shell block
            continue
        text = re.split(r"\s+#", line)[0].strip()
        if fence == "" and text.startswith(".venv/bin/python scripts/"):  # e.g. make_tiny_hf.py
            out.append((text, None))
        elif fence == "" and (text.startswith("plait ") or text.startswith("$ plait ")):
            shown = lines[i + 1].strip() if text.startswith("$ ") and i + 1 < len(lines) else None
            out.append((text.removeprefix("$ "), shown))
    return out


def test_the_readme_has_commands():
    cmds = [c for c, _ in readme_commands()]
    assert (len(cmds) >= 10 and "plait train" in cmds
            and any(c.startswith("plait export") for c in cmds))


def _config(path: Path, corpus: str) -> None:
    """A tiny run (4 kv heads, so parallel.tp=4 divides them) that checkpoints every 2 steps."""
    path.write_text("\n".join([
        "[model]", 'preset = "tiny"', "n_kv_heads = 4", "[data]", f'path = "{corpus}"',
        "[train]", "steps = 4", "seq_len = 32", "global_batch = 8", "micro_batch = 2",
        "val_samples = 4", "val_every = 0", "[checkpoint]", "every = 2", "[log]",
        "progress = false", "plots = false", ""]))


def test_every_readme_command_runs(corpus_path, tmp_path):
    from plait.cli import parse

    _config(tmp_path / "my.toml", corpus_path)
    _config(tmp_path / "cfg.toml", corpus_path)
    env = {**os.environ, "PYTHONPATH": str(README.parent), "OMP_NUM_THREADS": "1"}
    for cmd, shown in readme_commands():
        # what the README writes under /tmp goes to this test's folder
        argv = [a.replace("/tmp/", f"{tmp_path}/") for a in shlex.split(cmd)[1:]]
        if argv[0].startswith("scripts/"):
            r = subprocess.run([sys.executable, str(README.parent / argv[0]), *argv[1:]],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"`{cmd}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            continue
        # another machine would have to join: the line must parse, nothing more
        if "--nnodes" in argv:
            assert parse(argv).nnodes == 2
            continue
        if argv[0] == "train" and not any(a.endswith(".toml") for a in argv):
            argv = [a for a in argv if a != "..."] + [f"data.path={corpus_path}"] + TINY
        elif argv[0] == "train" and any(a.startswith("examples/") for a in argv):
            # its data: the step before
            argv = [str(README.parent / a) if a.startswith("examples/") else a for a in argv] + TINY
        elif argv[:2] == ["data", "prepare"]:
            # the small test corpus instead of the whole standard library
            argv = [corpus_path if a == "python:stdlib" else a for a in argv] + ["--no-progress"]
        r = subprocess.run([sys.executable, "-m", "plait", *argv], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        # the README shows an error on purpose
        if shown is not None and shown.startswith("plait: error"):
            assert r.returncode == 2 and shown.split(" (did you")[0] in r.stderr, (cmd, r.stderr)
            continue
        assert r.returncode == 0, f"`{cmd}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        if argv[0] == "report":
            assert re.search(r"tokens_per_s: [\d,]+ tok/s", r.stdout), r.stdout


@pytest.mark.parametrize("argv", [["train", "--nproc", "2", "my.toml"], ["report"]])
def test_a_wrong_readme_command_would_fail(argv, tmp_path):
    """The check above can fail: a command that is wrong here exits non-zero."""
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    r = subprocess.run([sys.executable, "-m", "plait", *argv], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
