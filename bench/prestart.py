"""Pre-started row processes: the next row's process does its imports while the current row runs, then waits for
a go file; the row's own work (load, LoRA, compile, timed steps) starts only at the go.

Every GPU row runs in its own process, so a two-run table of 14 rows spent ~300 of one device session's 1,800 s
importing torch, transformers, trl and Unsloth (engine 6-10 s, Unsloth more). The imports are CPU work; done in
the shadow of the row before, they cost no device time. They must not land in the row before's timed steps (a
busy host core could slow a host-bound step): each run records when its imports ran (`import_window`) and its
timed steps (`timed_window`, bench/timing.py), and `overlap_s` says how long the two met; the bench prints it
and the table's notes say if any run's timed steps met a neighbour's imports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

POLL_S = 0.02
MAX_WAIT_S = 3600.0  # a pre-started process whose bench went away gives up


def preload(kind: str) -> None:
    """Import what a row of `kind` ("engine", "recipe" or "unsloth") imports before its first CUDA work."""
    if kind == "unsloth":
        import unsloth  # noqa: F401 - first, as the row itself does: it patches transformers, trl and peft
        from unsloth import FastLanguageModel  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    if kind == "engine":
        from phi3_lora import train  # noqa: F401


def await_go(go_file: str | None, kind: str) -> dict[str, Any]:
    """In a row's process: the imports, then (with a go file) wait until the file exists. Returns when each ran."""
    began = time.time()
    preload(kind)
    ready = time.time()
    if go_file:
        go = Path(go_file)
        go.with_suffix(".ready").touch()  # for whoever waits to see the imports done
        while not go.exists():
            if time.time() - ready > MAX_WAIT_S:
                raise TimeoutError(f"no go file {go} after {MAX_WAIT_S:.0f} s")
            time.sleep(POLL_S)
    return {"import_window": [began, ready], "go_at": time.time()}


def overlap_s(a: list[float] | None, b: list[float] | None) -> float:
    """Seconds two [start, end] windows share (0 when either is missing) (pure)."""
    if not a or not b:
        return 0.0
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
