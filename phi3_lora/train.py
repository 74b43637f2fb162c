"""Build trl's SFTTrainer from a `RunConfig` and run it: the only place that trains.

Everything a run produces goes under its folder, laid out by runs.RunDir: config, events, eval rows,
checkpoints (written atomically), the final adapter (written atomically); jobs writes train.log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, MutableMapping, Sequence

from phi3_lora import errors, events, options, runs, steptime, trackers
from phi3_lora.adapter_folder import save_adapter_atomic
from phi3_lora.config import RunConfig, save_yaml
from phi3_lora.errors import UserError
from phi3_lora.lora_attach import attach_lora
from phi3_lora.options import ResolvedOptions, liger_installed, resolve_options, sft_config_kwargs
from phi3_lora.runs import RunDir


@dataclass
class TrainResult:
    status: str  # finished | stopped
    steps: int
    final_loss: float | None
    eval_loss: float | None
    adapter_dir: Path | None
    seconds: float


class StopRequested(Exception):
    """SIGTERM arrived before the training loop started: nothing to save."""


# --- the run -------------------------------------------------------------------------------------

_stop_flag: dict[str, Any] = {"requested": False, "in_loop": False}


def _on_sigterm(signum: int, frame: Any) -> None:
    _stop_flag["requested"] = True
    if not _stop_flag["in_loop"]:
        raise StopRequested()


def _arm_time_limit(seconds: str | None) -> None:
    """A visitor's run (jobs: runs.TIME_LIMIT_ENV) stops as Stop stops it, saving a checkpoint, once its time is up:
    one visitor cannot hold the one job slot of the machine for good with a run of a million steps (Resume goes on)."""
    if not seconds:
        return

    limit = float(seconds)
    shown = f"{limit / 3600:g} h" if limit >= 3600 else f"{limit / 60:g} min" if limit >= 60 else f"{limit:g} s"

    def stop() -> None:
        _stop_flag["reason"] = (f"stopped at this server's time limit for a visitor's run ({shown}); press Resume "
                                "to continue from its last checkpoint")
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(limit, stop)
    timer.daemon = True
    timer.start()


def run(config: RunConfig, run_dir: Path, resume: bool = False, notes: Sequence[str] = ()) -> TrainResult:
    """Train, writing events and checkpoints into `run_dir`. Errors are recorded as events, then raised.

    `notes`: warnings about the settings (e.g. recipe keys finetune() ignored or replaced), recorded as
    `warning` events and lines of train.log before training starts."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    if not run.config.exists():
        save_yaml(config, run.config)
    if not os.environ.get("PHI3_LORA_JOB") and is_main_process():  # a foreground CLI run; jobs records its own
        run.write_process(runs.ProcessRecord.of(os.getpid()))
    _stop_flag.clear()  # a process may train more than once (the library, tests): each run starts unstopped
    _stop_flag.update(requested=False, in_loop=False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _arm_time_limit(os.environ.get(runs.TIME_LIMIT_ENV))
    if is_main_process():
        record_warnings(run_dir, notes)
    if not os.isatty(2):
        quiet_libraries()
    try:
        trackers.require_installed(config.train.report_to)
        with trackers.environment_set(config.train.report_to, run_dir):
            return _run(config, run_dir, resume)
    except StopRequested:
        trained = _stop_flag.get("trained_to")
        if is_main_process():
            events.append_event(run_dir, "end", status="stopped",
                                reason=_stop_flag.get("reason") or stopped_reason(trained))
        return TrainResult("stopped", trained or 0, None, None, None, 0.0)
    except UserError as exc:
        events.append_event(run_dir, "error", reason=f"failed: {exc}")
        raise
    except BaseException as exc:
        if errors.is_disk_full(exc):
            _record_error(run_dir, events.DISK_FULL_REASON, str(exc)[:500])
            raise UserError(events.DISK_FULL_REASON) from exc
        if errors.is_out_of_memory(exc):
            _record_error(run_dir, events.OOM_REASON, str(exc)[:500])
            raise UserError(events.OOM_REASON) from exc
        _record_error(run_dir, f"failed: {type(exc).__name__}: {str(exc)[:500]}")
        raise


def stopped_reason(trained_to: int | None) -> str:
    """Why a run stopped by a SIGTERM outside the training loop ended (pure): before the loop, or after its last
    step, before its adapter was written (the final checkpoint is there: Resume writes the adapter from it)."""
    if trained_to is None:
        return "stopped before training began"
    return (f"stopped after its last step ({trained_to}), before it finished; press Resume to finish it from the "
            "last checkpoint")


def record_warnings(run_dir: Path, notes: Sequence[str]) -> None:
    """Each warning as a `warning` event and a line of train.log (appended: a job's stdout goes there too)."""
    if not notes:
        return
    with open(RunDir(run_dir).log, "a", encoding="utf-8") as log:
        for note in notes:
            events.append_event(run_dir, "warning", message=note)
            log.write(f"warning: {note}\n")


def quiet_libraries() -> None:
    """Writing to a log file (the app's train.log): EventsCallback prints one line per step, so the libraries'
    progress bars ("Filter: 0%|...") and deprecation warnings would only bury those lines."""
    import warnings

    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _record_error(run_dir: Path, reason: str, detail: str | None = None) -> None:
    """The error event; if even that cannot be written (a full disk), the run reads as interrupted instead."""
    try:
        events.append_event(run_dir, "error", reason=reason, **({"detail": detail} if detail else {}))
    except OSError as exc:
        print(f"could not record the error in events.jsonl ({exc}): {reason}", flush=True)


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes events, eval rows and the adapter."""
    return int(os.environ.get("RANK", "0")) == 0


def pin_single_gpu(env: MutableMapping[str, str] | None = None) -> str | None:
    """A single training process (not one rank of several) uses one GPU; seeing several, Trainer would wrap the
    model in nn.DataParallel, which trl refuses ("does not support nn.DataParallel"): `num_processes: 1` on a
    2-GPU machine failed so. Keep the first visible GPU. Must run before CUDA starts; returns what it set."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env or int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return None
    current = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in current.split(",") if d.strip()] if current is not None else ["0", "1"]
    if len(ids) <= 1:
        return None
    env["CUDA_VISIBLE_DEVICES"] = ids[0]
    return ids[0]


