"""How many CPU threads generation may use: all cores on an idle machine, one when it is oversubscribed."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Any, Callable, Iterator

THREADS_ENV = "PHI3_LORA_GENERATE_THREADS"  # a fixed CPU thread count for generation, overriding the rule below


def generation_threads(cores: int, load: float, configured: int | None = None) -> int:
    """CPU threads for one generate call: all cores, or 1 when the machine is already oversubscribed.

    torch's OpenMP threads spin while they wait for each other; when another process (a training run beside
    the app, a second app) holds the cores, a descheduled thread stalls every kernel of every token. On this
    2-core machine at load 6-10: 1 prompt x 32 tokens took 11.4 s with 2 threads and 3.1 s with 1; 16 prompts
    89.7 s and 13.0 s. The 1-minute load average counts our own last call too (at most `cores` threads), so
    "oversubscribed" is a load of at least one runnable task more than the cores.
    """
    if configured:
        return max(1, configured)
    return 1 if load >= cores + 1 else max(1, cores)


@contextlib.contextmanager
def cpu_threads(device: Any, steady: bool = False) -> Iterator[None]:
    """Generation on the CPU with `generation_threads` threads (env PHI3_LORA_GENERATE_THREADS overrides),
    the process's setting restored afterwards. A GPU call is left alone. `steady`: the count does not follow the
    machine's load, for scores that must come out the same on every call (the thread count changes the order of
    bf16 sums: a run's end-of-run loss and the CLI's differed in the 3rd digit when the load average did)."""
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        yield
        return
    raw = os.environ.get(THREADS_ENV, "").strip()
    configured = int(raw) if raw.isdigit() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") and not steady else 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(generation_threads(min(cores, before), load, configured))  # OMP_NUM_THREADS stays a cap
    try:
        yield
    finally:
        torch.set_num_threads(before)
        release_thread_pool()


def release_thread_pool() -> bool:
    """Let go of the calling thread's OpenMP helper threads (torch's libgomp), so that the thread that generates
    next is the only one with a pool; True when there was a runtime to ask. The next parallel op of this thread
    makes a new pool (~0.1 ms).

    Every thread that runs a parallel torch op keeps its own libgomp pool of helper threads. Once libgomp manages
    more threads than there are CPUs, it cuts its spin-wait between parallel regions from ~300,000 spins to 100,
    so each of the ~200 products of a decoding step waits for a futex wake-up of its helper: on the 2-core Xeon a
    packed bf16 product at two rows took 570-650 us in a streaming worker thread while the thread that loaded the
    model still held its pool, 80-90 us once that pool was let go (omp_pause_resource_all, OpenMP 5.0, frees the
    caller's pool only). Compare streams from such a worker thread."""
    pause = _omp_pause_resource_all()
    if pause is None:
        return False
    pause(1)  # omp_pause_soft; returns non-zero inside a parallel region, where there is nothing to release
    return True


@functools.lru_cache(maxsize=1)
def _omp_pause_resource_all() -> Callable[[int], int] | None:
    """libgomp's omp_pause_resource_all as torch loaded it, or None (another OpenMP runtime, no /proc)."""
    import torch  # noqa: F401  (loads torch's OpenMP runtime)

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            path = next((line.split()[-1] for line in maps if "/libgomp" in line), None)
        pause = ctypes.CDLL(path).omp_pause_resource_all if path else None
    except (OSError, AttributeError):
        return None
    if pause is not None:
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause
