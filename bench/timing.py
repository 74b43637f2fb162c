"""How the benches time a training row: warm up until the step time settles, then time a fixed number of
optimizer steps; useful tokens counted at the model's forward; loss per step kept.

Two ways to time a step (`SettleTimer(free=...)`):

- synchronised (the default, every table before the twelfth session): the host waits for the GPU at both ends of
  every step, and Trainer reads the loss every step (logging_steps 1). The host never runs ahead, so the GPU idles
  while the host prepares each step's first kernels and after every read.
- free-running (`free=True`): nothing in the timer waits for the GPU. A CUDA event marks each step's begin on the
  GPU's own timeline; a step's time is the span between its begin and the next step's, read two steps late (the
  host waits only for an event the GPU passed a step ago, so the queue never runs dry); tokens and losses are
  copied to pinned host memory without a wait and read once the GPU is past them; Trainer logs only at the end
  (logging_steps raised), as a run that logs every N steps logs one step in N. That is what a training run gets
  once the bench stops waiting, the same method for every row (recipe, engine, peer). The synchronising calls
  made during the timed steps are counted by call site (`torch.cuda.set_sync_debug_mode`), since each lets the
  GPU run dry. On a CPU, where every op has ended when it returns, the host clock is the device's timeline and
  the same bookkeeping runs (tests/test_bench.py).
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from collections import Counter
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


def release_memory() -> None:
    """Between rows: collect the garbage, give the GPU's cached blocks back and reset its peak statistics."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class SettleTimer:
    """Times optimizer steps; stops the trainer after `steps` timed steps past the settled warm-up."""

    def __init__(self, steps: int, min_warmup: int = MIN_WARMUP, max_warmup: int = MAX_WARMUP,
                 min_total: int = 0, quiet: Callable[[], bool] | None = None, free: bool = False,
                 logged: bool = False) -> None:
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
        self.free = free
        self.logged = logged  # free-running, Trainer still logs (reads the loss) every step, as the app's default
        self._free: _FreeSteps | None = None

    def max_steps(self) -> int:
        # free-running: a step is known two steps after it began, so the timer asks to stop two steps late
        late = FREE_LAG if self.free else 0
        return max(self.max_warmup + self.steps + (QUIET_WAIT_STEPS if self.quiet else 0), self.min_total) + late

    def pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if module.training and ids is not None:
            if mask is not None and mask.dim() == 2:
                if self._free is not None:
                    self._free.count(mask)  # summed on the GPU, read once the GPU is past it
                else:
                    self._tok += int(mask.sum())
            else:
                self._tok += ids.numel()

    def _step_end(self) -> bool:
        """Record a step timed on the host; True when the timed steps are done."""
        return self._record(time.perf_counter() - self._t, self._tok, (self._began, time.time()))

    def _record(self, seconds: float, tokens: int, span: tuple[float, float]) -> bool:
        """Record one step's time, tokens and span; True when the timed steps are done."""
        self.times.append(seconds)
        self.tokens.append(tokens)
        self.spans.append(span)
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
        if self.free:
            return self._free_callback()

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

    def _free_callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Free(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._free = _FreeSteps(timer.max_steps() + 1, _cuda())

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                free = timer._free
                free.begin(timer.start is not None)
                timer._tok = 0
                for seconds, tokens, span, loss in free.resolved():
                    if loss is not None:
                        timer.losses[len(timer.times) + 1] = loss
                    if timer._record(seconds, tokens, span):
                        free.done = True

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._free.end(timer._tok)
                if timer._free.done:
                    control.should_training_stop = True

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._free.close()

        return _Free()

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
            "timed_window": [self.spans[start][0], self.spans[-1][1]] if t else None,
            "timing": ("free-running" + (", logged every step" if self.logged else "")) if self.free
            else "synchronised"}
        if self._free is not None:
            out["syncs_in_timed_steps"] = self._free.census()
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

    if timer.free:  # Trainer's per-step loss read waits for the GPU: losses come from training_step instead
        if not timer.logged:
            trainer.args.logging_steps = 10**9
        step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            if timer._free is not None:
                timer._free.loss(loss)
            return loss

        trainer.training_step = training_step
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


FREE_LAG = 2  # a free-running step's time is read this many steps after it began
SYNC_WARNING = "synchronizing CUDA operation"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class _HostEvent:
    """A step's begin on the host clock: on a CPU every op has ended when it returns, so it is the device's time."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, later: "_HostEvent") -> float:
        return (later.t - self.t) * 1000.0


class _FreeSteps:
    """A free-running timer's device side: one event per step begin, each step's token count and loss copied to
    host memory (pinned, on a GPU) without a wait, read back once a later event shows the device is past them;
    and, on a GPU, a count of the synchronising calls made while the timed steps run."""

    def __init__(self, capacity: int, cuda: bool) -> None:
        import torch

        self.cuda = cuda
        self.events: list[Any] = []
        self.began: list[float] = []  # host Unix time at each step's begin
        self.host_tokens: list[int] = []  # tokens counted on the host (a shape)
        # per step: device-counted tokens, loss, whether a loss came
        self.values = torch.zeros((capacity, 3), dtype=torch.float64, pin_memory=cuda)
        self.device_counts: list[Any] = []
        self.read = 0  # steps resolved so far
        self.done = False
        self.syncs: Counter[str] = Counter()
        self._catch: Any = None

    def count(self, mask: Any) -> None:
        self.device_counts.append(mask.sum())

    def loss(self, loss: Any) -> None:
        i = len(self.events) - 1
        if 0 <= i < len(self.values) and hasattr(loss, "detach"):
            row = self.values[i]
            row[1:2].copy_(loss.detach().reshape(1).double(), non_blocking=True)
            row[2] = 1.0

    def begin(self, timing: bool) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = _HostEvent()
        self.events.append(event)
        self.began.append(time.time())
        if timing and self.cuda and self._catch is None:
            self._watch()

    def end(self, host_tokens: int) -> None:
        i = len(self.events) - 1
        self.host_tokens.append(host_tokens)
        if self.device_counts and i < len(self.values):
            import torch

            total = torch.stack(self.device_counts).sum().double().reshape(1)
            self.values[i, 0:1].copy_(total, non_blocking=True)
        self.device_counts = []

    def resolved(self) -> list[tuple[float, int, tuple[float, float], float | None]]:
        """Steps whose span the device has finished, FREE_LAG behind the host: (seconds, tokens, span, loss)."""
        out = []
        while self.read + FREE_LAG < len(self.events):
            i = self.read
            self.events[i + 1].synchronize()  # the GPU passed step i's end a step ago: no drain
            seconds = self.events[i].elapsed_time(self.events[i + 1]) / 1000.0
            tokens = self.host_tokens[i] + (int(self.values[i, 0]) if i < len(self.values) else 0)
            loss = float(self.values[i, 1]) if i < len(self.values) and self.values[i, 2] else None
            out.append((seconds, tokens, (self.began[i], self.began[i + 1]), loss))
            self.read += 1
        return out

    def _watch(self) -> None:
        import torch

        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def close(self) -> None:
        if self._catch is None:
            return
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        for w in self._records:
            if SYNC_WARNING in str(w.message):
                self.syncs[f"{w.filename}:{w.lineno}"] += 1
        self._catch = None

    def census(self) -> dict[str, int] | None:
        """Synchronising calls during the timed steps by call site (None: not counted, on a CPU)."""
        self.close()
        return dict(self.syncs.most_common()) if self.cuda else None