@dataclass
class Built:
    """A trainer ready to train, and what `run` records about it."""

    trainer: Any
    callback: Any
    opts: ResolvedOptions
    model_name: str
    reason: str
    device: str
    dtype_name: str
    loaded: Any
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]


def build(config: RunConfig, output_dir: Path) -> Built:
    """Data, model, LoRA and trl's trainer exactly as a run uses them (the bench times this same object)."""
    import dataclasses

    from datasets import Dataset
    from transformers import AutoConfig, set_seed
    from trl import SFTConfig

    from phi3_lora import data as data_mod
    from phi3_lora import models
    from phi3_lora.speed import compact_loss, deferred_metrics, dequantized, label_positions, sdpa_backend
    from phi3_lora.speed.layers import (PartialCheckpointing, compile_available, compile_layers, decoder_layers,
                                        expandable_segments)
    from phi3_lora.speed.packed_attention import cuda_varlen_available
    from phi3_lora.trainer import AtomicCheckpointTrainer, EventsCallback

    set_seed(config.train.seed)
    loaded = data_mod.load_data(config.data)
    rows = loaded.rows[: config.data.max_rows] if config.data.max_rows else loaded.rows
    train_rows, eval_rows = data_mod.split_rows(rows, config.data.eval_fraction, config.train.seed)

    model_name, reason = models.resolve_name(config.model.name)
    tokenizer = models.load_tokenizer(model_name, config.model.chat_template)
    device = "cuda" if models.cuda_available() else "cpu"
    dtype_name = str(models.resolve_dtype(config.model.dtype, device)).replace("torch.", "")
    model_config = AutoConfig.from_pretrained(models.local_path(model_name), trust_remote_code=False)
    opts = resolve_options(config, device, dtype_name, liger_installed=liger_installed(),
                           varlen_available=cuda_varlen_available(), model_config=model_config,
                           gpu_memory_gb=models.gpu_memory_gb() if device == "cuda" else None,
                           compile_ok=device == "cuda" and compile_available(),
                           cudnn_ok=device == "cuda" and sdpa_backend.cudnn_available(),
                           deferred_ok=deferred_metrics.available())
    if device == "cuda":
        expandable_segments()
    if opts.compact_loss:
        compact_loss.install()
    model = models.load_model(dataclasses.replace(config.model, name=model_name,
                                                  attn_implementation=opts.attn_implementation))
    model = attach_lora(model, config, opts)
    if opts.cudnn_attention:
        sdpa_backend.prefer_cudnn()
    if opts.dequantized_layers:
        dequantized.install(decoder_layers(model)[:opts.dequantized_layers])
    if opts.compile_layers:
        compile_layers(model, activation_budget=opts.activation_budget,
                       **({"mode": options.COMPILE_MODE} if options.COMPILE_MODE else {}))

    args = SFTConfig(**sft_config_kwargs(config, opts, RunDir(output_dir).checkpoints, has_eval=bool(eval_rows)))
    callback = EventsCallback(Path(output_dir), stop_flag=_stop_flag)
    callbacks = [callback]
    if opts.gradient_checkpointing and opts.checkpointed_layers is not None:
        callbacks.append(PartialCheckpointing(opts.checkpointed_layers))
    trainer = AtomicCheckpointTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        callbacks=callbacks)
    trainer.deferred_metrics = opts.deferred_metrics
    trainer.lagged_logs = opts.lagged_logs
    if opts.host_label_positions:  # what the run reports is what it took (trl's path where the copy cannot mirror)
        opts.host_label_positions = label_positions.install(trainer)
    if args.disable_tqdm:  # EventsCallback writes readable log lines; transformers' printer would repeat them as dicts
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return Built(trainer, callback, opts, model_name, reason, device, dtype_name, loaded, train_rows, eval_rows)


