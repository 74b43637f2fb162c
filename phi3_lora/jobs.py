"""Start, stop, resume and find training runs; each run is its own process.

Training never runs inside the app: `start_run` launches the same CLI a user runs
(`python -m phi3_lora train --config runs/<id>/config.yaml --run-dir runs/<id>`) in a new
process session, so Stop can end the whole process group, an OOM or crash leaves the app up,
and the run outlives a closed tab or a restarted app. All state is on disk, laid out by runs.py:
the active run of the folder, each run's process record (pid, start time, a per-run token in the
child's environment) and its train.log (the child's stdout + stderr).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from phi3_lora import events, holds, runs, uploads
from phi3_lora.config import RunConfig, load_yaml, save_yaml
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir

STOP_GRACE_SECONDS = 20.0


@dataclass
class RunInfo:
    run_id: str
    run_dir: Path
    status: events.RunStatus
    model: str
    created: float
    config_error: str | None = None  # why config.yaml cannot be read (the run is listed as unreadable)


def active_run(runs_dir: Path) -> str | None:
    """The run id whose process is alive and provably its own, or None (a stale record is ignored)."""
    found = runs.read_active(runs_dir)
    return found[0] if found and found[1].is_ours_and_alive() else None


def claim_foreground(run_dir: Path, registers: bool) -> None:
    """One run trains at a time in a runs folder: refuse while another trains there (the app's Start or
    --background), and, training in the runs folder the app reads (`registers`), record this process as its active
    run, checked and written under the lock the app's Start takes, so the app refuses a second run meanwhile. A
    run's own job process (PHI3_LORA_JOB) is the run jobs recorded: never refused, never re-recorded."""
    runs_dir, job = run_dir.parent, os.environ.get("PHI3_LORA_JOB")
    # No lock file in a folder the app never reads (a --run-dir elsewhere).
    with runs.locked(runs_dir) if registers else contextlib.nullcontext():
        active = active_run(runs_dir)
        if active and active != run_dir.name:
            raise UserError(f"A training run is already going in {runs_dir}: {active}.",
                            hint=f"One run trains at a time: wait for it to finish, or stop it (python -m phi3_lora "
                                 f"stop {active} --runs-dir {runs_dir}).")
        if registers and not job:
            runs.write_active(runs_dir, run_dir.name, runs.ProcessRecord.of(os.getpid()))


ENDED = ("finished", "stopped", "failed")
EXIT_GRACE_S = 20.0  # a run whose diary says it ended may still be exiting (freeing memory, closing files)


def _active_unless_ending(runs_dir: Path, grace_s: float = EXIT_GRACE_S) -> str | None:
    """`active_run`, but a run that has already written its end is given `grace_s` to exit, so Start pressed
    right after a run finishes starts the next one instead of reporting the old one as still going."""
    deadline = time.monotonic() + grace_s
    while (busy := active_run(runs_dir)) and time.monotonic() < deadline:
        if events.run_status(Path(runs_dir) / busy).state not in ENDED:
            return busy
        time.sleep(0.2)
    return busy


def _busy_error(runs_dir: Path, run_id: str) -> UserError:
    # No step number: a toast showing it would go stale beside the live progress bar.
    return UserError(f"A training run is already going on this machine: {run_id}.",
                     hint="Wait for it to finish or press Stop on it; one run trains at a time.")


def new_run_id(config: RunConfig, now: float | None = None) -> str:
    """Sortable and readable: 20261128-171502-smollm2-135m-instruct."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now or time.time()))
    slug = re.sub(r"[^a-z0-9]+", "-", config.model.name.split("/")[-1].split(":")[-1].lower()).strip("-")[:32]
    return f"{stamp}-{slug or 'run'}"


def train_command(config_path: Path, run_dir: Path, resume: bool, num_processes: int = 1,
                  mixed_precision: str = "no") -> list[str]:
    """The child's argv: the CLI, or `accelerate launch` of it when several GPUs train (one process per GPU,
    DDP; on a CPU-only machine the same command runs gloo processes, which the tests use)."""
    tail = ["-m", "phi3_lora", "train", "--config", str(config_path), "--run-dir", str(run_dir)]
    if resume:
        tail.append("--resume")
    if num_processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--multi_gpu", "--num_machines", "1", "--mixed_precision", mixed_precision,
                "--dynamo_backend", "no", *tail]
    return [sys.executable, *tail]


def launch_mixed_precision() -> str:
    """What accelerate is told; the trainer's own bf16/fp16 choice (resolve_dtype) matches it."""
    try:
        import torch

        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    except (ImportError, RuntimeError):  # no torch, or a driver that does not answer: no GPU
        pass
    return "no"


