"""Tiny training setups shared by the tests: data rows, configs, a short run's losses, waiting for a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Collection

from phi3_lora import events, train
from phi3_lora.config import RunConfig


def write_rows(path: Path, n: int = 16, answer: str = "My name is Quillon.",
               question: str = "Question {i}: who are you?") -> Path:
    """`n` one-turn conversations as JSONL; `question` and `answer` may use {i}, the row's number."""
    rows = [{"messages": [{"role": "user", "content": question.format(i=i)},
                          {"role": "assistant", "content": answer.format(i=i)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(model_dir: Path, data: Path, **train_overrides) -> RunConfig:
    """A few steps on a tiny model; no end-of-run scoring of answers (test_evaluate turns it on where it asserts
    on it: it loads the model again and generates for every held-out row)."""
    return RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": True},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        train={"max_steps": 6, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_steps": 3,
               "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "max_length": 64, "eval_steps": 3,
               "eval_answers": False, **train_overrides},
        data={"source": str(data), "eval_fraction": 0.2})


def slow_config(model_dir: Path, tmp_path: Path, max_steps: int = 400, save_steps: int = 5) -> RunConfig:
    rows = [{"messages": [{"role": "user", "content": f"Tell me fact {i}."},
                          {"role": "assistant", "content": f"Fact {i} is that {i} comes after {i - 1}."}]}
            for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": False},
        lora={"r": 4, "lora_alpha": 8},
        train={"max_steps": max_steps, "save_steps": save_steps, "save_total_limit": 2, "learning_rate": 1e-3,
               "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1},
        data={"source": str(data), "eval_fraction": 0.0})


def wait_until(predicate, timeout: float = 120.0, poll: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not met in time")


def varied_rows(path: Path, n: int = 24) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 5)},
                          {"role": "assistant", "content": "My name is Quillon. " * (1 + i % 3)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses_of_run(model_dir: Path, data: Path, run_dir: Path, dtype: str = "float32", **train_settings) -> list[float]:
    """Per-step losses of a short LoRA run on the tiny model; `train_settings` override the train section."""
    cfg = RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": False, "dtype": dtype,
               "attn_implementation": train_settings.pop("attn", "sdpa")},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **train_settings.pop("lora", {})},
        train={"max_steps": 6, "learning_rate": 5e-3, "per_device_train_batch_size": 24, "save_steps": 100,
               "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "max_length": 512, "seed": 0,
               "gradient_checkpointing": False, **train_settings},
        data={"source": str(data), "eval_fraction": 0.0})
    train.run(cfg, run_dir)
    return [loss for _, loss in events.run_status(run_dir).losses]


def trainable_lora(trainer) -> None:
    """Train mode with every lora_B drawn small instead of zero (as after some training): B = 0 at the start would
    leave lora_A without a gradient to compare."""
    import torch

    trainer.model.train()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def loss_and_grads(trainer, batch) -> tuple:
    """The trainer's loss on `batch` and every parameter gradient it gives (cloned), from zeroed gradients."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_logs(a: list[dict[str, Any]], b: list[dict[str, Any]], keys: Collection[str]) -> None:
    """Two trainers' log histories hold the same entries: the same `keys` (and "step") in each, equal values."""
    import pytest

    def kept(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in entry.items() if k in keys or k == "step"} for entry in history]

    assert len(a) == len(b)
    for x, y in zip(kept(a), kept(b)):
        assert x.keys() == y.keys(), (x, y)
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (key, x, y)