def _run(config: RunConfig, run_dir: Path, resume: bool) -> TrainResult:
    started = time.time()
    run = RunDir(run_dir)
    shutil.rmtree(run.staging, ignore_errors=True)  # a save cut short by a kill leaves only this, never a checkpoint
    built = build(config, run_dir)
    trainer, callback, opts, loaded = built.trainer, built.callback, built.opts, built.loaded
    model_name, reason, device, dtype_name = built.model_name, built.reason, built.device, built.dtype_name
    eval_rows, tokenizer = built.eval_rows, built.trainer.processing_class
    main = is_main_process()
    if main:
        _write_jsonl_atomic(run.eval_rows, eval_rows)
        run.write_resolved(model_name, reason)
    dropped = untrainable_rows(built)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    checkpoint = run.last_checkpoint() if resume else None
    if resume and checkpoint is None and main:
        events.append_event(run_dir, "note", message="no complete checkpoint found: starting from step 0")
    callback.start_fields = dict(
        model=model_name, model_reason=reason, device=device, dtype=dtype_name, train_rows=len(trainer.train_dataset),
        eval_rows=len(eval_rows), dropped_rows=len(loaded.problems), untrainable_rows=dropped,
        trainable_params=trainable, total_params=total, resumed_from=str(checkpoint) if checkpoint else None,
        options=vars(opts), data_warnings=loaded.warnings)

    _stop_flag["in_loop"] = True
    try:
        if checkpoint is not None and trained_out(checkpoint, config.train.max_steps):
            # Stopped after its last step: Trainer would train one step past max_steps before it checks. The final
            # checkpoint's adapter and state are the trained run; what follows (eval, adapter, scores) runs as usual.
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        _stop_flag["in_loop"] = False
    _stop_flag["trained_to"] = trainer.state.global_step  # a SIGTERM from here on stops a trained run
    stopped = _stop_flag["requested"]

    eval_loss = None
    if eval_rows and not stopped:
        # The last periodic eval may already have been at the final step: reuse it rather than repeat it.
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            eval_loss = last["eval_loss"]
        else:
            eval_loss = trainer.evaluate().get("eval_loss")
    final_loss = final_train_loss(trainer.state.log_history)
    adapter_dir = None
    if not stopped and main:
        this_attempt = round(time.time() - started, 1)
        before = earlier_attempts(events.read_events(run_dir))
        summary = dict(model=model_name, steps=trainer.state.global_step, final_loss=final_loss, eval_loss=eval_loss,
                       eval_perplexity=math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
                       trainable_params=trainable, total_params=total,
                       seconds=round(before["seconds"] + this_attempt, 1), attempts=before["attempts"] + 1,
                       steps_this_attempt=trainer.state.global_step - (checkpoint_step(checkpoint) or 0),
                       seconds_this_attempt=this_attempt,
                       train_rows=len(trainer.train_dataset), eval_rows=len(eval_rows))
        resolved = config.replace(model={"name": model_name})
        adapter_dir = save_adapter_atomic(trainer.model, tokenizer, resolved, summary, run.adapter)
    status = "stopped" if stopped else "finished"
    steps = trainer.state.global_step
    if adapter_dir is not None and eval_rows and config.train.eval_answers:
        del trainer, built, callback, tokenizer  # the scoring loads the saved adapter: free the training copy first
        score_answers(config, model_name, run_dir, adapter_dir)
    if main:
        events.append_event(run_dir, "end", status=status, step=steps, loss=final_loss,
                        eval_loss=eval_loss, adapter=str(adapter_dir) if adapter_dir else None,
                        seconds=round(time.time() - started, 1),
                        **({"reason": _stop_flag["reason"]} if stopped and _stop_flag.get("reason") else {}))
        try:  # the next run's time estimate starts from this run's measured step time
            steptime.record_run(config, run_dir)
        except OSError:
            pass
    return TrainResult(status, steps, final_loss, eval_loss, adapter_dir, time.time() - started)


