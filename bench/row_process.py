"""One row, measured in a fresh Python process: `spawn` starts `python -m bench.train_speed --one-row` (or
bench/peer_unsloth.py for an Unsloth row), `collect` waits for its result; in that process `one_row_main` builds the
row's trainer and times it (`measure`), and `finish` adds the row's fields and its MFU."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.prestart import await_go, quiet
from bench.report import SAME_LOSS_STEP
from bench.row_sets import Row, all_rows, named
from bench.row_trainers import engine_patch, patched, run_engine, run_recipe
from bench.timing import release_memory

ROOT = Path(__file__).resolve().parents[1]
FLOP_PER_TOKEN = 16.2e9
PEAK_FLOPS = 790e12


def measure(row: Row, model_dir: Path, data: dict[str, Path], steps: int,
            extra_patch: dict[str, Any] | None = None) -> dict[str, Any]:
    """One recipe or engine row in this process (`extra_patch`: --engine-patch, engine rows only)."""
    from bench.timing import SettleTimer, time_trainer

    release_memory()
    started = time.time()
    timer = SettleTimer(steps, min_total=SAME_LOSS_STEP, quiet=functools.partial(quiet, model_dir.parent),
                        free=row.free, logged=row.logged)
    extra = (extra_patch or {}) if row.kind == "engine" else {}
    with tempfile.TemporaryDirectory() as tmp, patched({**row.patch, **extra}):
        build = run_recipe if row.kind == "recipe" else run_engine
        trainer, opts = build(row, model_dir, data[row.data], timer.max_steps(), Path(tmp))
        opts["phases_s"] = {"build": round(time.time() - started, 2)}  # imports, load, LoRA, trainer
        if extra:
            opts["engine_patch"] = extra
        result = time_trainer(trainer, timer)
        del trainer
    release_memory()
    return finish(result, row, opts, started)


def finish(result: dict[str, Any], row: Row, opts: dict[str, Any], started: float) -> dict[str, Any]:
    result.update(name=row.name, kind=row.kind, data=row.data, four_bit=row.four_bit, options=opts,
                  mfu=result["tokens_per_s"] * FLOP_PER_TOKEN / PEAK_FLOPS, wall_s=time.time() - started,
                  recipe_ref=row.recipe_ref, budget_gb=row.budget_gb)
    return result


@dataclass
class RowProcess:
    """A row's process: started (`spawn`), maybe waiting for its go file, collected with `collect`."""

    row: Row
    proc: subprocess.Popen
    out: Path
    go_file: Path | None
    spawned_at: float
    go_at: float = 0.0

    def go(self) -> None:
        """Let a pre-started process begin the row's work (its time counts from here)."""
        if self.go_file is not None:
            self.go_file.touch()
        self.go_at = time.time()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def spawn(row: Row, args: argparse.Namespace, work: Path, extra: list[str] | None = None,
          prestart: bool = False) -> RowProcess:
    """Start one row in a fresh Python process (the peer's with its own packages first on the path). With
    `prestart` the process only imports, then waits for `RowProcess.go` (bench/prestart.py); else it goes now.
    `extra`: more arguments for the row's process (bench/peer_unsloth.py's --profile)."""
    stem = work / f"row-{os.getpid()}-{time.time_ns()}"
    out, go_file = stem.with_suffix(".json"), (stem.with_suffix(".go") if prestart else None)
    common = ["--workdir", str(work), "--steps", str(args.steps), "--row-json", str(out), *(extra or [])]
    common += ["--go-file", str(go_file)] if go_file else []
    patch = getattr(args, "engine_patch", None)
    common += ["--engine-patch", *patch] if row.kind == "engine" and patch else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if row.kind == "unsloth":
        cmd = [sys.executable, "-m", "bench.peer_unsloth", "--row", "=" + row.name, *common]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_path, str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", TRANSFORMERS_OFFLINE="1")
        # Unsloth writes the source of its patched modules under the working directory, which the device tool
        # refreshes between calls: kept with the bench's other files instead, as a user's stays between runs.
        env.setdefault("UNSLOTH_COMPILE_LOCATION", str(work / "unsloth_compiled_cache"))
    else:
        cmd = [sys.executable, "-m", "bench.train_speed", "--one-row", "=" + row.name, *common]
    rp = RowProcess(row, subprocess.Popen(cmd, cwd=ROOT, env=env), out, go_file, time.time())  # noqa: S603
    if not prestart:
        rp.go()
    return rp


def collect(rp: RowProcess, timeout: float) -> dict[str, Any]:
    """Wait for `rp` (killed `timeout` seconds after its go); its result, with `process_s` from the go to its end
    (the imports of a pre-started process are not in it) and `spawned_at`."""
    try:
        code = rp.proc.wait(timeout=max(1.0, rp.go_at + timeout - time.time()))
        failure = None if code == 0 and rp.out.exists() else f"row process exited {code}"
    except subprocess.TimeoutExpired:  # the row is a result (an error), the rows after it still run
        rp.kill()
        failure = f"row process killed after {timeout:.0f} s (--row-timeout or the call's deadline)"
    process_s = time.time() - rp.go_at
    row = rp.row
    if failure:
        return {"name": row.name, "kind": row.kind, "data": row.data, "wall_s": process_s, "process_s": process_s,
                "error": failure}
    return {**json.loads(rp.out.read_text(encoding="utf-8")), "process_s": process_s, "spawned_at": rp.spawned_at}


def measure_in_process(row: Row, args: argparse.Namespace, work: Path, timeout: float | None = None,
                       extra: list[str] | None = None) -> dict[str, Any]:
    """One row in its own process, now (`spawn`, `collect`; default timeout --row-timeout)."""
    return collect(spawn(row, args, work, extra), timeout or args.row_timeout)


def one_row_main(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    row = next(r for r in all_rows() if named(r, args.one_row))
    model_dir = work / "phi3-mini-random"
    data = {"full": work / "full.jsonl", "mix": work / "mix.jsonl"}
    pre: dict[str, Any] = {}
    try:
        pre = await_go(args.go_file, row.kind, work)
        result = measure(row, model_dir, data, args.steps, engine_patch(args.engine_patch))
    except Exception as exc:  # noqa: BLE001 - a row that fails is a result too
        import traceback

        traceback.print_exc()
        result = {"name": row.name, "kind": row.kind, "data": row.data, "error": f"{type(exc).__name__}: {exc}"}
    Path(args.row_json).write_text(json.dumps({**result, **pre}, default=str), encoding="utf-8")
    return 0
