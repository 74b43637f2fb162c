"""Which (row, repeat) runs a call does, and when: runs earlier calls of this device session measured are not run
again, each run is sized by its earlier process time here (else FIRST_RUN_S), a run starts only if it fits what is
left of the call, and the next one imports while the current one works (bench/prestart.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from bench.prestart import overlap_s
from bench.row_sets import Row, named, run_order


# A row's process (imports, load, compile, timed steps) before it has run once on this machine: the upper end of
# issue 19's H200 calls, so the first call of a session packs no row it cannot finish.
FIRST_RUN_S = {"engine": 80.0, "recipe": 70.0, "unsloth": 115.0}


def pending_runs(rows: list[Row], first_repeat: int, repeats: int, done: set[tuple[str, int]],
                 last: list[str] | None = None) -> list[tuple[Row, int]]:
    """The (row, repeat) runs still to do, in run order (`run_order` per repeat), without those in `done`
    (earlier calls on this machine); rows named in `last` after every other run (pure)."""
    runs = [(row, rep) for rep in range(first_repeat, first_repeat + repeats) for row in run_order(rows, rep)
            if (row.name, rep) not in done]
    return sorted(runs, key=lambda run: any(named(run[0], n) for n in last or []))


def expected_s(row: Row, history: list[dict[str, Any]]) -> float:
    """How long a run of `row` will take, as a process: its longest earlier run here (+10%), else FIRST_RUN_S."""
    walls = [h["process_s"] for h in history if h.get("name") == row.name and h.get("process_s")]
    return max(walls) * 1.1 if walls else FIRST_RUN_S[row.kind]


def next_run(pending: list[tuple[Row, int]], history: list[dict[str, Any]], left_s: float | None
             ) -> tuple[Row, int] | None:
    """The first pending run expected to finish in `left_s` seconds (None: no deadline); a shorter one later in
    the list runs when the next one would not fit, so a call ends full rather than early (pure)."""
    for run in pending:
        if left_s is None or expected_s(run[0], history) <= left_s:
            return run
    return None


def done_runs(dirs: list[str]) -> tuple[set[tuple[str, int]], list[dict[str, Any]]]:
    """The (row, repeat) pairs measured without error in the GPU result files under `dirs` (earlier calls of this
    device session), and every run there (their process times size the next call)."""
    history: list[dict[str, Any]] = []
    for d in dirs:
        for f in sorted(Path(d).glob("*.json")) if Path(d).is_dir() else []:
            try:
                history += json.loads(f.read_text(encoding="utf-8")).get("runs", [])
            except (OSError, ValueError, AttributeError):
                continue
    return {(r["name"], r.get("repeat", 0)) for r in history if "error" not in r}, history


def run_series(pending: list[tuple[Row, int]], history: list[dict[str, Any]], results: list[dict[str, Any]],
               start: Callable[[Row, bool], Any], finish: Callable[[Any, float], dict[str, Any]], *,
               prestart: bool, row_timeout: float, seconds_left: Callable[[], float | None],
               stopped: Callable[[], bool], on_result: Callable[[dict[str, Any]], None]) -> None:
    """Run the pending (row, repeat) runs one at a time, each in its own process, appending their results to
    `results` (and calling `on_result` after each). `start(row, prestart)` starts a row's process (`spawn`),
    `finish(process, timeout)` waits for its result (`collect`). A run starts only if it is expected to end
    within `seconds_left()` (`next_run`; None: no deadline) and while not `stopped()`. With `prestart` the next run
    imports while the current one works and begins at its end (bench/prestart.py); if the current one ran so long
    that the next no longer fits, the next is stopped and goes back to the front of `pending`, which keeps every
    run not done."""

    def pick(after_s: float = 0.0) -> tuple[Row, int] | None:
        """The next run that fits what is left of the call once `after_s` more seconds are spent (next_run)."""
        if stopped():
            return None
        left = seconds_left()
        return next_run(pending, history + results, None if left is None else left - after_s)

    current: tuple[Any, int] | None = None
    while True:
        if current is None:
            run = pick()
            if run is None:
                return
            pending.remove(run)
            current = (start(run[0], False), run[1])
        ahead = pick(expected_s(current[0].row, history + results)) if prestart else None
        if ahead is not None:
            pending.remove(ahead)
        nxt = (start(ahead[0], True), ahead[1]) if ahead else None
        left = seconds_left()
        r = finish(current[0], min(row_timeout, left) if left else row_timeout)
        r["repeat"] = current[1]
        if results:  # did this run's imports meet the timed steps of the run before? (should be 0)
            r["import_overlap_s"] = round(overlap_s(results[-1].get("timed_window"), r.get("import_window")), 3)
        results.append(r)
        on_result(r)
        current = nxt
        if current is not None:
            left = seconds_left()
            if left is not None and expected_s(current[0].row, history + results) > left:
                current[0].kill()  # the one before ran long: this one no longer fits the call
                pending.insert(0, (current[0].row, current[1]))
                current = None
            else:
                current[0].go()
