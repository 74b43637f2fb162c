"""How long a run will take here: seconds per optimizer step, measured on this machine and cached.

A guess from FLOPs is wrong by several times on a shared CPU, so the estimate is a measurement: a few real
steps of the real trainer (`measure`, in a child process like every run), or the step times a finished run
wrote to its events (`record_run`). Both land in `runs/.step_times.json`, keyed by what decides a step's cost
on this machine (model, precision, micro-batch, max length, checkpointing, adapter kind); the newest wins.

    python -m phi3_lora.steptime_child CONFIG.yaml RUNS_DIR   # what `measure` runs
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phi3_lora import events
from phi3_lora.config import RunConfig, save_yaml
from phi3_lora.errors import UserError
from phi3_lora.runs import scrub_paths, write_atomic

CACHE = ".step_times.json"
TIMED_STEPS = 3          # after one warm-up step (allocations, kernel choice, first-batch tokenisation)
MEASURE_TIMEOUT_S = 600


@dataclass
class StepTime:
    """Seconds per micro-batch (an optimizer step is `gradient_accumulation_steps` of them)."""

    seconds_per_micro_batch: float
    measured_at: float
    how: str            # "3 timed steps" or "run <id>"

    def seconds_per_step(self, config: RunConfig) -> float:
        return self.seconds_per_micro_batch * config.train.gradient_accumulation_steps


def machine() -> str:
    """The hardware a measurement holds for: the GPU model and count, else the CPU and its cores."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.device_count()}x{torch.cuda.get_device_name(0)}"
    except (ImportError, RuntimeError):  # no torch / no driver: a CPU machine
        pass
    return f"cpu:{os.cpu_count()}x{platform.machine()}:{platform.processor() or '-'}"


def step_key(config: RunConfig, where: str | None = None) -> str:
    """What decides the cost of one micro-batch here (not the learning rate, epochs or seed)."""
    m, lora, t = config.model, config.lora, config.train
    parts = {"machine": where or machine(), "model": m.name, "4bit": m.load_in_4bit, "dtype": m.dtype,
             "attn": m.attn_implementation, "batch": t.per_device_train_batch_size, "max_length": t.max_length,
             "checkpointing": t.gradient_checkpointing, "packing": t.packing, "liger": t.use_liger_kernel,
             "targets": lora.target_modules, "slices": lora.fused_slices, "dora": lora.use_dora,
             "processes": t.num_processes}
    return json.dumps(parts, sort_keys=True)


def _read(runs_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(runs_dir) / CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def lookup(runs_dir: Path, config: RunConfig) -> StepTime | None:
    entry = _read(runs_dir).get(step_key(config))
    return StepTime(**entry) if entry else None


def record(runs_dir: Path, config: RunConfig, seconds_per_step: float, how: str) -> StepTime:
    """Store a measurement for this config's key (atomic replace; the newest measurement wins)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    value = StepTime(seconds_per_step / config.train.gradient_accumulation_steps, time.time(), how)
    table = _read(runs_dir)
    table[step_key(config)] = asdict(value)
    write_atomic(runs_dir / CACHE, json.dumps(table, indent=1))
    return value


def seconds_per_step(evs: list[dict[str, Any]]) -> float | None:
    """Pure: seconds per optimizer step from a run's log events, leaving out the first (warm-up) step."""
    starts = [i for i, e in enumerate(evs) if e.get("type") == "start"]
    session = evs[starts[-1]:] if starts else evs  # a resumed run: its last session only
    logs = [(int(e["step"]), float(e["elapsed_seconds"])) for e in session
            if e.get("type") == "log" and e.get("elapsed_seconds") is not None and e.get("step")]
    if len(logs) < 2 or logs[-1][0] <= logs[0][0]:
        return None
    return (logs[-1][1] - logs[0][1]) / (logs[-1][0] - logs[0][0])


def record_run(config: RunConfig, run_dir: Path) -> StepTime | None:
    """A finished (or stopped) run's own step time becomes the measurement for its key."""
    value = seconds_per_step(events.read_events(run_dir))
    return record(Path(run_dir).parent, config, value, f"run {Path(run_dir).name}") if value else None


def planned_steps(config: RunConfig, train_rows: int, processes: int = 1) -> int:
    """Optimizer steps the run will take: max_steps, else epochs × ceil(rows / global batch) (as Trainer counts)."""
    t = config.train
    if t.max_steps and t.max_steps > 0:
        return t.max_steps
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * max(1, processes)
    per_epoch = max(1, math.ceil(train_rows / global_batch))
    return max(1, math.ceil(per_epoch * t.num_train_epochs))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def describe(config: RunConfig, measured: StepTime | None, train_rows: int | None, processes: int = 1) -> str:
    """One sentence for the UI and the CLI."""
    if measured is None:
        return ("Time: not measured yet for this model and setup on this machine. Press \"Measure step time\" "
                f"({TIMED_STEPS + 1} real steps), or train once: a run's own step time is kept.")
    per_step = measured.seconds_per_step(config)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(measured.measured_at))
    source = f"{per_step:.2f} s per step ({measured.how}, {when})"
    if not train_rows and not (config.train.max_steps and config.train.max_steps > 0):
        return f"Time: {source}; the total appears once a dataset is chosen."
    steps = planned_steps(config, train_rows or 0, processes)
    return f"Time: about {duration(steps * per_step)} for {steps:,} steps × {source}."


# --- measuring: a child process runs a few steps of the real trainer ----------------------------

def measure(config: RunConfig, runs_dir: Path, timeout: float = MEASURE_TIMEOUT_S) -> StepTime:
    """Time a few real steps of this config here (in a child process, like a run) and cache the result."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=runs_dir, prefix=".measure-") as tmp:
        path = Path(tmp) / "config.yaml"
        save_yaml(config, path)
        cmd = [sys.executable, "-m", "phi3_lora.steptime_child", str(path), str(runs_dir)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"Measuring the step time took over {timeout:.0f} s.",
                            hint="The machine is busy or the setup is very slow; lower the batch size or max "
                                 "length, or train once and the run's own step time is kept.") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"Measuring the step time failed: {scrub_paths(last)}",
                            hint="The same settings would fail in a run; fix them (the message says how).")
    found = lookup(runs_dir, config)
    if found is None:
        raise UserError("Measuring the step time wrote no result.", hint="See the terminal for details.")
    return found
