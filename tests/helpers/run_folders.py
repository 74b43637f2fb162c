"""Run folders as a crash, a hand edit or another program can leave them (issue 13 item 6)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.apps import SAMPLE
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


RUN_ID = "20260101-000000-tiny"


def make_adapter_run(runs: Path, model_dir: Path, run_id: str = RUN_ID) -> Path:
    """A finished run folder as train.run leaves it (config, events, adapter, one checkpoint), with a random LoRA
    adapter: no training needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phi3_lora import models

    run = RunDir(runs / run_id)
    run_dir, adapter = run.path, run.adapter
    cfg = RunConfig().replace(model={"name": str(model_dir), "load_in_4bit": False}, lora={"r": 2},
                              data={"source": str(SAMPLE)})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(adapter, safe_serialization=True)
    models.load_tokenizer(str(model_dir)).save_pretrained(adapter)
    save_yaml(cfg, run.config)
    save_yaml(cfg, adapter / RunDir.CONFIG)
    (adapter / "run_summary.json").write_text(json.dumps({"steps": 1}))
    run.write_resolved(str(model_dir), "test")
    ckpt = run.checkpoint(1)
    model.save_pretrained(ckpt, safe_serialization=True)
    (ckpt / RunDir.TRAINER_STATE).write_text("{}")
    events.append_event(run_dir, "start", step=0, max_steps=1)
    events.append_event(run_dir, "end", status="finished", step=1, max_steps=1)
    run.log.write_text("secret log\n")
    return run_dir
