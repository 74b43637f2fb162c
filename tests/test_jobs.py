"""Background runs as real child processes: one at a time, Stop, Resume, kill -9, re-attach."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.train_hooks.sitecustomize import SAVE_ENV, STEP_ENV
from helpers.training import slow_config, wait_until
from phi3_lora import events, jobs
from phi3_lora.errors import UserError
from phi3_lora.runs import (TOKEN_ENV, ProcessRecord, RunDir, checkpoint_name, parse_checkpoint_step, pid_alive,
                            write_active)

pytestmark = pytest.mark.slow


def test_stop_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_phi3_dir):
    runs = tmp_path / "runs"
    cfg = slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=1000)
    run_id = jobs.start_run(cfg, runs)
    assert jobs.active_run(runs) == run_id
    wait_until(lambda: events.run_status(runs / run_id).step >= 3)

    # One run per machine: a second Start is refused with what is running.
    with pytest.raises(UserError, match=f"already going.*{run_id}"):
        jobs.start_run(cfg, runs)
    # ... and so is the CLI's foreground train in the same runs folder (it trained beside the app's run)
    from phi3_lora import config as cfgmod

    cfgmod.save_yaml(cfg, tmp_path / "run.yaml")
    cli = subprocess.run([sys.executable, "-m", "phi3_lora", "train", "--config", str(tmp_path / "run.yaml"),
                          "--runs-dir", str(runs)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and f"already going in {runs}: {run_id}" in cli.stderr, cli.stderr[-800:]
    assert "Traceback" not in cli.stderr and f"phi3_lora stop {run_id}" in cli.stderr
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == [run_id]  # no second run folder

    pid = RunDir(runs / run_id).read_process().pid
    t0 = time.time()
    st = jobs.stop_run(run_id, runs)
    assert time.time() - t0 < 30 and not pid_alive(pid)
    assert st.state == "stopped" and jobs.active_run(runs) is None
    ckpt = RunDir(runs / run_id).last_checkpoint()
    assert ckpt is not None, "Stop must save a checkpoint even when save_steps was not reached"
    stopped_at = parse_checkpoint_step(ckpt.name)
    assert stopped_at >= 3

    # The checkpoint is a loadable adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_phi3_dir), str(ckpt))

    # Resume with fewer steps left so the test ends quickly.
    cfg_path = RunDir(runs / run_id).config
    cfg_path.write_text(cfg_path.read_text().replace("max_steps: 400", f"max_steps: {stopped_at + 4}"))
    jobs.resume_run(run_id, runs)
    st = jobs.wait_for(run_id, runs, timeout=180)
    assert st.state == "finished", (st, jobs.log_tail(run_id, runs))
    start_events = [e for e in events.read_events(runs / run_id) if e["type"] == "start"]
    assert start_events[-1]["resumed_from"] == str(ckpt)
    assert start_events[-1]["step"] == stopped_at
    assert RunDir(runs / run_id).has_adapter()


def test_kill_9_is_interrupted_and_resume_loses_at_most_one_save_interval(tmp_path, tiny_phi3_dir):
    runs = tmp_path / "runs"
    save_steps = 4
    cfg = slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=save_steps)
    run_id = jobs.start_run(cfg, runs)
    wait_until(lambda: RunDir(runs / run_id).last_checkpoint() is not None
               and events.run_status(runs / run_id).step >= 2 * save_steps + 1)
    pid = RunDir(runs / run_id).read_process().pid
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid))
    st = events.run_status(runs / run_id)
    assert st.state == "interrupted" and "Resume" in st.reason
    killed_at = st.step
    ckpt_step = parse_checkpoint_step(RunDir(runs / run_id).last_checkpoint().name)
    assert killed_at - ckpt_step <= save_steps

    # A restarted app (a fresh look at the folder) sees the same run and no active one.
    assert [r.run_id for r in jobs.list_runs(runs)] == [run_id] and jobs.active_run(runs) is None

    cfg_path = RunDir(runs / run_id).config
    cfg_path.write_text(cfg_path.read_text().replace("max_steps: 400", f"max_steps: {ckpt_step + 2}"))
    jobs.resume_run(run_id, runs)
    st = jobs.wait_for(run_id, runs, timeout=180)
    assert st.state == "finished" and st.step == ckpt_step + 2, jobs.log_tail(run_id, runs)


def test_staging_left_by_a_kill_during_save_is_never_a_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    half = run.staging / checkpoint_name(8)
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    good = run.checkpoint(4)
    good.mkdir(parents=True)
    (good / RunDir.TRAINER_STATE).write_text("{}")
    assert run.last_checkpoint() == good


def test_launch_command_is_the_cli_or_accelerate():
    one = jobs.train_command(Path("r/config.yaml"), Path("r"), resume=True)
    assert one[1:] == ["-m", "phi3_lora", "train", "--config", "r/config.yaml", "--run-dir", "r", "--resume"]
    two = jobs.train_command(Path("r/config.yaml"), Path("r"), resume=False, num_processes=2)
    assert two[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and "2" in two
    assert two[-6:] == ["phi3_lora", "train", "--config", "r/config.yaml", "--run-dir", "r"]


def _fake_active(runs: Path, run_id: str, ended: bool, seconds: float):
    """A run folder whose diary says started (and maybe ended), held by a live process for `seconds`."""
    run_dir = runs / run_id
    run_dir.mkdir(parents=True)
    events.append_event(run_dir, "start", step=0, max_steps=8)
    if ended:
        events.append_event(run_dir, "end", status="finished", step=8)
    token = "fake-run"
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"],
                            env={**os.environ, TOKEN_ENV: token})
    record = ProcessRecord.of(proc.pid, token)
    RunDir(run_dir).write_process(record)
    write_active(runs, run_id, record)
    return proc


def test_start_right_after_a_run_ends_waits_for_its_exit(tmp_path):
    """The end event is written a moment before the process exits; Start in that moment must not be refused
    (a fresh-clone CI run hit it: 'already going ... at step 8/8')."""
    runs = tmp_path / "runs"
    proc = _fake_active(runs, "old", ended=True, seconds=2)
    t0 = time.monotonic()
    jobs._check_free(runs, 0)  # no UserError: waited for the exit
    assert 1.0 < time.monotonic() - t0 < jobs.EXIT_GRACE_S
    proc.wait()


def test_a_run_still_training_is_refused_at_once(tmp_path):
    runs = tmp_path / "runs"
    proc = _fake_active(runs, "live", ended=False, seconds=60)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"already going on this machine: live\."):
            jobs._check_free(runs, 0)
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.wait()


# --- Stop keeps its word when steps are slow (issue 13 item 7) -----------------------------------------------

def test_stop_waits_for_a_slow_step_and_a_kill_says_what_resume_does(tmp_path, tiny_phi3_dir, monkeypatch,
                                                                   train_hooks):
    monkeypatch.setenv(STEP_ENV, "3")  # the training process's steps and saves are slow
    monkeypatch.setenv(SAVE_ENV, "2")
    runs = tmp_path / "runs"
    run_id = jobs.start_run(slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=1000), runs)
    run = RunDir(runs / run_id)
    wait_until(lambda: events.run_status(run.path).step >= 2, timeout=240)

    # Stop with a fixed grace of 1 s would kill mid-step; the grace adapts to the measured 3 s steps instead.
    st = jobs.stop_run(run_id, runs, min_grace=1)
    grace = [e for e in events.read_events(run.path) if e["type"] == "stop"][-1]["grace_seconds"]
    assert st.state == "stopped" and "killed" not in st.reason and grace > 3 + 2, (st, grace)
    stopped_at = parse_checkpoint_step(run.last_checkpoint().name)
    assert stopped_at == st.step and st.resume_text.startswith(f"Resume continues from step {stopped_at}")

    # Resume says where it really starts; a Stop that must kill mid-step says so, and from where Resume goes on.
    assert jobs.resume_point(run_id, runs) == (stopped_at, run.last_checkpoint())
    jobs.resume_run(run_id, runs)
    wait_until(lambda: (s := events.run_status(run.path)).state == "running" and s.step >= stopped_at + 1,
               timeout=240)
    st = jobs.stop_run(run_id, runs, grace=0.5)
    assert st.state == "stopped" and "killed after waiting 0 s" in st.reason, st
    assert f"no checkpoint was saved at step {st.step}" in st.reason and re.search(r"a step takes about \d+ s", st.reason)
    assert f"Resume continues from step {stopped_at}" in st.reason
    assert jobs.resume_point(run_id, runs)[0] == stopped_at
    assert events.run_status(run.path).attempts == [stopped_at]


def test_a_checkpoint_compare_holds_survives_the_running_jobs_rotation(tmp_path, tiny_phi3_dir):
    """save_total_limit 1 and a save every step: Compare's checkpoint stays while its request runs (issue 13
    item 8: 15 of 20 queued requests failed), and once gone the message names the newest one."""
    from phi3_lora.adapter_folder import locate_adapter
    from phi3_lora.ui.adapters import adapter_choices, hold_checkpoint, resolve_source

    runs = tmp_path / "runs"
    cfg = slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=1)
    cfg = cfg.replace(train={"save_total_limit": 1})
    run_id = jobs.start_run(cfg, runs)
    run = RunDir(runs / run_id)
    try:
        value = wait_until(lambda: next((v for _, v in adapter_choices(runs) if "checkpoint-" in v), None))
        held = resolve_source(runs, value)
        with hold_checkpoint(held):
            step = parse_checkpoint_step(held.name)
            wait_until(lambda: (last := run.last_checkpoint()) is not None
                       and parse_checkpoint_step(last.name) >= step + 3)
            assert held.exists(), "the running job rotated away a checkpoint a request holds"
            ref = locate_adapter(held)  # still complete and loadable
            assert ref.adapter_dir == held and (held / "adapter_model.safetensors").is_file()
        wait_until(lambda: not held.exists())  # released: a later rotation removes it
        with pytest.raises(UserError, match=rf"{held.name} is gone.*the newest now is {run_id} · checkpoint-\d+"):
            resolve_source(runs, value)
    finally:
        jobs.stop_run(run_id, runs, grace=10)


def test_the_apps_start_is_refused_while_the_cli_trains_in_its_runs_folder(tmp_path, tiny_phi3_dir):
    # The CLI's foreground train refused beside the app's run, but the app's Start did not know of a CLI run: the
    # CLI now records itself as the runs folder's active run, under the lock Start takes.
    from phi3_lora import config as cfgmod

    runs = tmp_path / "runs"
    cfg = slow_config(tiny_phi3_dir, tmp_path, max_steps=400, save_steps=1000)
    cfgmod.save_yaml(cfg, tmp_path / "run.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PHI3_LORA_JOB"}
    cli = subprocess.Popen([sys.executable, "-m", "phi3_lora", "train", "--config", str(tmp_path / "run.yaml"),
                            "--runs-dir", str(runs)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=env)
    try:
        wait_until(lambda: jobs.active_run(runs) is not None, timeout=180)
        run_id = jobs.active_run(runs)
        wait_until(lambda: events.run_status(runs / run_id).step >= 1, timeout=180)
        with pytest.raises(UserError, match=f"already going.*{run_id}"):
            jobs.start_run(cfg, runs)
        assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == [run_id]
        jobs.stop_run(run_id, runs)  # the app's Stop reaches the CLI's run (its process record)
        assert cli.wait(timeout=120) == 0, cli.stderr.read()[-800:]
    finally:
        if cli.poll() is None:
            cli.kill()
    assert events.run_status(runs / run_id).state == "stopped" and jobs.active_run(runs) is None
