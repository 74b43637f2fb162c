"""The run's diary on disk: `<run>/events.jsonl` (runs.RunDir.events), and the status read back from it.

The training process appends one JSON object per line; the UI and CLI only read. Because
state lives on disk, a closed tab, a second browser or a restarted app see the same run.

Event types: start, log, eval, checkpoint, end (status finished|stopped), error (reason).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3_lora.runs import RunDir

OOM_REASON = ("failed: out of memory. Lower per_device_train_batch_size or max_length, turn on "
              "gradient_checkpointing, or enable QLoRA (model.load_in_4bit).")
DISK_FULL_REASON = ("failed: disk full (no space left on the disk holding the run folder). Free some space "
                    "(delete old runs or exports) or lower train.save_total_limit, then press Resume: it continues "
                    "from the last complete checkpoint, which the failed save left intact.")


def append_event(run_dir: Path, type: str, **fields: Any) -> dict[str, Any]:
    """Append one event; a single write() of one line so readers never see half an event."""
    event = {"t": round(time.time(), 3), "type": type, **fields}
    line = json.dumps(event, default=_jsonable) + "\n"
    fd = os.open(RunDir(run_dir).events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
    return event


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


END_STATES = ("finished", "stopped", "failed")
_INT_FIELDS = ("step", "max_steps", "from_step")
_NUMBER_FIELDS = ("t", "loss", "eval_loss", "tokens_per_second", "eta_seconds", "learning_rate", "epoch",
                  "save_seconds", "grace_seconds")
_TEXT_FIELDS = ("status", "reason", "path", "message")


class UnreadableEvents(ValueError):
    """events.jsonl holds something no training process writes (a hand edit, another program, a bad disk)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def event_problem(event: Any) -> str | None:
    """Why a decoded line is not an event we could have written, or None (pure)."""
    if not isinstance(event, dict):
        return f"is not an event object ({json.dumps(event)[:40]})"
    if not isinstance(event.get("type"), str):
        return "has no event type"
    for name in _INT_FIELDS:
        if name in event and not (isinstance(event[name], int) and not isinstance(event[name], bool)):
            return f"has {name} {event[name]!r}, not a whole number"
    for name in _NUMBER_FIELDS:
        if event.get(name) is not None and not _is_number(event[name]):
            return f"has {name} {event[name]!r}, not a number"
    for name in _TEXT_FIELDS:
        if event.get(name) is not None and not isinstance(event[name], str):
            return f"has {name} {json.dumps(event[name])[:40]}, not text"
    if event["type"] == "end" and event.get("status", "finished") not in END_STATES:
        return f"ends the run with an unknown status {event.get('status')!r}"
    return None


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All complete events. A line that is not JSON is a write cut short by a kill (torn) and is skipped; a JSON
    line that is no event raises UnreadableEvents naming it; an unreadable file raises OSError."""
    path = RunDir(run_dir).events
    if not path.exists():
        return []
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        except RecursionError:
            raise UnreadableEvents(f"{RunDir.EVENTS} line {number} is nested too deeply") from None
        problem = event_problem(event)
        if problem:
            raise UnreadableEvents(f"{RunDir.EVENTS} line {number} {problem}")
        events.append(event)
    return events


@dataclass
class RunStatus:
    """What a person needs to know about a run, derived from its events and its process."""

    state: str  # queued | running | finished | stopped | failed | interrupted | unreadable
    reason: str = ""
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    started: float | None = None
    last_checkpoint: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)  # the step each Resume started from, in order

    @property
    def resume_step(self) -> int:
        """The step Resume continues from: the newest checkpoint's, or 0 when the run never saved one."""
        from phi3_lora.runs import parse_checkpoint_step

        return (parse_checkpoint_step(Path(self.last_checkpoint).name) or 0) if self.last_checkpoint else 0

    @property
    def resume_text(self) -> str:
        if self.last_checkpoint:
            return f"Resume continues from step {self.resume_step} (its last checkpoint)"
        return "no checkpoint was saved, so Resume starts again from step 0"

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


