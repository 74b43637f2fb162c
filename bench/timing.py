"""How the benches time a training row: warm up until the step time settles, then time a fixed number of
optimizer steps; every step synchronised; useful tokens counted at the model's forward; loss per step kept.

Shared by bench/train_speed.py (recipe and engine rows) and bench/peer_unsloth.py (another library in its own
process), so every row is timed the same way. Compilation (Triton, Liger, torch.compile) lands in the first
steps; a row counts as warm once two consecutive steps' time per token agree within SETTLE_TOLERANCE after at
least MIN_WARMUP steps (MAX_WARMUP at most; a row that never settled says so).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

MIN_WARMUP = 3
MAX_WARMUP = 12
QUIET_WAIT_STEPS = 200  # at most this many more warm-up steps while another process imports (bench/prestart.py)
SETTLE_TOLERANCE = 0.05
GIB = 2**30


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SettleTimer:
    """Times optimizer steps; stops the trainer after `steps` timed steps past the settled warm-up."""

    def __init__(self, steps: int, min_warmup: int = MIN_WARMUP, max_warmup: int = MAX_WARMUP,
                 min_total: int = 0, quiet: Callable[[], bool] | None = None) -> None:
        self.steps, self.min_warmup, self.max_warmup = steps, min_warmup, max_warmup
        self.min_total = min_total  # train at least this many steps (the bench compares losses at step 10)
        self.quiet = quiet  # False while another process works on the host: the timed steps wait for True
        self.quiet_wait = 0  # warm-up steps added waiting for quiet
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.losses: dict[int, float] = {}
        self.start: int | None = None  # index of the first timed step
        self.settled = False
        self._t, self._tok = 0.0, 0
        self.spans: list[tuple[float, float]] = []  # each step's (begin, end) as Unix time: when it ran
        self._began = 0.0

    def max_steps(self) -> int:
        return max(self.max_warmup + self.steps + (QUIET_WAIT_STEPS if self.quiet else 0), self.min_total)

    def pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if module.training and ids is not None:
            self._tok += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()

    def _step_end(self) -> bool:
        """Record a step; True when the timed steps are done."""
        self.times.append(time.perf_counter() - self._t)
        self.tokens.append(self._tok)
        self.spans.append((self._began, time.time()))
        i = len(self.times) - 1
        if self.start is None:
            per = [t / max(1, n) for t, n in zip(self.times, self.tokens)]
            settled = i >= self.min_warmup and all(abs(per[j] - per[j - 1]) / per[j - 1] < SETTLE_TOLERANCE
                                                   for j in (i, i - 1))
            if settled or i + 1 >= self.max_warmup:
                if self.quiet is None or self.quiet() or self.quiet_wait >= QUIET_WAIT_STEPS:
                    self.start, self.settled = i + 1, settled
                else:
                    self.quiet_wait += 1
        return (self.start is not None and len(self.times) - self.start >= self.steps
                and len(self.times) >= self.min_total)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync()
                timer._t, timer._tok, timer._began = time.perf_counter(), 0, time.time()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync()
                if timer._step_end():
                    control.should_training_stop = True

            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                       **kw: Any) -> None:
                if logs and "loss" in logs:
                    timer.losses[state.global_step] = float(logs["loss"])

        return _CB()

    def result(self) -> dict[str, Any]:
        start = self.start if self.start is not None else len(self.times)
        t, n = self.times[start:], self.tokens[start:]
        rates = [k / s for k, s in zip(n, t) if s > 0]
        out: dict[str, Any] = {
            "warmup_steps": start, "settled": self.settled, "steps": len(t), "quiet_wait_steps": self.quiet_wait,
            "warmup_step_s": [round(x, 4) for x in self.times[:start]],
            "step_s": [round(x, 4) for x in t], "tokens_per_step_list": n,
            "losses": [self.losses.get(i + 1) for i in range(len(self.times))],
            # Unix times of the timed steps (bench/prestart.py checks no neighbour's imports ran then)
            "timed_window": [self.spans[start][0], self.spans[-1][1]] if t else None}
        if t:
            med = statistics.median(t)
            out.update(step_s_median=med, tokens_per_step=sum(n) / len(n),
                       # mean tokens per step over the median step time: one stalled step does not move it
                       tokens_per_s=(sum(n) / len(n)) / med,
                       tokens_per_s_mean=sum(n) / sum(t),
                       step_tok_s_min=min(rates), step_tok_s_max=max(rates))
        else:
            out.update(tokens_per_s=float("nan"), tokens_per_step=0.0)
        return out


def time_trainer(trainer: Any, timer: SettleTimer) -> dict[str, Any]:
    """Train with `timer` attached; the timed result plus peak GPU memory."""
    import torch

    trainer.add_callback(timer.callback())
    handle = trainer.model.register_forward_pre_hook(timer.pre_hook, with_kwargs=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        handle.remove()
    out = timer.result()
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return out
