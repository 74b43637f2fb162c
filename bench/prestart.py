"""Pre-started row processes: the next row's process does its imports while the current row runs, then waits for
a go file; the row's own work (load, LoRA, compile, timed steps) starts only at the go.

Every GPU row runs in its own process, so a two-run table of 14 rows spent ~300 of one device session's 1,800 s
importing torch, transformers, trl and Unsloth (engine 6-10 s, Unsloth more). The imports are CPU work; done in
the shadow of the row before, they cost no device time. They must not land in the row before's timed steps (a
busy host core could slow a host-bound step; Unsloth's imports take 30-40 s on the H200 machine, longer than an
engine row's set-up): a pre-started process marks itself importing, and a row's timer (bench/timing.py) adds
warm-up steps until no one is (`quiet`). Each run records when its imports ran (`import_window`) and its timed
steps (`timed_window`); `overlap_s` says how long the two met (the bench prints it: 0 when the rule held).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

POLL_S = 0.02
IMPORTING = "importing"  # folder under the bench's workdir: one file per pre-started process still importing
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


def await_go(go_file: str | None, kind: str, work: Path) -> dict[str, Any]:
    """In a row's process: the imports, then (with a go file) wait until the file exists. Returns when each ran.
    A pre-started process marks itself importing under `work` meanwhile (`quiet` reads the marks)."""
    began = time.time()
    mark = work / IMPORTING / str(os.getpid())
    if go_file:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    try:
        preload(kind)
    finally:
        mark.unlink(missing_ok=True)
    ready = time.time()
    if go_file:
        go = Path(go_file)
        go.with_suffix(".ready").touch()  # for whoever waits to see the imports done
        while not go.exists():
            if time.time() - ready > MAX_WAIT_S:
                raise TimeoutError(f"no go file {go} after {MAX_WAIT_S:.0f} s")
            time.sleep(POLL_S)
    return {"import_window": [began, ready], "go_at": time.time()}


def quiet(work: Path) -> bool:
    """No other live process is importing for a row now (a row's timer starts its timed steps only then)."""
    for mark in (work / IMPORTING).glob("*"):
        try:
            os.kill(int(mark.name), 0)
        except (ValueError, ProcessLookupError):
            continue  # not a pid, or the process is gone (killed while importing)
        except PermissionError:
            pass
        return False
    return True


def overlap_s(a: list[float] | None, b: list[float] | None) -> float:
    """Seconds two [start, end] windows share (0 when either is missing) (pure)."""
    if not a or not b:
        return 0.0
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
