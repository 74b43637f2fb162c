"""Several processes through accelerate: the launch command, and a real 2-process CPU (gloo) run.

On a CPU-only machine `accelerate launch --multi_gpu` with the trainer's use_cpu starts gloo ranks: the
same code path as NCCL ranks on GPUs, minus the GPUs. GPU scaling is measured by bench/ (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.training import write_rows
from phi3_lora import events, jobs, options, train
from phi3_lora.config import RunConfig, save_yaml
from phi3_lora.runs import TOKEN_ENV, ProcessRecord, RunDir, pid_alive


def test_launch_command_for_several_processes(tmp_path):
    cmd = jobs.train_command(RunDir(tmp_path).config, tmp_path, resume=True, num_processes=4,
                             mixed_precision="bf16")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launch, tail = cmd[3:cmd.index("phi3_lora") - 1], cmd[cmd.index("phi3_lora") - 1:]
    assert "--multi_gpu" in launch
    assert launch[launch.index("--num_processes") + 1] == "4"
    assert launch[launch.index("--mixed_precision") + 1] == "bf16"
    assert launch[launch.index("--num_machines") + 1] == "1"
    assert tail == ["-m", "phi3_lora", "train", "--config", str(RunDir(tmp_path).config), "--run-dir",
                    str(tmp_path), "--resume"]
    assert jobs.train_command(tmp_path / "c.yaml", tmp_path, resume=False)[:3] == [sys.executable, "-m", "phi3_lora"]


def test_effective_batch():
    cfg = RunConfig().replace(train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})
    assert options.effective_batch(cfg, 1) == 8
    assert options.effective_batch(cfg, 2) == 16
    assert options.effective_batch(cfg, 0) == 8  # CPU: one process


@pytest.mark.slow
def test_two_process_cpu_run_writes_one_set_of_events(tmp_path, tiny_phi3_dir):
    run_dir = _two_rank_run_dir(tmp_path, tiny_phi3_dir, max_steps=4, save_steps=2)
    cmd = jobs.train_command(RunDir(run_dir).config, run_dir, resume=False, num_processes=2)
    env = {**os.environ, "PHI3_LORA_JOB": "test", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = [e["type"] for e in events.read_events(run_dir)]
    assert kinds.count("start") == 1 and kinds.count("end") == 1, kinds
    assert kinds.count("log") == 4, kinds
    assert events.run_status(run_dir).state == "finished"
    run = RunDir(run_dir)
    assert run.has_adapter()
    assert [step for step, _ in run.checkpoint_dirs()] == [2, 4] and not run.staging.exists()
    # Each rank's RNG state lands in the checkpoint (rank 0 renames the staging folder after every rank wrote).
    for step in (2, 4):
        files = {p.name for p in run.checkpoint(step).iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= files, files


def test_stop_reaches_ranks_that_lead_their_own_session(tmp_path):
    """torchrun starts each rank in a new session, outside the launcher's process group: when the launcher
    outlives the grace period, Stop's SIGKILL must still reach the ranks (here: both ignore SIGTERM)."""
    script = tmp_path / "launcher.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "rank = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], start_new_session=True)\n"
        "open(sys.argv[1] + '.tmp', 'w').write(str(rank.pid))\n"
        "import os; os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "time.sleep(600)\n")
    runs = tmp_path / "runs"
    run_dir = runs / "r1"
    run_dir.mkdir(parents=True)
    save_yaml(RunConfig(), RunDir(run_dir).config)
    rank_file = tmp_path / "rank.pid"
    launcher = subprocess.Popen([sys.executable, str(script), str(rank_file)], start_new_session=True,
                                env={**os.environ, TOKEN_ENV: "launcher"})
    rank_pid = None
    try:
        RunDir(run_dir).write_process(ProcessRecord.of(launcher.pid, "launcher"))
        deadline = time.time() + 60
        while not rank_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        rank_pid = int(rank_file.read_text())
        assert jobs.descendants(launcher.pid) == [rank_pid]
        threading.Thread(target=launcher.wait, daemon=True).start()
        jobs.stop_run("r1", runs, grace=1.0)
        assert not pid_alive(launcher.pid)
        assert not pid_alive(rank_pid), "a rank outlived Stop"
    finally:
        for pid in (launcher.pid, rank_pid):
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_phi3_dir):
    """A SIGTERM seen by one rank only (it can land between two ranks' checks) stops all of them at one step,
    with one checkpoint holding every rank's RNG state, instead of leaving a rank alone in an all-reduce."""
    run_dir = _two_rank_run_dir(tmp_path, tiny_phi3_dir, max_steps=400, save_steps=1000)
    cmd = jobs.train_command(RunDir(run_dir).config, run_dir, resume=False, num_processes=2)
    env = {**os.environ, "PHI3_LORA_JOB": "test", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 300
        while events.run_status(run_dir).step < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
        rank1 = [p for p in jobs.descendants(proc.pid) if _env(p).get("RANK") == "1"]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    st = events.run_status(run_dir)
    assert st.state == "stopped", out[-3000:]
    ckpt = RunDir(run_dir).last_checkpoint()
    assert ckpt is not None and ckpt == RunDir(run_dir).checkpoint(st.step)
    files = {p.name for p in ckpt.iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= files, files
    assert not RunDir(run_dir).staging.exists()


def _env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _two_rank_run_dir(tmp_path: Path, model_dir: Path, max_steps: int, save_steps: int) -> Path:
    data = write_rows(tmp_path / "d.jsonl", n=16, question="Question {i}?")
    cfg = RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": False},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        train={"max_steps": max_steps, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
               "save_steps": save_steps, "warmup_ratio": 0.0, "max_length": 64, "num_processes": 2,
               "logging_steps": 1},
        data={"source": str(data), "eval_fraction": 0.0})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_yaml(cfg, RunDir(run_dir).config)
    return run_dir


def test_a_single_process_keeps_one_gpu():
    """`num_processes: 1` on a 2-GPU machine: the plain CLI process saw both GPUs and trl refused the
    nn.DataParallel that Trainer then uses (seen on an H200 x2). Ranks of a launch keep their own view."""
    env: dict[str, str] = {}
    assert train.pin_single_gpu(env) == "0" and env == {"CUDA_VISIBLE_DEVICES": "0"}
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert train.pin_single_gpu(env) == "2" and env["CUDA_VISIBLE_DEVICES"] == "2"
    for env in ({"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "1"},
                {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}):
        before = dict(env)
        assert train.pin_single_gpu(env) is None and env == before
