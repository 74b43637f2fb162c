"""When and how Compare's compiled pair step (pair_graph) compiles: only while no training runs, and below
everything else in priority.

A 2-core Space that trains must not train slower because Compare is preparing a faster step, and the compile is
minutes of CPU on such a machine (docs/benchmarks.md, CPU, twelfth session), so:

- it starts only when no training run of the app's runs folder is alive (`jobs.active_run`), the machine is not
  already oversubscribed (another trainer, another app: the load rule `threads.generation_threads` uses), and
  the memory available holds the compiler process (`memory_short`: it loads a second copy of the model and
  peaks at ~7x the step's weights);
- the thread that waits for it and the compiler process it starts (`pair_artifact`, which also lowers itself) run
  at nice 19, so a run that starts while it compiles gets the cores.

The compile runs in its own process, so its Python does not hold the app's GIL (compiled in the app's own thread,
the app's eager answers were ~13x slower meanwhile), and its package is kept in the phi3_lora cache, so a restarted
app loads it in seconds (docs/benchmarks.md, CPU, 2026-12-05). Nothing of the weights is shared between models:
the package's key is the base weights' content (tests/test_pair_graph.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

NICE = 19
# The compiler process's peak resident memory over the bytes of the weights the step reads: 3,855 MiB for the
# embedded model's 538 MB (7.2x; docs/benchmarks.md, CPU, 2026-12-05, whole answers), and the app grows by ~2.3x
# those bytes once it loads the package. A machine that cannot hold that waits (the next pair answer asks again)
# instead of swapping, or the kernel's OOM killer picking the app.
MEMORY_FACTOR = 8


def training_busy(runs_dir: Path | None) -> str | None:
    """Why a compile should not start now (a run trains, or the machine is oversubscribed), or None."""
    from phi3_lora import jobs, runs
    from phi3_lora.threads import THREADS_ENV, generation_threads

    folder = Path(runs_dir) if runs_dir is not None else runs.default_runs_dir()
    try:
        active = jobs.active_run(folder) if folder.is_dir() else None
    except OSError:
        active = None
    if active is not None:
        return f"training run {active} is going"
    if os.environ.get(THREADS_ENV, "").strip().isdigit():  # a fixed thread count: answers get it at any load
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and generation_threads(cores, load) < cores:  # answers would not get the step's thread count
        return f"the machine is busy (1-minute load {load:.1f} on {cores} cores)"
    return None


def memory_short(weight_bytes: int) -> str | None:
    """Why a compile for a step reading `weight_bytes` of weights should not start for lack of memory, or None
    (also when the available memory cannot be read)."""
    available = available_memory()
    need = MEMORY_FACTOR * weight_bytes
    if available is None or available >= need:
        return None
    return f"the memory available ({available / 2**30:.1f} GiB) is short of its ~{need / 2**30:.1f} GiB"


def available_memory() -> int | None:
    """Bytes this process may still take: the kernel's MemAvailable, within the cgroup's limit where one is set
    (a container's MemAvailable is its host's)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def lower_priority() -> None:
    """The calling thread, and inductor's compile threads that already exist, at nice 19. Threads and processes
    started from a thread inherit its nice value (Linux: it is per thread), so the compiler process inherits it."""
    tids = [threading.get_native_id()] + _inductor_pool_tids()
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, NICE)
        except (AttributeError, OSError):
            pass


def _inductor_pool_tids() -> list[int]:
    """Native ids of inductor's async-compile thread pool, where one was made (it compiles C++ kernels 2 at a
    time on 2 cores: config.compile_threads)."""
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:
        return []
    if AsyncCompile.pool.cache_info().currsize == 0:  # functools.lru_cache: no pool yet (ours will inherit)
        return []
    pool: Any = AsyncCompile.pool()
    return [t.native_id for t in getattr(pool, "_threads", ()) if t.native_id is not None]
