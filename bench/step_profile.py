"""One optimizer step under torch.profiler (`--profile`): CUDA kernels by total time in coarse groups, host time,
and where in Python the step waits for the GPU or copies."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.row_sets import Row
from bench.row_trainers import patched, run_engine, run_recipe
from bench.timing import release_memory


# Host calls whose Python stacks a profile lists: each waits for the GPU (a sync) or copies on it.
TRACED_HOST_CALLS = ("cudaStreamSynchronize", "cudaMemcpyAsync")


def host_call_sites(events: list[Any], names: tuple[str, ...] = TRACED_HOST_CALLS, frames: int = 6) -> list[str]:
    """`count x name <- the innermost Python frames outside torch's own files` for the profiler's host events
    named in `names`, most frequent first (pure over objects with `.name` and `.stack`)."""
    sites: dict[tuple[str, tuple[str, ...]], int] = {}
    for e in events:
        if e.name not in names:
            continue
        stack = tuple(f for f in (e.stack or []) if "/torch/" not in f and "<built-in" not in f)[:frames]
        sites[(e.name, stack)] = sites.get((e.name, stack), 0) + 1
    return [f"{n} x {name} <- " + " <- ".join(stack or ("(no Python frame)",))
            for (name, stack), n in sorted(sites.items(), key=lambda kv: -kv[1])]


def step_profiler(step: int) -> tuple[Any, Any]:
    """A Trainer callback that runs optimizer step `step` (0-based, after the warm-up) under torch.profiler, and a
    function that summarises it: CUDA kernels by total time, grouped (`kernel_group`), host time, and where in
    Python the step waits for the GPU or copies (`host_call_sites`). Used for the engine's rows here and for
    Unsloth's in its own process (bench/peer_unsloth.py)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
    wall: list[float] = []

    class _Prof(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == step:
                torch.cuda.synchronize()
                prof.__enter__()
                wall.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == step + 1:
                torch.cuda.synchronize()
                wall.append(time.perf_counter())
                prof.__exit__(None, None, None)

    def summary(title: str, out: Path) -> str:
        from torch.autograd import DeviceType

        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) or 1.0
        groups: dict[str, float] = {}
        for e in events:
            key = kernel_group(e.key)
            groups[key] = groups.get(key, 0.0) + e.self_device_time_total
        step_ms = (wall[-1] - wall[0]) * 1e3 if len(wall) == 2 else float("nan")
        lines = [f"profile of one step: {title}; GPU kernel time {total / 1e3:.1f} ms in {step_ms:.1f} ms of wall "
                 "time (under the profiler)", "", "group | ms | share"]
        lines += [f"{k} | {v / 1e3:.1f} | {v / total:.1%}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
        lines += ["", prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)]
        lines += ["", "by host (CPU) time:",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90)]
        lines += ["", "where the step waits for the GPU or copies (host call <- Python frames):",
                  *host_call_sites(list(prof.events()))]
        text = "\n".join(lines)
        out.write_text(text, encoding="utf-8")
        return text

    return _Prof(), summary


def profile_step(row: Row, model_dir: Path, data: dict[str, Path], warmup: int, out: Path) -> str:
    """One optimizer step of an engine or recipe `row` under torch.profiler (`step_profiler`), after `warmup`."""
    callback, summary = step_profiler(warmup)
    release_memory()
    with tempfile.TemporaryDirectory() as tmp, patched(row.patch):
        build = run_recipe if row.kind == "recipe" else run_engine
        trainer, _ = build(row, model_dir, data[row.data], warmup + 1, Path(tmp))
        trainer.add_callback(callback)
        trainer.train()
        del trainer
    release_memory()
    return summary(row.name, out)


def kernel_group(name: str) -> str:
    """A coarse bucket for a CUDA kernel's name (GEMM, attention, dequantise, copies, elementwise, ...)."""
    n = name.lower()
    for key, words in (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")), ("dequant 4-bit", ("dequant",)),
                       ("dropout", ("dropout", "bernoulli")), ("optimizer", ("adam", "multi_tensor")),
                       ("copy/cast", ("copy", "memcpy", "cast")),
                       ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "fill")),
                       ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul")),
                       ("liger/triton", ("liger", "triton", "rms_norm", "swiglu", "rope"))):
        if any(w in n for w in words):
            return key
    return "other"