def score_answers(config: RunConfig, model_name: str, run_dir: Path, adapter_dir: Path) -> Path | None:
    """Base vs tuned answers on the held-out rows (evaluate.py), bounded by train.eval_answers_max_seconds.

    The adapter is already saved: a failure here is a note in the diary, never a failed run, and Stop
    (SIGTERM) ends the scoring at the next token, keeping the rows already scored."""
    import gc

    from phi3_lora import evaluate
    from phi3_lora.models import cuda_available

    gc.collect()
    if cuda_available():
        import torch

        torch.cuda.empty_cache()
    t = config.train
    events.append_event(run_dir, "note", message=f"scoring base and tuned answers on the held-out rows (at most "
                                                 f"{t.eval_answers_max_seconds:g} s; train.eval_answers: false turns "
                                                 "this off)")
    _stop_flag["in_loop"] = True  # SIGTERM now stops the scoring, not the finished run
    try:
        path, result = evaluate.score_run(run_dir, adapter_dir, model_name, config.model.load_in_4bit,
                                          max_new_tokens=t.eval_answers_max_new_tokens,
                                          max_seconds=t.eval_answers_max_seconds,
                                          should_stop=lambda: _stop_flag["requested"])
    except Exception as exc:  # noqa: BLE001 (any failure of the scoring leaves the trained adapter as it is)
        events.append_event(run_dir, "note", message=f"answer scoring failed ({type(exc).__name__}: {str(exc)[:300]})")
        return None
    finally:
        _stop_flag["in_loop"] = False
    if path is None:
        events.append_event(run_dir, "note", message=f"answer scoring reached no row within "
                            f"{t.eval_answers_max_seconds:g} s ({result['stopped_by']}); score later without a limit: "
                            f"python -m phi3_lora evaluate --adapter {run_dir}")
        return None
    events.append_event(run_dir, "answer_eval", file=str(path), rows=len(result["rows"]),
                        not_reached=result["not_reached"], seconds=result["timing"]["seconds"],
                        summary={k: {"base": v["base"], "tuned": v["tuned"]} for k, v in result["summary"].items()})
    return path


def final_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The last logged training loss; when no step was logged (logging_steps > steps), the run's mean
    `train_loss` that Trainer logs at the end."""
    last = next((h["loss"] for h in reversed(log_history) if "loss" in h), None)
    return last if last is not None else next((h["train_loss"] for h in reversed(log_history) if "train_loss" in h),
                                              None)


def trained_out(checkpoint: Path, max_steps: int) -> bool:
    """The checkpoint is at the run's last step: `max_steps` where set (> 0), else the one its trainer_state.json
    was trained towards (a run of epochs)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        last = max_steps if max_steps > 0 else int(state["max_steps"])
        return int(state["global_step"]) >= last > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoint_step(checkpoint: Path | None) -> int | None:
    return runs.parse_checkpoint_step(checkpoint.name) if checkpoint is not None else None


def earlier_attempts(run_events: list[dict[str, Any]]) -> dict[str, float]:
    """Training attempts before the current one (each begins with a `start` event) and their wall time, from
    each start to that attempt's last event (pure). The current attempt's start is the last `start`."""
    starts = [i for i, e in enumerate(run_events) if e.get("type") == "start"]
    seconds = 0.0
    for a, b in zip(starts, starts[1:]):
        seconds += max(0.0, float(run_events[b - 1]["t"]) - float(run_events[a]["t"]))
    return {"attempts": max(0, len(starts) - 1), "seconds": seconds}


def untrainable_rows(built: Built) -> int:
    """Rows that train no token (assistant turns wholly past max_length), removed before the first step and
    counted for the start event: trl drops them itself when it truncates; drop_untrainable_rows catches the rest."""
    dropped = drop_untrainable_rows(built.trainer)
    return dropped if built.opts.packing else len(built.train_rows) - len(built.trainer.train_dataset)


def drop_untrainable_rows(trainer: Any) -> int:
    """Rows whose assistant tokens all fall past max_length would add zero-loss batches: drop them."""
    ds = trainer.train_dataset
    if "labels" not in ds.column_names:
        return 0
    keep = ds.filter(lambda ex: any(label != -100 for label in ex["labels"]))
    if len(keep) == 0:
        raise UserError("No token would be trained: every conversation's assistant turns fall past max_length "
                        "(or assistant_only_loss masks everything).",
                        hint="Raise 'Max length (tokens)' (train.max_length), shorten the system/user turns, or check "
                             "the data.")
    trainer.train_dataset = keep
    return len(ds) - len(keep)


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    runs.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

