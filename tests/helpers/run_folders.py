"""Run folders as a crash, a hand edit or another program can leave them (issue 13 item 6)."""

from __future__ import annotations

import json
from pathlib import Path

from phi3_lora import events
from phi3_lora.config import RunConfig, save_yaml
from phi3_lora.runs import RunDir

DEEP = 5000  # deeper than Python's recursion limit


def _run(runs: Path, run_id: str) -> RunDir:
    run = RunDir(runs / run_id)
    run.path.mkdir(parents=True)
    save_yaml(RunConfig(), run.config)
    events.append_event(run.path, "start", step=0, max_steps=10)
    return run


def _line(run: RunDir, text: str) -> None:
    with open(run.events, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")


def corrupt_runs(runs: Path) -> dict[str, str]:
    """One run folder per corruption; returns run id -> a phrase its "unreadable: <reason>" must contain."""
    expected: dict[str, str] = {}

    run = _run(runs, "20250101-000001-torn-config")
    run.config.write_bytes(run.config.read_bytes()[:200] + b"\xff\xfe\x00 torn")  # a write cut short, not UTF-8
    expected[run.run_id] = "not UTF-8"

    run = _run(runs, "20250101-000002-model-name-5")
    run.config.write_text("model: {name: 5}\n")
    expected[run.run_id] = "model.name must be text"

    run = _run(runs, "20250101-000003-deep-yaml")
    run.config.write_text("model: " + "[" * DEEP + "]" * DEEP + "\n")
    expected[run.run_id] = "nests too deeply"

    run = _run(runs, "20250101-000004-event-5")
    _line(run, "5")
    expected[run.run_id] = "line 2 is not an event"

    run = _run(runs, "20250101-000005-event-list")
    _line(run, "[1, 2]")
    expected[run.run_id] = "line 2 is not an event"

    run = _run(runs, "20250101-000006-step-abc")
    _line(run, json.dumps({"t": 1.0, "type": "log", "step": "abc", "max_steps": 10, "loss": 1.0}))
    expected[run.run_id] = "step 'abc'"

    run = _run(runs, "20250101-000007-unknown-end")
    _line(run, json.dumps({"t": 1.0, "type": "end", "status": "exploded", "step": 3}))
    expected[run.run_id] = "unknown status 'exploded'"

    run = _run(runs, "20250101-000008-events-folder")
    run.events.unlink()
    run.events.mkdir()
    expected[run.run_id] = "cannot be read"

    run = _run(runs, "20250101-000009-deep-event")
    _line(run, "[" * DEEP + "]" * DEEP)
    expected[run.run_id] = "nested too deeply"
    return expected
