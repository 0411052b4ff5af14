"""`plait train parallel.auto=true`: the planner chooses the layout, the workers run exactly it,
summary.json puts the prediction beside the measurement."""

import json
import os
import subprocess
import sys

import pytest

from plait.config import load
from plait.errors import ConfigError
from plait.planner.auto import check_not_set, compare, overrides, read_plan, resolve

PY = sys.executable
TINY = ["model.preset=tiny", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
        "train.steps=3", "train.val_every=0", "train.val_samples=0", "log.plots=false",
        "log.progress=false"]


def test_keys_the_planner_chooses_must_stay_unset():
    check_not_set(load(None, ["parallel.auto=true"]))  # defaults: nothing to refuse
    with pytest.raises(ConfigError, match=r"parallel\.tp, parallel\.zero are set"):
        check_not_set(load(None, ["parallel.auto=true", "parallel.tp=2", "parallel.zero=1"]))
    with pytest.raises(ConfigError, match="--cluster FILE"):
        resolve(load(None, ["parallel.auto=true"] + TINY), 4, "auto", nnodes=2)


def test_resolved_config_is_the_chosen_layout():
    cfg = load(None, ["parallel.auto=true"] + TINY)
    out, over, plan = resolve(cfg, 2, "dgx-h100", log=lambda *a: None)
    lay = plan["layout"]
    assert not out.parallel.auto and over[-1] == "parallel.auto=false"
    assert (out.parallel.dp * out.parallel.tp * out.parallel.pp) == 2
    assert (out.parallel.dp, out.parallel.tp, out.parallel.pp, out.parallel.zero) == \
        (lay["dp"], lay["tp"], lay["pp"], lay["zero"])
    assert out.train.micro_batch == lay["micro_batch"]
    # the overrides rebuild the same config from the user's keys (what the workers receive)
    assert load(None, ["parallel.auto=true"] + TINY + over) == out
    assert overrides(lay) == over


def test_auto_run_records_prediction_beside_measurement(tmp_path, corpus_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([PY, "-m", "plait", "train", "parallel.auto=true", *TINY,
                        f"data.path={corpus_path}", "--cluster", "dgx-h100", "--nproc", "2",
                        "--run-dir", str(run)], capture_output=True, text=True, timeout=240,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parallel.auto:" in r.stdout and "planned" in r.stdout, r.stdout
    summary = json.loads((run / "summary.json").read_text())
    plan = summary["plan"]
    assert plan == compare(json.loads((run / "plan.json").read_text()), summary, 8 * 32)
    ran = {**summary["layout"], "compression": "none", "sync": "every_step"}
    for k, v in plan["layout"].items():  # the run is the planned layout
        assert ran[k] == v, k
    assert plan["measured"]["step_s"] > 0 and plan["predicted"]["step_s"] > 0
    # model state by formula equals the tensors rank 0 holds, to the byte
    assert plan["predicted"]["model_state_bytes"] == plan["measured"]["model_state_bytes"]
    assert plan["error"]["model_state_bytes"] == 0.0
    assert plan["error"]["step_s"] == pytest.approx(
        plan["predicted"]["step_s"] / plan["measured"]["step_s"] - 1)


def test_plan_of_another_layout_is_not_reported(tmp_path):
    layout = {"dp": 2, "tp": 1, "pp": 1, "zero": 0, "micro_batch": 2, "schedule": "1f1b",
              "virtual_stages": 1, "activation_checkpointing": "none", "sequence_parallel": False,
              "compression": "none", "sync": "every_step"}
    (tmp_path / "plan.json").write_text(json.dumps({"layout": layout, "predicted": {}}))
    assert read_plan(tmp_path, dict(layout)) is not None
    assert read_plan(tmp_path, {**layout, "dp": 1, "tp": 2}) is None  # resumed under another one
    assert read_plan(None, layout) is None
