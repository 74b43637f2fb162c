"""trl's SFTTrainer with four additions: atomic checkpoints, an events diary, step metrics read from the GPU only
when they are logged (speed/deferred_metrics.py), and on a GPU each log read one log later (speed/lagged_logs.py).

transformers writes `checkpoint-N/` in place, file by file, so a kill during a save leaves a
folder that looks like a checkpoint but is not one. We save into `checkpoints/.staging/` and
rename into place; a rename is atomic, so `checkpoint-N/` is complete or absent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import SFTTrainer

from phi3_lora import events, holds, runs
from phi3_lora.runs import RunDir
from phi3_lora.speed.deferred_metrics import DeferredMetrics
from phi3_lora.speed.lagged_logs import LaggedLogs


class AtomicCheckpointTrainer(LaggedLogs, DeferredMetrics, SFTTrainer):
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Several ranks: only rank 0 (should_save) makes, renames and removes the staging folder; the others write
        # only their rng_state_<rank>.pth into it. Barriers keep a late rank from deleting rank 0's half-written
        # files, and rank 0 from renaming the folder before every rank's RNG state is in it.
        started = time.monotonic()
        final_root = self.args.output_dir
        staging_root = os.path.join(final_root, RunDir.STAGING)
        name = runs.checkpoint_name(self.state.global_step)
        main = self.args.should_save
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            # A failed save (disk full) must not keep its partial files: they hold space the error event needs,
            # and the previous checkpoint-N, untouched, stays the one Resume uses.
            if main:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            self.args.output_dir = final_root
        self.accelerator.wait_for_everyone()
        if main:
            final = os.path.join(final_root, name)
            shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after a resume
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            # Checkpoints a Compare or Export request holds (holds.pin_checkpoint) are skipped until released.
            holds.rotate_checkpoints(RunDir(Path(final_root).parent), self.args.save_total_limit,
                                    protect=self.state.best_model_checkpoint)
        for callback in self.callback_handler.callbacks:  # the checkpoint event records it: Stop's grace uses it
            if isinstance(callback, EventsCallback):
                callback.save_seconds = time.monotonic() - started


def any_rank(flag: bool) -> bool:
    """True if `flag` is set on any process of the run (one tiny all-reduce when several ranks train)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def log_line(event: dict[str, Any]) -> str:
    """One line of the run log for a `log` event (pure)."""
    parts = [f"step {event['step']}/{event['max_steps']}", f"loss {event['loss']:.4f}"]
    if event.get("learning_rate") is not None:
        parts.append(f"lr {event['learning_rate']:.2e}")
    if event.get("tokens_per_second"):
        parts.append(f"{event['tokens_per_second']:.0f} tok/s")
    if event.get("eta_seconds") is not None:
        parts.append(f"eta {event['eta_seconds']:.0f} s")
    return "  ".join(parts)


class EventsCallback(TrainerCallback):
    """Appends start / log / eval / checkpoint events; turns a SIGTERM into save-and-stop."""

    def __init__(self, run_dir: Path, stop_flag: dict[str, bool]) -> None:
        self.run_dir = Path(run_dir)
        self.stop_flag = stop_flag
        self.start_fields: dict[str, Any] = {}
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0
        self._last = (0.0, 0)  # (time, tokens) at the previous log, for tokens/s
        self.save_seconds: float | None = None  # how long the checkpoint save just before on_save took

    def _is_main(self, state: Any) -> bool:
        return bool(getattr(state, "is_world_process_zero", True))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.time()
        self._step0 = state.global_step
        self._tokens0 = state.num_input_tokens_seen
        self._last = (self._t0, state.num_input_tokens_seen)
        if self._is_main(state):
            events.append_event(self.run_dir, "start", step=state.global_step, max_steps=state.max_steps,
                                epochs=args.num_train_epochs, **self.start_fields)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank must stop at the same step: a rank that stopped alone would leave the others waiting in the
        # next step's gradient all-reduce. A SIGTERM can land between two ranks' checks, so they agree here.
        if any_rank(bool(self.stop_flag.get("requested"))):
            self.stop_flag["requested"] = True
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self._is_main(state) or not logs:
            return
        now = time.time()
        tokens = state.num_input_tokens_seen
        last_t, last_tokens = self._last
        self._last = (now, tokens)
        done = state.global_step - self._step0
        eta = (now - self._t0) / done * (state.max_steps - state.global_step) if done > 0 else None
        if "loss" not in logs:  # eval metrics arrive here too; on_evaluate records those
            return
        event = events.append_event(
            self.run_dir, "log", step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
            loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_seen=tokens, tokens_per_second=(tokens - last_tokens) / (now - last_t) if now > last_t else None,
            eta_seconds=eta, elapsed_seconds=now - self._t0)
        if args.disable_tqdm:  # a log file (the app's train.log): one readable line per log, not a dict
            print(log_line(event), flush=True)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        if not self._is_main(state) or not metrics or "eval_loss" not in metrics:
            return
        import math

        loss = float(metrics["eval_loss"])
        events.append_event(self.run_dir, "eval", step=state.global_step, max_steps=state.max_steps,
                            eval_loss=loss, perplexity=math.exp(loss) if loss < 50 else None)
        if args.disable_tqdm:
            print(f"step {state.global_step}/{state.max_steps}  eval loss {loss:.4f}", flush=True)


    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._is_main(state):
            path = Path(args.output_dir) / runs.checkpoint_name(state.global_step)
            events.append_event(self.run_dir, "checkpoint", step=state.global_step, max_steps=state.max_steps,
                                path=str(path), save_seconds=self.save_seconds)
