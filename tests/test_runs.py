"""runs.RunDir: the one owner of a run folder's layout, run ids, and the record of a run's process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi3_lora import cli
from phi3_lora.config import RunConfig, save_yaml
from phi3_lora.errors import UserError
from phi3_lora.runs import (RUNS_ENV, TOKEN_ENV, ProcessRecord, RunDir, adapter_config_file, default_runs_dir,
                            find_run, parse_checkpoint_step, read_active, run_dirs, run_in, valid_run_id,
                            write_active)


def make_run(root: Path, run_id: str = "20260101-000000-x") -> RunDir:
    run = RunDir(root / run_id)
    run.path.mkdir(parents=True)
    save_yaml(RunConfig(), run.config)
    return run


def test_checkpoint_names_parse_and_only_complete_ones_count(tmp_path):
    assert parse_checkpoint_step("checkpoint-12") == 12
    for bad in ("checkpoint-", "checkpoint-1a", "ckpt-3", "checkpoint--1", ".staging"):
        assert parse_checkpoint_step(bad) is None
    run = make_run(tmp_path)
    for step, complete in ((2, True), (10, True), (11, False)):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / RunDir.ADAPTER_CONFIG).write_text("{}")
        if complete:
            (run.checkpoint(step) / RunDir.TRAINER_STATE).write_text("{}")
    (run.staging / "checkpoint-12").mkdir(parents=True)
    assert [s for s, _ in run.checkpoint_dirs()] == [2, 10]  # numeric order, not text order
    assert [s for s, _ in run.checkpoint_dirs(complete=False)] == [2, 10, 11]
    assert run.last_checkpoint() == run.checkpoint(10)


def test_find_the_run_of_an_adapter(tmp_path):
    run = make_run(tmp_path)
    run.adapter.mkdir()
    (run.adapter / RunDir.ADAPTER_CONFIG).write_text("{}")
    save_yaml(RunConfig(), run.adapter / RunDir.CONFIG)  # the adapter's own copy does not make it a run
    run.checkpoint(3).mkdir(parents=True)
    for path in (run.path, run.adapter, run.checkpoint(3)):
        assert find_run(path) == run
    assert find_run(tmp_path / "elsewhere") is None
    assert adapter_config_file(run.adapter) == run.adapter / RunDir.CONFIG
    assert adapter_config_file(run.checkpoint(3)) == run.config


def test_run_ids_and_listing(tmp_path):
    for good in ("20261128-171502-smollm2-135m-instruct", "guide-1", "a.b_c"):
        assert valid_run_id(good)
    for bad in ("", ".hidden", "a/b", "..", "a/../b", "/abs", "x" * 200, None, 5):
        assert not valid_run_id(bad)
    old, new = make_run(tmp_path, "20250101-000000-a"), make_run(tmp_path, "20260101-000000-b")
    (tmp_path / ".uploads").mkdir()
    (tmp_path / "not-a-run").mkdir()
    assert run_dirs(tmp_path) == [new, old]
    assert run_in(tmp_path, old.run_id) == old
    for bad in ("../x", "not-a-run", ".uploads", ""):
        with pytest.raises(UserError, match="no run called"):
            run_in(tmp_path, bad)


def test_the_default_runs_folder_is_defined_once_and_the_cli_honours_the_environment(tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.delenv(RUNS_ENV, raising=False)
    assert default_runs_dir() == Path("runs")
    make_run(tmp_path, "20260101-000000-envrun")
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    assert default_runs_dir() == tmp_path
    assert cli.main(["runs"]) == 0
    assert "20260101-000000-envrun" in capsys.readouterr().out


def test_a_process_record_proves_identity(tmp_path):
    token = "t0k"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True,
                            env={**os.environ, TOKEN_ENV: token})
    try:
        assert ProcessRecord.of(proc.pid, token).is_ours_and_alive()
        assert not ProcessRecord.of(proc.pid, "another-token").is_ours_and_alive()  # someone else's process
        record = ProcessRecord.of(proc.pid, token)
        assert not ProcessRecord(proc.pid, record.start_time + 1, token).is_ours_and_alive()  # a reused pid
        assert not ProcessRecord(proc.pid, None, None).is_ours_and_alive()  # a bare pid proves nothing
        assert not ProcessRecord.of(os.getpid()).is_ours_and_alive()  # never this very process
        run = make_run(tmp_path)
        run.write_process(record)
        assert run.read_process() == record and run.process_alive()
        write_active(tmp_path, run.run_id, record)
        assert read_active(tmp_path) == (run.run_id, record)
    finally:
        proc.kill()
        proc.wait()
    assert not record.is_ours_and_alive()
    run.process_file.write_text(str(proc.pid))  # the old format: a bare pid
    assert run.read_process() == ProcessRecord(proc.pid, None, None) and not run.process_alive()
    run.process_file.write_bytes(b"\xff\xfe garbage")
    assert run.read_process() is None and not run.process_alive()