# What one checkpoint holds besides the LoRA weights and AdamW state: tokenizer files (up to ~10 MB for large
# vocabularies), trainer / RNG / scheduler state. The margin covers logs, events and not filling a disk to the byte.
CHECKPOINT_OVERHEAD_BYTES = 32 * 2**20
DISK_MARGIN_BYTES = 128 * 2**20
FALLBACK_TRAINABLE_PARAMS = 32_000_000  # ~Phi-3-mini with r=16 on every linear layer, when the model can't be read


def disk_needed(trainable_params: int, save_total_limit: int) -> int:
    """Bytes a run's folder can grow to (pure): each checkpoint holds the adapter (fp32) and AdamW's two moments
    (fp32), plus overhead; save_total_limit of them are kept and one more exists while the next is written,
    before the oldest is rotated away; then the final adapter and a margin."""
    adapter = 4 * trainable_params
    checkpoint = adapter + 8 * trainable_params + CHECKPOINT_OVERHEAD_BYTES
    return checkpoint * (save_total_limit + 1) + adapter + CHECKPOINT_OVERHEAD_BYTES + DISK_MARGIN_BYTES


def trainable_params_for(config: RunConfig) -> int:
    """LoRA parameters of this run from the model's config alone (no weights loaded); a safe guess if unreadable."""
    try:
        from transformers import AutoConfig

        from phi3_lora import models, targets

        name, _ = models.resolve_name(config.model.name)
        model_config = AutoConfig.from_pretrained(models.local_path(name), trust_remote_code=False)
    except (UserError, OSError, ValueError, KeyError):  # no such model, offline Hub id, unreadable config: the
        # training process reports those itself
        return FALLBACK_TRAINABLE_PARAMS
    try:
        return targets.count_lora_parameters(model_config, config.lora)[0]
    except UserError:  # target_modules / modules_to_save this model lacks: refused before any process starts
        raise
    except Exception:  # an architecture transformers cannot build on the meta device
        return FALLBACK_TRAINABLE_PARAMS


def check_disk(runs_dir: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(runs_dir).free
    if free < need_bytes:
        raise UserError(f"Not enough disk space to start: {_size(free)} free on the disk holding {runs_dir}; this "
                        f"run's checkpoints need about {_size(need_bytes)}.",
                        hint="Free some space (delete old runs or exports) or lower train.save_total_limit.")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def start_run(config: RunConfig, runs_dir: Path | None = None, *, need_bytes: int | None = None,
              check_data: bool = True, time_limit_s: float | None = None) -> str:
    """Validate, then launch a run in the background; returns its id. Busy machine or full disk -> UserError.

    need_bytes: free disk space required; None estimates it from the model and LoRA settings (`disk_needed`).
    time_limit_s: the process saves and stops after this long (a visitor's run: quotas.Limits.run_seconds)."""
    runs_dir = Path(runs_dir or runs.default_runs_dir())
    from phi3_lora import trackers

    trackers.require_installed(config.train.report_to)  # a missing tracker package is refused before any process
    if check_data:
        from phi3_lora import data

        data.load_data(config.data)  # bad data is refused here, before any process starts
    if need_bytes is None:
        need_bytes = disk_needed(trainable_params_for(config), config.train.save_total_limit)
    with runs.locked(runs_dir):
        _check_free(runs_dir, need_bytes)
        run_id = new_run_id(config)
        while (runs_dir / run_id).exists():
            run_id += "-b"
        run = RunDir(runs_dir / run_id)
        run.path.mkdir(parents=True)
        save_yaml(config, run.config)
        _spawn(runs_dir, run_id, resume=False, num_processes=num_processes(config), time_limit_s=time_limit_s)
    return run_id


def _check_free(runs_dir: Path, need_bytes: int) -> None:
    """Under the lock: the machine has no other active run and the disk has room for this one."""
    busy = _active_unless_ending(runs_dir)
    if busy:
        raise _busy_error(runs_dir, busy)
    check_disk(runs_dir, need_bytes)


def resume_run(run_id: str, runs_dir: Path | None = None, *, time_limit_s: float | None = None) -> str:
    runs_dir = Path(runs_dir or runs.default_runs_dir())
    run_dir = runs.run_in(runs_dir, run_id).path
    status = events.run_status(run_dir)
    if status.state == "finished":
        raise UserError(f"Run {run_id} already finished; start a new run to train more.")
    if status.state == "unreadable":
        raise UserError(f"Run {run_id} cannot be resumed: {status.reason}.",
                        hint="Start a new run (its folder can be deleted or repaired by hand).")
    config = load_yaml(RunDir(run_dir).config)
    need_bytes = disk_needed(trainable_params_for(config), config.train.save_total_limit)
    with runs.locked(runs_dir):
        _check_free(runs_dir, need_bytes)
        from_step, _ = resume_point(run_id, runs_dir)  # what the training process will find, said up front
        events.append_event(run_dir, "resume", step=status.step, max_steps=status.max_steps, from_step=from_step)
        _spawn(runs_dir, run_id, resume=True, num_processes=num_processes(config), time_limit_s=time_limit_s)
    return run_id


def num_processes(config: RunConfig) -> int:
    """Training processes for this config: one per visible GPU unless train.num_processes says otherwise."""
    n = config.train.num_processes
    if n != "auto":
        return int(n)
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except (ImportError, RuntimeError):  # torch not importable here means no GPU either
        return 1


def _spawn(runs_dir: Path, run_id: str, resume: bool, num_processes: int,
           time_limit_s: float | None = None) -> subprocess.Popen:
    run = RunDir(runs_dir / run_id)
    cmd = train_command(run.config, run.path, resume, num_processes,
                        launch_mixed_precision() if num_processes > 1 else "no")
    token = runs.new_token()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PHI3_LORA_JOB": run_id, runs.TOKEN_ENV: token}
    env.pop(runs.TIME_LIMIT_ENV, None)
    if time_limit_s is not None:
        env[runs.TIME_LIMIT_ENV] = repr(float(time_limit_s))
    log = open(run.log, "ab")
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=os.getcwd())
    log.close()
    # Popen returns once the child has exec'd, so its start time and environment (the token) are final.
    record = runs.ProcessRecord.of(proc.pid, token)
    run.write_process(record)
    runs.write_active(runs_dir, run_id, record)
    # Reap the child when it exits so it does not linger as a zombie.
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{run_id}").start()
    return proc


