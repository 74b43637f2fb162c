"""train.report_to: trackers named in the schema, a missing package refused with its pip line, and the offline
ones (TensorBoard, Trackio) read back after a real tiny run: the loss they logged is the loss the run logged."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml

from helpers.training import write_rows
from phi3_lora import jobs, trackers, train
from phi3_lora.config import RunConfig, dump_yaml, from_dict
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir


def test_report_to_accepts_lists_names_and_none():
    assert RunConfig().train.report_to == []
    assert RunConfig().replace(train={"report_to": "tensorboard, trackio"}).train.report_to == ["tensorboard", "trackio"]
    assert RunConfig().replace(train={"report_to": ["none"]}).train.report_to == []
    assert RunConfig().replace(train={"report_to": "none"}).train.report_to == []
    with pytest.raises(UserError, match="unknown tracker.*comet"):
        RunConfig().replace(train={"report_to": ["comet"]})
    with pytest.raises(UserError, match="'none' together"):
        RunConfig().replace(train={"report_to": ["none", "wandb"]})
    config = RunConfig().replace(train={"report_to": ["trackio"]})
    assert from_dict(yaml.safe_load(dump_yaml(config))).train.report_to == ["trackio"]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_a_message_with_its_pip_line(tracker, tmp_path):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    config = RunConfig().replace(train={"report_to": [tracker]}, data={"source": str(tmp_path / "d.jsonl")})
    with pytest.raises(UserError, match=f"pip install {tracker}"):
        jobs.start_run(config, tmp_path / "runs", check_data=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no process, no run folder
    with pytest.raises(UserError, match=f"asks for {tracker}"):
        train.run(config, tmp_path / "run")


def test_dashboard_commands_point_at_the_run(tmp_path):
    shown = dict(trackers.dashboards(["tensorboard", "trackio", "mlflow", "wandb"], tmp_path / "r1"))
    assert shown["tensorboard"].startswith(f"tensorboard --logdir {tmp_path / 'r1' / 'tensorboard'}")
    assert shown["trackio"].startswith("trackio show --project phi3_lora")
    assert "mlflow ui --backend-store-uri file://" in shown["mlflow"] and "wandb.ai" in shown["wandb"]


@pytest.mark.slow
def test_tensorboard_and_trackio_log_the_runs_loss(tmp_path, tiny_llama_dir):
    if trackers.missing_packages(["tensorboard", "trackio"]):
        pytest.skip("tensorboard/trackio not installed (requirements-dev.txt pins them)")
    data = write_rows(tmp_path / "d.jsonl", n=6, question="hi {i}", answer="Quillon here.")
    run_dir = tmp_path / "runs" / "r1"
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"))
    done = subprocess.run([sys.executable, "-m", "phi3_lora", "train", "--data", str(data), "--run-dir", str(run_dir),
                           "--model.name", str(tiny_llama_dir), "--model.load_in_4bit", "false",
                           "--train.max_steps", "3", "--train.max_length", "96", "--data.eval_fraction", "0",
                           "--train.report_to", "[tensorboard,trackio]"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    logged = [json.loads(line) for line in RunDir(run_dir).events.read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in logged if e.get("type") == "log" and e.get("loss") is not None}
    assert len(losses) == 3, logged

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    board = {s.step: s.value for s in events.Scalars("train/loss")}
    assert board.keys() == losses.keys()
    assert all(abs(board[k] - losses[k]) < 1e-4 for k in losses), (board, losses)

    with sqlite3.connect(tmp_path / "trackio" / "phi3_lora.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ?", ("r1",)).fetchall()
    # Trackio numbers its own log calls (0, 1, ...); the losses come in the run's step order.
    tracked = [json.loads(m)["train/loss"] for _, m in sorted(rows) if "train/loss" in json.loads(m)]
    expected = [losses[k] for k in sorted(losses)]
    assert len(tracked) == len(expected) and all(abs(a - b) < 1e-4 for a, b in zip(tracked, expected)), \
        (tracked, expected)
