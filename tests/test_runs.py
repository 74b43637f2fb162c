"""runs.RunDir: the one owner of a run folder's layout, run ids, and the record of a run's process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi3_lora import cli
from phi3_lora.config import RunConfig, save_yaml
from phi3_lora.errors import UserError
from phi3_lora.runs import (ACTIVE, RUNS_ENV, TOKEN_ENV, ProcessRecord, RunDir, adapter_config_file, default_runs_dir,
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
        for _ in range(600):  # until the child has exec'd: before that its environ is still ours, without the token
            if b"time.sleep" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
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


# --- one unreadable run never breaks the others (issue 13 item 6) ----------------------------------------------

def test_every_corruption_is_one_unreadable_run_and_the_rest_lists(tmp_path):
    from helpers.run_folders import corrupt_runs

    from phi3_lora import events, jobs

    expected = corrupt_runs(tmp_path)
    healthy = make_run(tmp_path, "20260101-000000-healthy")
    events.append_event(healthy.path, "start", step=0, max_steps=4)
    events.append_event(healthy.path, "end", status="finished", step=4, max_steps=4)

    infos = {info.run_id: info for info in jobs.list_runs(tmp_path)}
    assert set(infos) == set(expected) | {healthy.run_id}
    assert infos[healthy.run_id].status.state == "finished" and infos[healthy.run_id].config_error is None
    for run_id, phrase in expected.items():
        st = infos[run_id].status
        assert st.state == "unreadable" and st.reason.startswith("unreadable: ") and phrase in st.reason, (run_id, st)
        assert not st.active
        with pytest.raises(UserError, match="cannot be resumed|unreadable|not UTF-8|must be text|too deeply"):
            jobs.resume_run(run_id, tmp_path)
        assert isinstance(jobs.log_tail(run_id, tmp_path), str)
    # What the app shows after a restart is the same fresh read of the folder.
    assert jobs.active_run(tmp_path) is None
    (tmp_path / ACTIVE).write_bytes(b"\xff{torn")
    assert jobs.active_run(tmp_path) is None


# --- a pid file never makes Stop signal a process that is not the run's (issue 13 item 4) ----------------------

def test_stop_never_signals_a_reused_pid_nor_this_process(tmp_path):
    from phi3_lora import events, jobs

    run = make_run(tmp_path)
    events.append_event(run.path, "start", step=0, max_steps=10)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # an unrelated process, its own group
    try:
        true_start = ProcessRecord.of(sleeper.pid).start_time
        forged = [str(sleeper.pid),                                              # the old bare-pid format
                  ProcessRecord(sleeper.pid, true_start + 7, "run-token").to_json(),  # same pid, another process
                  ProcessRecord(sleeper.pid, true_start, "run-token").to_json(),  # same process, not our token
                  str(os.getpid()), ProcessRecord.of(os.getpid()).to_json()]      # this very process
        for text in forged:
            run.process_file.write_text(text)
            write_active(tmp_path, run.run_id, run.read_process() or ProcessRecord(0, None))
            assert jobs.active_run(tmp_path) is None
            st = jobs.stop_run(run.run_id, tmp_path, grace=1)
            assert st.state == "interrupted", (text, st)
            assert sleeper.poll() is None, f"Stop signalled an unrelated process ({text})"
        assert [e["type"] for e in events.read_events(run.path)] == ["start"]  # nothing recorded as stopped
    finally:
        sleeper.kill()
        sleeper.wait()


# --- a checkpoint in use is not rotated away (issue 13 item 8, Compare) ---------------------------------------

def test_rotation_skips_a_pinned_checkpoint_until_it_is_released(tmp_path):
    from phi3_lora.holds import CheckpointGone, pin_checkpoint, rotate_checkpoints

    run = make_run(tmp_path)
    for step in (1, 2, 3):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / RunDir.ADAPTER_CONFIG).write_text("{}")
    with pin_checkpoint(run.checkpoint(1)):
        assert rotate_checkpoints(run, keep=1) == [run.checkpoint(2)]
        assert run.checkpoint(1).exists() and run.checkpoint(3).exists()
    assert rotate_checkpoints(run, keep=1) == [run.checkpoint(1)]  # released: the next rotation removes it
    with pytest.raises(CheckpointGone):
        with pin_checkpoint(run.checkpoint(2)):
            pass


def test_a_process_caught_inside_exec_is_still_recognised_as_ours(monkeypatch):
    """Popen returns once the child has released it inside execve, before the kernel has set the new
    environment's bounds: /proc/PID/environ reads empty for a moment. The run started a moment ago must still be
    ours (else a second Start gets through); a process whose environment stays empty is not."""
    import builtins

    from phi3_lora import runs
    from phi3_lora.runs import TOKEN_ENV, ProcessRecord

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            env={**os.environ, TOKEN_ENV: "tok"})
    try:
        record = ProcessRecord.of(proc.pid, "tok")
        assert record.is_ours_and_alive()
        real_open, empty_reads = builtins.open, {"left": 3}

        def mid_exec_open(path, *args, **kwargs):  # the first reads see the empty environment of a process in exec
            if str(path) == f"/proc/{proc.pid}/environ" and empty_reads["left"] > 0:
                empty_reads["left"] -= 1
                return real_open(os.devnull, "rb")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", mid_exec_open)
        assert record.is_ours_and_alive() and empty_reads["left"] == 0
        empty_reads["left"] = 10**6  # an environment that never fills: not ours, after the short wait
        monkeypatch.setattr(runs, "ENVIRON_WAIT_S", 0.2)
        started = time.monotonic()
        assert not ProcessRecord.of(proc.pid, "tok").is_ours_and_alive()
        assert 0.2 <= time.monotonic() - started < 0.9  # the shorter wait was read at call time
    finally:
        proc.kill()
        proc.wait()


def test_scrub_paths_names_no_home_folder_nor_user(tmp_path):
    """A message a visitor sees names no home folder (its name is a user name), in any spelling: ~/…, ~user/…, the
    home folder itself, a folder above it; a file inside still shows by its name, and '~5 s' stays text."""
    import pwd

    from phi3_lora.runs import scrub_paths, shown_path

    home = os.path.expanduser("~")
    other = next((e for e in pwd.getpwall() if e.pw_dir not in ("/", "", home) and e.pw_dir.count("/") >= 2), None)
    said = {
        f"saved in {home}.": "saved in ~.",
        f"saved in {home}/": "saved in ~",
        "read ~/runs/data.jsonl: no rows": "read data.jsonl: no rows",
        "read ~alice/data/x.jsonl.": "read x.jsonl.",
        "read ~alice/ now": "read ~ now",
        f"under {os.path.dirname(home)}": "under ~" if os.path.dirname(home) != "/" else f"under {os.path.dirname(home)}",
        "about ~5 s, ~30% slower, org/model": "about ~5 s, ~30% slower, org/model",
    }
    if other is not None:
        said[f"owned by {other.pw_dir}"] = "owned by ~"
    for text, shown in said.items():
        assert scrub_paths(text) == shown, text
    assert shown_path(home) == "~" and shown_path(Path(home) / "x.yaml") == "x.yaml"
    user = os.path.basename(home)
    assert user not in scrub_paths(f"{home} and {home}/ and ~{user}/")


def _old_exports(runs: Path) -> Path:
    """<runs>-exports as versions before runs/.exports left it: a folder per run with its download zips, a zip's
    verification and the temporary names a crash left."""
    from phi3_lora.runs import old_exports_dir

    old = old_exports_dir(runs)
    for run_id, names in {"20261128-171502-smollm2-135m-instruct": [
            "20261128-171502-smollm2-135m-instruct-adapter.zip",
            "20261128-171502-smollm2-135m-instruct-adapter.zip.verification.json",
            ".20261128-171502-smollm2-135m-instruct-adapter.zip.verification.json.tmp",
            "20261128-171502-smollm2-135m-instruct-adapter.zip.tmp", ".x-adapter.verify-4242.zip",
            "merged-download.zip", "20261128-171502-smollm2-135m-instruct-merged.zip", ".gguf-f16-download.zip.tmp"],
            "20261201-090000-phi-3-mini-4k-instruct": []}.items():
        (old / run_id).mkdir(parents=True)
        for name in names:
            (old / run_id / name).write_bytes(b"PK")
    return old


def test_the_old_exports_folder_goes_at_startup_only_when_all_in_it_is_ours(tmp_path: Path,
                                                                              tiny_llama_dir: Path) -> None:
    """Earlier versions built downloads in <runs>-exports (served then, unused now): the app removes it when it starts,
    once, but only when every entry is what they wrote there; a file, a folder or a link of anybody else keeps it."""
    import shutil

    from phi3_lora.runs import remove_old_exports
    from phi3_lora.ui import build_app

    runs = tmp_path / "runs"
    old = _old_exports(runs)
    build_app(runs, default_model=str(tiny_llama_dir))
    assert not old.exists()
    assert not remove_old_exports(runs)  # nothing left to do
    for foreign in ("notes.txt", "model.safetensors", "sub/"):
        old = _old_exports(runs)
        target = old / "20261201-090000-phi-3-mini-4k-instruct" / foreign.rstrip("/")
        target.mkdir() if foreign.endswith("/") else target.write_text("mine")
        assert not remove_old_exports(runs) and target.exists(), foreign
        shutil.rmtree(old)
    old = _old_exports(runs)
    (old / "not a run").mkdir()
    assert not remove_old_exports(runs) and old.is_dir()
    (old / "not a run").rmdir()
    outside = tmp_path / "precious.zip"
    outside.write_bytes(b"PK")
    os.symlink(outside, old / "20261201-090000-phi-3-mini-4k-instruct" / "link.zip")
    assert not remove_old_exports(runs) and outside.is_file()
    (old / "20261201-090000-phi-3-mini-4k-instruct" / "link.zip").unlink()
    assert remove_old_exports(runs) and not old.exists()
