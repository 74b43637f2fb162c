"""Several processes through accelerate: the launch command, and a real 2-process CPU (gloo) run.

On a CPU-only machine `accelerate launch --multi_gpu` with the trainer's use_cpu starts gloo ranks: the
same code path as NCCL ranks on GPUs, minus the GPUs. GPU scaling is measured by bench/ (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi3_lora import events, jobs, train
from phi3_lora.config import RunConfig, save_yaml


def test_launch_command_for_several_processes(tmp_path):
    cmd = jobs.train_command(tmp_path / "config.yaml", tmp_path, resume=True, num_processes=4,
                             mixed_precision="bf16")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launch, tail = cmd[3:cmd.index("phi3_lora") - 1], cmd[cmd.index("phi3_lora") - 1:]
    assert "--multi_gpu" in launch
    assert launch[launch.index("--num_processes") + 1] == "4"
    assert launch[launch.index("--mixed_precision") + 1] == "bf16"
    assert launch[launch.index("--num_machines") + 1] == "1"
    assert tail == ["-m", "phi3_lora", "train", "--config", str(tmp_path / "config.yaml"), "--run-dir",
                    str(tmp_path), "--resume"]
    assert jobs.train_command(tmp_path / "c.yaml", tmp_path, resume=False)[:3] == [sys.executable, "-m", "phi3_lora"]


def test_effective_batch():
    cfg = RunConfig().replace(train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})
    assert train.effective_batch(cfg, 1) == 8
    assert train.effective_batch(cfg, 2) == 16
    assert train.effective_batch(cfg, 0) == 8  # CPU: one process


@pytest.mark.slow
def test_two_process_cpu_run_writes_one_set_of_events(tmp_path, tiny_phi3_dir):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "My name is Quillon."}]} for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig().replace(
        model={"name": str(tiny_phi3_dir), "load_in_4bit": False},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        train={"max_steps": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 2, "save_steps": 2,
               "warmup_ratio": 0.0, "max_length": 64, "num_processes": 2},
        data={"source": str(data), "eval_fraction": 0.0})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_yaml(cfg, run_dir / "config.yaml")
    cmd = jobs.train_command(run_dir / "config.yaml", run_dir, resume=False, num_processes=2)
    env = {**os.environ, "PHI3_LORA_JOB": "test", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = [e["type"] for e in events.read_events(run_dir)]
    assert kinds.count("start") == 1 and kinds.count("end") == 1, kinds
    assert kinds.count("log") == 4, kinds
    assert events.run_status(run_dir).state == "finished"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