def status_from_events(events: list[dict[str, Any]], process_alive: bool) -> RunStatus:
    """Pure: fold the events into a status. A run whose process is gone without an end is interrupted."""
    status = RunStatus(state="queued")
    for ev in events:
        kind = ev.get("type")
        status.step = ev["step"] if ev.get("step") is not None else status.step  # a resume from step 0 is step 0
        status.max_steps = ev.get("max_steps") or status.max_steps
        if kind == "start":
            status.state, status.started = "running", ev.get("t")
            status.reason, status.eta_seconds = "", None  # a resumed run has no ETA until it logs a step
            # A resumed run replays the steps after its checkpoint: keep one point per step.
            status.losses = [p for p in status.losses if p[0] <= status.step]
            status.eval_losses = [p for p in status.eval_losses if p[0] <= status.step]
        elif kind == "log" and ev.get("loss") is not None:
            status.loss = float(ev["loss"])
            status.losses.append((status.step, status.loss))
            status.tokens_per_second = ev.get("tokens_per_second", status.tokens_per_second)
            status.eta_seconds = ev.get("eta_seconds")
        elif kind == "eval" and ev.get("eval_loss") is not None:
            status.eval_loss = float(ev["eval_loss"])
            status.eval_losses.append((status.step, status.eval_loss))
        elif kind == "checkpoint":
            status.last_checkpoint = ev.get("path")
        elif kind == "end":
            status.state, status.eta_seconds, status.reason = ev.get("status", "finished"), 0, ev.get("reason", "")
        elif kind == "error":
            status.state, status.reason = "failed", ev.get("reason", "failed")
        elif kind == "resume":
            status.state, status.reason, status.eta_seconds = "queued", "", None
            status.step = ev["from_step"] if isinstance(ev.get("from_step"), int) else status.step
            status.attempts.append(status.step)
        elif kind == "stop" and status.state in ("queued", "running"):
            status.reason = (f"stopping: waiting up to {ev.get('grace_seconds', 0):.0f} s for the step in progress "
                             "to finish and a checkpoint to be saved")
    if status.state in ("queued", "running") and not process_alive:
        if events:
            status.state = "interrupted"
            status.reason = ("interrupted: the training process ended without finishing (killed, crashed or "
                             f"the machine restarted); {status.resume_text}.")
        else:
            status.state = "failed"
            status.reason = "failed: the training process exited before it started; see train.log."
    return status


STOP_MARGIN_S = 5.0
STOP_GRACE_MAX_S = 30 * 60.0


def step_and_save_seconds(events: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The slowest recent optimizer step and checkpoint save, in seconds (pure): steps timed from each log to the
    next within one attempt (from its start event to its first log too), never across a restart."""
    per_step: list[float] = []
    previous: tuple[float, int] | None = None
    for ev in events:
        if ev.get("type") == "start" and "t" in ev:
            previous = (ev["t"], ev.get("step", 0))
        elif ev.get("type") == "log" and "t" in ev and "step" in ev:
            if previous is not None and ev["step"] > previous[1]:
                per_step.append((ev["t"] - previous[0]) / (ev["step"] - previous[1]))
            previous = (ev["t"], ev["step"])
        elif ev.get("type") in ("end", "error", "resume"):
            previous = None
    saves = [ev["save_seconds"] for ev in events if ev.get("type") == "checkpoint"
             and isinstance(ev.get("save_seconds"), (int, float))]
    return (max(per_step[-5:]) if per_step else None), (max(saves[-5:]) if saves else None)


def stop_grace(events: list[dict[str, Any]], minimum: float, now: float) -> float:
    """How long Stop waits for the run to finish its step and save (pure): the step in progress (at least as long
    as it has run so far, at least as long as recent steps), then a save (as long as recent saves; before the first
    one, as long as a step), with half again as margin; never below `minimum`, never above half an hour."""
    if not any(ev.get("type") == "start" for ev in events):
        return minimum  # still loading: a SIGTERM there ends the process at once
    step, save = step_and_save_seconds(events)
    last = max((ev["t"] for ev in events if ev.get("type") in ("start", "log", "checkpoint") and "t" in ev),
               default=now)
    step = max(step or 0.0, now - last)
    save = save if save is not None else max(step, STOP_MARGIN_S)
    return min(STOP_GRACE_MAX_S, max(minimum, 1.5 * (step + save) + STOP_MARGIN_S))


def run_status(run_dir: Path) -> RunStatus:
    """The status of a run; a diary that cannot be read gives state "unreadable" with the reason, never an error."""
    try:
        found = read_events(run_dir)
    except (OSError, UnreadableEvents) as exc:
        reason = str(exc) if isinstance(exc, UnreadableEvents) else \
            f"{RunDir.EVENTS} cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
        return RunStatus(state="unreadable", reason=f"unreadable: {reason}")
    return status_from_events(found, RunDir(run_dir).process_alive())
