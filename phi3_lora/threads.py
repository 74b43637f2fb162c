"""How many CPU threads generation may use: all cores on an idle machine, one when it is oversubscribed."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

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
