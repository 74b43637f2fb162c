"""Each training log read one log later, when the GPU has long finished it: no wait for the GPU at a log.

With `deferred_metrics` a step reads nothing from the GPU, but a log still does: Trainer's
`_maybe_log_save_evaluate` reads the loss (`.item()`), the grad norm, and trl's metrics and token counts. The app
logs every step (`train.logging_steps` 1, for the live curve), so each step ended with the host waiting for the
GPU to drain its queue, and the GPU then idled while the host prepared and launched the next step (the sixth
session's profile: ~20 ms of a ~297 ms whole-GPU step; bench `--set free` prices it).

`LaggedLogs` takes a log's numbers at its step as one device tensor, copies it to pinned host memory without
waiting (`non_blocking`) and records a CUDA event. The log itself is written at the next call, one step later,
when the event has passed: by then the host has queued the next step, so the GPU stays busy while the host reads.
The logged numbers, steps, epochs and token counts are the ones the stock path logs
(tests/test_lagged_logs.py). A log before an evaluation, a checkpoint save, a stop or the last step is written
at once (Trainer saves only from `_maybe_log_save_evaluate`, after the flush), so trainer_state.json and the events
diary are never a step short. Single-process runs only: a
multi-GPU run's `store_flos` reads the device at each log anyway.
Our own code because Trainer has no switch for it; it mirrors transformers 5.17-5.23's `_maybe_log_save_evaluate`
(versions.TESTED, the same pins as deferred_metrics, which this builds on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class QueuedLog:
    """One log's numbers as of its step, on their way to the host."""

    step: int
    epoch: float | None
    steps: int  # steps the summed loss covers
    learning_rate: float
    start_time: float | None
    grad_norm: float | None  # a host value already, or None (then it is in `values`, or there is none)
    has_grad_tensor: bool
    metric_keys: list[tuple[str, int]]  # trl's metric lists: key and length, in `values` order
    plain: dict[int, float | int] = field(default_factory=dict)  # host numbers among them, by position
    counters: tuple[bool, bool] = (False, False)  # _total_train_tokens / pending input tokens are in `values`
    host_counters: tuple[Any, Any] = (0, 0)  # their host values where they were not tensors
    values: torch.Tensor | None = None  # float64 on the host (pinned on CUDA), filled once `event` has passed
    event: Any = None

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return [] if self.values is None else self.values.tolist()


class LaggedLogs:
    """A mixin for `DeferredMetrics` trainers (put it first in the bases). Off unless `lagged_logs`."""

    lagged_logs: bool = False
    _queued_log: QueuedLog | None = None

    def _lags(self) -> bool:
        return bool(self.lagged_logs and self.deferred_metrics and self.accelerator.num_processes == 1)

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, model: Any, trial: Any, epoch: float,
                                 ignore_keys_for_eval: Any, start_time: float,
                                 learning_rate: float | None = None) -> None:
        if not self._lags():
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                                    start_time, learning_rate=learning_rate)
        control, state = self.control, self.state
        queued = None
        if control.should_log and state.global_step > self._globalstep_last_logged:
            queued = self._queue_log(tr_loss, grad_norm, learning_rate, start_time)
            control.should_log = False  # logged here, not by Trainer
        self.flush_log()
        at_once = (control.should_evaluate or control.should_save or control.should_training_stop
                   or state.global_step >= state.max_steps)
        self._queued_log = queued
        if at_once:
            self.flush_log()
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                         start_time, learning_rate=learning_rate)

    def _queue_log(self, tr_loss: torch.Tensor, grad_norm: Any, learning_rate: float | None,
                   start_time: float | None) -> QueuedLog:
        """Take this step's log numbers off the trainer (the next steps count afresh) and start their copy."""
        state = self.state
        metrics = self._metrics["train"]
        metric_keys = [(key, len(values)) for key, values in metrics.items()]
        entries: list[Any] = [tr_loss.detach().reshape(())]
        has_grad_tensor = isinstance(grad_norm, torch.Tensor)
        if has_grad_tensor:
            entries.append(grad_norm.detach().reshape(()))
        entries += [v for _, values in metrics.items() for v in values]
        counters = (self._total_train_tokens, self._pending_input_tokens)
        in_values = tuple(isinstance(c, torch.Tensor) for c in counters)
        entries += [c for c in counters if isinstance(c, torch.Tensor)]
        queued = QueuedLog(
            step=state.global_step, epoch=state.epoch, steps=state.global_step - self._globalstep_last_logged,
            learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate(),
            start_time=start_time, grad_norm=None if has_grad_tensor else grad_norm, has_grad_tensor=has_grad_tensor,
            metric_keys=metric_keys, counters=in_values,  # type: ignore[arg-type]
            host_counters=tuple(0 if t else c for t, c in zip(in_values, counters)))  # type: ignore[arg-type]
        # Host numbers (a shape-counted token total, an already-read metric) keep their place; tensors go over in
        # one copy per log.
        tensors = []
        for i, value in enumerate(entries):
            if isinstance(value, torch.Tensor):
                tensors.append(value.detach().reshape(()).to(tr_loss.device, torch.float64))
            else:
                queued.plain[i] = value
        stacked = torch.stack(tensors)  # a new tensor: what the step left, before the resets below run
        if stacked.device.type == "cuda":
            host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            queued.event = torch.cuda.Event()
            queued.event.record()
            queued.values = host
        else:
            queued.values = stacked
        tr_loss -= tr_loss  # queued after the copy on the same stream
        metrics.clear()
        self._pending_input_tokens = 0
        self._globalstep_last_logged = state.global_step
        self.store_flos()
        return queued

    def flush_log(self) -> None:
        """Write the queued log, if any, as of its own step."""
        queued, self._queued_log = self._queued_log, None
        if queued is None:
            return
        read = iter(queued.read())
        count = 1 + queued.has_grad_tensor + sum(n for _, n in queued.metric_keys) + sum(queued.counters)
        entries = [queued.plain[i] if i in queued.plain else next(read) for i in range(count)]
        loss, position = entries[0], 1
        grad_norm = queued.grad_norm
        if queued.has_grad_tensor:
            grad_norm, position = entries[1], 2
        lists: dict[str, list[Any]] = {}
        for key, n in queued.metric_keys:
            lists[key], position = entries[position:position + n], position + n
        total, pending = (int(entries.pop(position)) if in_values else host
                          for in_values, host in zip(queued.counters, queued.host_counters))
        logs: dict[str, float] = {"loss": loss / queued.steps}
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs["learning_rate"] = queued.learning_rate
        self._total_loss_scalar += loss
        # Trainer.log, trl's log and the callbacks read the state: show them the log's own step.
        state, metrics = self.state, self._metrics["train"]
        kept = (state.global_step, state.epoch, state.num_input_tokens_seen, self._total_train_tokens,
                self._pending_input_tokens, dict(metrics))
        state.global_step, state.epoch = queued.step, queued.epoch
        state.num_input_tokens_seen += pending
        self._total_train_tokens, self._pending_input_tokens = total, 0
        metrics.clear()
        metrics.update(lists)
        try:
            self.log(logs, queued.start_time)
        finally:
            seen = state.num_input_tokens_seen
            state.global_step, state.epoch = kept[0], kept[1]
            state.num_input_tokens_seen = seen
            self._total_train_tokens = kept[3]
            self._pending_input_tokens = kept[4]
            metrics.clear()
            metrics.update(kept[5])
