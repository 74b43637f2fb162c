"""speed/deferred_metrics.py: trl's step metrics and the token counts read from the device only when logged.

A real run on the tiny Phi-3 with DEFERRED_METRICS on and off logs the same numbers, and with it on no trainer code
reads a tensor on the host inside a step (the host syncs that drained the GPU's queue, issue 19)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.training import assert_same_logs, write_rows
from phi3_lora import events, options, train
from phi3_lora.config import RunConfig
from phi3_lora.runs import RunDir
from phi3_lora.speed.deferred_metrics import host_values

# Trainer code whose host reads the deferral removes; a read from anywhere else (the CPU optimizer, the attention
# mask of a padded batch) is the model's or torch's, not ours to count.
TRAINER_FILES = ("trl/trainer/sft_trainer.py", "transformers/trainer.py", "phi3_lora/trainer.py",
                 "phi3_lora/speed/deferred_metrics.py")
SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "__index__")
LOGGED = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens",
          "num_input_tokens_seen", "eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens",
          "train_loss")


def _config(model_dir: Path, data: Path, **train_overrides: Any) -> RunConfig:
    return RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": False},
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        # Logs average two steps' metrics; the save at step 3 comes with no log before it to resolve the counts.
        train={"max_steps": 6, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_steps": 3,
               "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "max_length": 64, "eval_steps": 2,
               "logging_steps": 2, "eval_answers": False, **train_overrides},
        data={"source": str(data), "eval_fraction": 0.2})


def _data(tmp_path: Path) -> Path:
    # Answers of different lengths: padded batches, so the non-padding count differs from the batch's size.
    return write_rows(tmp_path / "d.jsonl", n=24, question="Q{i}?", answer="Fact {i}: " + "and more " * 3 + "{i}")


class _Census:
    """Counts host reads of tensors made directly by trainer code between on_step_begin and on_step_end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.calls: list[str] = []
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name: str, original: Any) -> Any:
        census = self

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if census.on:
                caller = sys._getframe(1)
                where = caller.f_code.co_filename.replace("\\", "/")
                if where.endswith(TRAINER_FILES):
                    census.calls.append(f"{name} {where.rsplit('/', 1)[-1]}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)
        return counted

    def callback(self) -> Any:
        from transformers import TrainerCallback

        census = self

        class Switch(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                census.on = state.global_step >= 1  # the first step builds things once; count the steady ones

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                census.on = False
        return Switch()


def _train(cfg: RunConfig, out: Path, deferred: bool, monkeypatch: pytest.MonkeyPatch,
           resume: Path | None = None) -> tuple[Any, list[str]]:
    monkeypatch.setattr(options, "DEFERRED_METRICS", deferred)
    out.mkdir(parents=True)
    built = train.build(cfg, out)
    assert built.opts.deferred_metrics is deferred and built.trainer.deferred_metrics is deferred
    assert built.trainer.args.logging_nan_inf_filter is not deferred
    census = _Census(monkeypatch)
    built.trainer.add_callback(census.callback())
    try:
        built.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        monkeypatch.undo()  # the Tensor methods back before the assertions
    return built.trainer, census.calls


def _assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert_same_logs(a, b, LOGGED)


def _state(out: Path, step: int) -> dict[str, Any]:
    return json.loads((RunDir(out).checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "padding-free"])
def test_deferred_metrics_log_what_trl_logs_with_no_host_read_in_a_step(tmp_path, tiny_phi3_dir, monkeypatch,
                                                                         packing):
    # Padded batches carry an attention_mask (counted on the device); padding-free ones (the GPU's packing) only
    # position_ids, whose token count is a shape.
    cfg = _config(tiny_phi3_dir, _data(tmp_path), packing=packing)
    kept, kept_syncs = _train(cfg, tmp_path / "kept", False, monkeypatch)
    deferred, deferred_syncs = _train(cfg, tmp_path / "deferred", True, monkeypatch)

    # The census sees the stock path's reads (so it would see a regression), and none with the deferral.
    assert any(" sft_trainer.py:" in c for c in kept_syncs) and any(" trainer.py:" in c for c in kept_syncs), kept_syncs
    assert deferred_syncs == [], deferred_syncs

    assert deferred.args.padding_free is packing
    history = deferred.state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6] and sum("eval_entropy" in h for h in history) == 3
    assert all(isinstance(h[k], float) for h in train_logs for k in ("entropy", "mean_token_accuracy", "num_tokens"))
    assert all(type(h["num_input_tokens_seen"]) is int for h in train_logs)
    assert isinstance(deferred._total_train_tokens, int) and deferred._pending_input_tokens == 0
    # Padded batches: the non-padding tokens Trainer counts are fewer than the padded batch's positions.
    assert 0 < train_logs[-1]["num_input_tokens_seen"] < 6 * 4 * max(len(r) for r in deferred.train_dataset["input_ids"])
    _assert_same(history, kept.state.log_history)

    # trainer_state.json of each checkpoint (what Resume starts from) holds the count as of its step.
    for step in (3, 6):
        state = _state(tmp_path / "deferred", step)
        assert state["num_input_tokens_seen"] == _state(tmp_path / "kept", step)["num_input_tokens_seen"]
        _assert_same(state["log_history"], _state(tmp_path / "kept", step)["log_history"])

    assert _state(tmp_path / "deferred", 6)["num_input_tokens_seen"] == train_logs[-1]["num_input_tokens_seen"]

    # The events diary (tokens/s comes from the tokens seen) carries the same numbers.
    def diary(out: Path) -> list[Any]:
        return [e[k] for e in events.read_events(out) if e["type"] == "log"
                for k in ("step", "loss", "tokens_seen", "grad_norm", "learning_rate")]
    assert diary(tmp_path / "deferred") == pytest.approx(diary(tmp_path / "kept"), rel=1e-6)

    # A resume from step 3 continues the count from the checkpoint, as an uninterrupted run does.
    resumed, _ = _train(cfg, tmp_path / "resumed", True, monkeypatch,
                        resume=RunDir(tmp_path / "deferred").checkpoints / "checkpoint-3")
    assert resumed.state.num_input_tokens_seen == deferred.state.num_input_tokens_seen
    last = [h for h in resumed.state.log_history if "loss" in h][-1]
    assert last["num_input_tokens_seen"] == train_logs[-1]["num_input_tokens_seen"]
    assert last["loss"] == pytest.approx(train_logs[-1]["loss"], rel=1e-4)

    # A batch with no trained token: entropy and accuracy are 0, as trl's branch gives, not 0 / 0.
    batch = next(iter(deferred.get_train_dataloader()))
    batch = deferred._prepare_inputs({**batch, "labels": torch.full_like(batch["labels"], -100)})
    deferred.model.train()
    results = []
    for on in (False, True):
        deferred.deferred_metrics = on
        deferred._metrics["train"].clear()
        with torch.no_grad():
            loss = deferred.compute_loss(deferred.model, dict(batch))
        deferred.resolve_metrics()
        metrics = deferred._metrics["train"]
        results.append((float(loss), metrics["entropy"], metrics["mean_token_accuracy"]))
    assert results[0] == results[1] == (0.0, [0.0], [0.0])


def test_host_values_reads_each_device_once_and_keeps_ints_exact():
    values = host_values([torch.tensor(2**40 + 1), torch.tensor(0.25, dtype=torch.bfloat16), torch.tensor(1.5)])
    assert values == [2**40 + 1, 0.25, 1.5] and type(values[0]) is int
    assert host_values([]) == []


def test_the_flag_and_the_versions_decide_and_the_nan_filter_follows(tiny_phi3_dir, monkeypatch):
    from transformers import AutoConfig

    cfg = RunConfig().replace(model={"name": str(tiny_phi3_dir)})
    model_config = AutoConfig.from_pretrained(tiny_phi3_dir)

    def resolved(**kwargs: Any) -> Any:
        return options.resolve_options(cfg, "cpu", "float32", False, model_config=model_config, **kwargs)

    assert resolved().deferred_metrics and not resolved(deferred_ok=False).deferred_metrics
    monkeypatch.setattr(options, "DEFERRED_METRICS", False)
    assert not resolved().deferred_metrics
    for on in (True, False):
        opts = options.ResolvedOptions(device="cpu", gradient_checkpointing=False, packing=False,
                                       use_liger_kernel=False, optim="adamw_torch", bf16=False, fp16=False,
                                       deferred_metrics=on)
        assert options.sft_config_kwargs(cfg, opts, Path("/tmp/x"), False)["logging_nan_inf_filter"] is not on


def test_a_nan_loss_is_recorded_read_and_drawn(tmp_path):
    """No NaN filter with the deferral: a NaN loss reaches the diary, the status, the log line and the plot."""
    from phi3_lora.trainer import log_line
    from phi3_lora.ui.train_tab import _progress_html, loss_figure

    events.append_event(tmp_path, "start", step=0, max_steps=3)
    for step, loss in ((1, 2.0), (2, float("nan")), (3, 1.5)):
        event = events.append_event(tmp_path, "log", step=step, max_steps=3, loss=loss, learning_rate=1e-3,
                                    tokens_per_second=10.0)
    assert "loss nan" in log_line(dict(event, loss=float("nan")))
    st = events.status_from_events(events.read_events(tmp_path), process_alive=True)
    assert [s for s, _ in st.losses] == [1, 2, 3] and math.isnan(st.losses[1][1])
    assert "loss <b>1.5000</b>" in _progress_html(st)
    assert loss_figure(st) is not None
    assert "loss <b>nan</b>" in _progress_html(events.status_from_events(events.read_events(tmp_path)[:3], True))


def test_a_nan_loss_in_the_run_summary_is_strict_json_null():
    """run_summary.json travels with the adapter (Hub, bundles): strict JSON, a NaN or infinite figure as null."""
    import json

    from phi3_lora.adapter_folder import strict_json

    summary = {"final_loss": float("nan"), "eval": {"loss": float("inf"), "steps": 3}, "losses": [1.5, float("-inf")]}
    text = json.dumps(strict_json(summary), allow_nan=False)  # raises on any non-finite float left

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse) == {"final_loss": None, "eval": {"loss": None, "steps": 3},
                                                       "losses": [1.5, None]}