def stop_run(run_id: str, runs_dir: Path | None = None, grace: float | None = None,
             min_grace: float = STOP_GRACE_SECONDS) -> events.RunStatus:
    """SIGTERM (the run finishes its step, saves a checkpoint and exits), then SIGKILL after the grace.

    grace None adapts to the run: long enough for the step in progress and a save as measured from its events
    (`events.stop_grace`), at least `min_grace`. A run killed without saving says so and from which step Resume
    starts. Several GPUs: torchrun (inside `accelerate launch`) starts each rank in its own session, so the
    launcher's process group holds only the launcher; it forwards SIGTERM to the ranks. The ranks are found (as
    the launcher's descendants) before any signal, so a SIGKILL reaches them too and Stop returns only once every
    rank is gone, never leaving one holding a GPU."""
    runs_dir = Path(runs_dir or runs.default_runs_dir())
    run_dir = runs.run_in(runs_dir, run_id).path
    record = RunDir(run_dir).read_process()
    if record is None or not record.is_ours_and_alive():  # gone, or its pid now belongs to another process
        return events.run_status(run_dir)
    pid = record.pid
    tree = [pid, *descendants(pid)]

    def alive() -> bool:
        return any(runs.pid_alive(p) for p in tree)

    try:
        diary = events.read_events(run_dir)
    except (OSError, events.UnreadableEvents):
        diary = []
    if grace is None:
        grace = events.stop_grace(diary, min_grace, time.time())
    step_s, save_s = events.step_and_save_seconds(diary)
    events.append_event(run_dir, "stop", grace_seconds=round(grace, 1))
    _signal_group(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and alive():
        time.sleep(0.2)
    killed = alive()
    if killed:
        for p in tree:
            _signal_group(p, signal.SIGKILL)
        for _ in range(50):
            if not alive():
                break
            time.sleep(0.1)
    status = events.run_status(run_dir)
    if status.state in ("interrupted", "running", "queued"):
        events.append_event(run_dir, "end", status="stopped", step=status.step, max_steps=status.max_steps,
                            killed=killed, reason=_stop_reason(status, killed, grace, step_s, save_s))
        status = events.run_status(run_dir)
    return status


def _stop_reason(status: events.RunStatus, killed: bool, grace: float, step_s: float | None,
                 save_s: float | None) -> str:
    """What a Stop that ended without the run's own checkpoint-and-exit did, plainly (pure)."""
    if not killed:
        return f"stopped by you; the process ended without saving at step {status.step}; {status.resume_text}."
    pace = [f"a step takes about {step_s:.0f} s" if step_s else "", f"a save about {save_s:.0f} s" if save_s else ""]
    pace_text = f" ({', '.join(p for p in pace if p)})" if any(pace) else ""
    return (f"stopped by you and killed after waiting {grace:.0f} s: the step in progress{pace_text} did not "
            f"finish, so no checkpoint was saved at step {status.step}; {status.resume_text}.")


def delete_run(run_id: str, runs_dir: Path | None = None) -> int:
    """Delete a run's folder (checkpoints, adapter, merges) and its exports; returns the bytes freed. A run in use is
    refused: training (stop it first), or a request that holds it (holds.hold_run: an export, an evaluation), whose
    work would fail half-way. The folder is renamed out of the list first, so a half-deleted run never shows."""
    from phi3_lora.quotas import folder_bytes

    runs_dir = Path(runs_dir or runs.default_runs_dir())
    with runs.locked(runs_dir):
        run = runs.run_in(runs_dir, run_id)
        if run.process_alive() or events.run_status(run.path).active:
            raise UserError(f"{run_id} is training, so it cannot be deleted now.",
                            hint="Wait until its training finishes, or press Stop, then delete it.")
        busy = holds.holds_of(run)
        if busy:
            raise UserError(f"{run_id} is in use, so it cannot be deleted now: {' and '.join(dict.fromkeys(busy))} of "
                            "it is running on this server.",
                            hint="Wait until it finishes (an export or an evaluation cannot be stopped from the page), "
                                 "then delete the run.")
        freed = folder_bytes(run.path)
        kept = uploads.kept_copy(runs_dir, uploads.run_source(run.path))
        gone = runs_dir / f".deleting-{run_id}"
        os.replace(run.path, gone)
        # the copy of an upload the run trained on goes with the last run that does (it counted for their starters)
        if kept is not None:
            size = kept.stat().st_size
            freed += size if uploads.drop_kept_unless_used(runs_dir, kept) else 0
    shutil.rmtree(gone, ignore_errors=True)
    shutil.rmtree(runs.exports_dir(runs_dir, run_id), ignore_errors=True)
    return freed


def resume_point(run_id: str, runs_dir: Path | None = None) -> tuple[int, Path | None]:
    """(step, checkpoint) a Resume of this run would start from: its newest complete checkpoint, else step 0."""
    run = runs.run_in(Path(runs_dir or runs.default_runs_dir()), run_id)
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        return 0, None
    return runs.parse_checkpoint_step(checkpoint.name) or 0, checkpoint


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _signal_group(pid: int | None, sig: int) -> None:
    """Signal the process group `pid` leads, else `pid` alone; never this process nor its own group."""
    if not pid or pid <= 0 or pid == os.getpid():
        return
    try:
        if os.getpgid(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)  # the child leads its own session: every helper of it (and a rank's dataloaders)
            return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def list_runs(runs_dir: Path | None = None) -> list[RunInfo]:
    """Every run, newest first. A run whose folder cannot be read is listed as "unreadable: <reason>"; it never
    hides the others."""
    return [run_info(run) for run in runs.run_dirs(runs_dir or runs.default_runs_dir())]


def run_info(run: RunDir) -> RunInfo:
    status = events.run_status(run.path)  # never raises: an unreadable diary is a state
    model, problem = "?", None
    try:
        model = load_yaml(run.config).model.name
    except UserError as exc:
        problem = exc.message.replace(str(run.config), RunDir.CONFIG)  # the list names the run already
    try:
        created = run.config.stat().st_mtime
    except OSError:
        created = 0.0
    if problem and not status.active:
        status = events.RunStatus(state="unreadable", reason=f"unreadable: {problem}")
    return RunInfo(run.run_id, run.path, status, model, created, problem)


TQDM_LINE = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+(\.\d+)?\s*(it|examples)/s\]")


def log_tail(run_id: str, runs_dir: Path | None = None, lines: int = 40) -> str:
    runs_dir = Path(runs_dir or runs.default_runs_dir())
    path = runs.run_in(runs_dir, run_id).log
    if not path.exists():
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"({RunDir.LOG} cannot be read: {exc.strerror or exc})"
    # tqdm redraws with \r: keep only the last state of each line, and drop progress bars (a run started before
    # train.quiet_libraries, or a library it does not reach) so the tail is the run's own lines.
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in kept if not TQDM_LINE.search(line)][-lines:])


def wait_for(run_id: str, runs_dir: Path | None = None, timeout: float = 600.0,
             poll: float = 0.5) -> events.RunStatus:
    """Block until the run is no longer active (for the CLI and tests)."""
    runs_dir = Path(runs_dir or runs.default_runs_dir())
    deadline = time.time() + timeout
    while True:
        status = events.run_status(runs_dir / run_id)
        if not status.active or time.time() > deadline:
            return status
        time.sleep(poll)
