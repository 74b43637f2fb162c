"""speed/lagged_logs.py: each log written one call later, as of its own step, with the stock path's numbers.

Real runs on the tiny Phi-3 (CPU: the lag is forced on; the app turns it on for CUDA runs, where reading a log
at once waits for the GPU) log the same history, diary and checkpoints with the lag on and off, and the order of
the callbacks shows the lag happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers.training import assert_same_logs, write_rows
from phi3_lora import events, options, train
from phi3_lora.config import RunConfig
from phi3_lora.runs import RunDir

MAX_STEPS = 7
EVAL_STEPS = 4
SAVE_STEPS = 3
LOGGED = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens",
          "num_input_tokens_seen", "epoch", "eval_loss", "train_loss", "step")


def _config(model_dir: Path, data: Path, packing: bool) -> RunConfig:
    return RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": False},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        train={"max_steps": MAX_STEPS, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
               "save_steps": SAVE_STEPS, "eval_steps": EVAL_STEPS, "logging_steps": 1, "warmup_ratio": 0.0,
               "lr_scheduler_type": "linear", "max_length": 64, "eval_answers": False, "packing": packing},
        data={"source": str(data), "eval_fraction": 0.2})


class _Order:
    """The callbacks' view: which step ended, and which step each training log carries, in call order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        order = self

        class Record(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                order.seen.append(("end", state.global_step))

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if logs and "loss" in logs:
                    order.seen.append(("log", state.global_step))
        return Record()


def _train(cfg: RunConfig, out: Path, lagged: bool) -> tuple[Any, list[tuple[str, int]]]:
    out.mkdir(parents=True)
    built = train.build(cfg, out)
    assert built.opts.deferred_metrics and not built.opts.lagged_logs  # a CPU run: off unless forced
    built.trainer.lagged_logs = lagged
    order = _Order()
    built.trainer.add_callback(order.callback())
    built.trainer.train()
    assert built.trainer._queued_log is None  # nothing left unwritten
    return built.trainer, order.seen


def _assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert_same_logs(a, b, LOGGED)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "padding-free"])
def test_lagged_logs_write_the_stock_numbers_one_step_later(tmp_path, tiny_phi3_dir, packing):
    data = write_rows(tmp_path / "d.jsonl", n=30, question="Q{i}?", answer="Fact {i}: " + "and more " * 3 + "{i}")
    cfg = _config(tiny_phi3_dir, data, packing)
    stock, stock_order = _train(cfg, tmp_path / "stock", lagged=False)
    lagged, lagged_order = _train(cfg, tmp_path / "lagged", lagged=True)

    # Stock: each step's log right after its end. Lagged: a plain step's log comes after the next step ended;
    # the log before an evaluation (4), a save (3, 6) or the last step (7) is written at once.
    assert stock_order == [e for s in range(1, MAX_STEPS + 1) for e in (("end", s), ("log", s))]
    at_once = {s for s in range(1, MAX_STEPS + 1) if s % EVAL_STEPS == 0 or s % SAVE_STEPS == 0} | {MAX_STEPS}
    expected: list[tuple[str, int]] = []
    waiting = None
    for s in range(1, MAX_STEPS + 1):
        expected.append(("end", s))
        if waiting is not None:
            expected.append(("log", waiting))
        waiting = None if s in at_once else s
        if s in at_once:
            expected.append(("log", s))
    assert lagged_order == expected and ("log", 1) == lagged_order[2]

    # Same numbers, each under its own step and epoch: the history, the diary, and every checkpoint's state.
    _assert_same(lagged.state.log_history, stock.state.log_history)
    assert lagged.state.num_input_tokens_seen == stock.state.num_input_tokens_seen > 0

    def diary(out: Path) -> list[Any]:
        return [e[k] for e in events.read_events(out) if e["type"] == "log"
                for k in ("step", "loss", "tokens_seen", "grad_norm", "learning_rate")]
    assert len(diary(tmp_path / "lagged")) == 5 * MAX_STEPS
    assert diary(tmp_path / "lagged") == pytest.approx(diary(tmp_path / "stock"), rel=1e-6)
    for step in (6, MAX_STEPS):  # the two checkpoints the rotation keeps (save_total_limit)
        def state(run: str) -> dict[str, Any]:
            path = RunDir(tmp_path / run).checkpoints / f"checkpoint-{step}" / "trainer_state.json"
            return json.loads(path.read_text())
        assert state("lagged")["num_input_tokens_seen"] == state("stock")["num_input_tokens_seen"]
        _assert_same(state("lagged")["log_history"], state("stock")["log_history"])
        assert [h["step"] for h in state("lagged")["log_history"] if "loss" in h] == list(range(1, step + 1))


def test_lagged_logs_are_on_for_cuda_runs_only(tiny_phi3_dir, monkeypatch):
    from transformers import AutoConfig

    cfg = RunConfig().replace(model={"name": str(tiny_phi3_dir)})
    model_config = AutoConfig.from_pretrained(tiny_phi3_dir)

    def resolved(device: str, **kwargs: Any) -> Any:
        return options.resolve_options(cfg, device, "float32", False, model_config=model_config, **kwargs)

    assert resolved("cuda").lagged_logs and not resolved("cpu").lagged_logs
    assert not resolved("cuda", deferred_ok=False).lagged_logs  # it builds on the deferred metrics
    monkeypatch.setattr(options, "LAGGED_LOGS", False)
    assert not resolved("cuda").lagged_logs
