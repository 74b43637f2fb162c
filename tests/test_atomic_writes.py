"""Files two writers may save at the same moment, each through runs.write_atomic's own temporary: an adapter zip's
verification.json and a run's eval/<timestamp>.json are written by the app and by a CLI beside it (export, evaluate),
and by a library caller's threads. The app's queue runs one zip export or evaluation at a time ("generate"), so
within one app the writers are the app and another process. Before, both used one temporary name with no pid
(<file>.tmp): one writer renamed the other's half-written file into place, or found its temporary gone
(FileNotFoundError). Threads stand in for the writers here (a thread is the narrowest case: same pid): real files,
the real functions."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from phi3_lora import evaluate, verify

WRITERS = 4
ROUNDS = 150
DIFFERENCES = 2000  # a sidecar of ~100 KiB: large enough that writes overlap


def _at_once(write: Callable[[int], Any]) -> list[Any]:
    """write(i) for each writer in its own thread, all released together; every failure of a writer is the finding."""
    start = threading.Barrier(WRITERS)
    errors: list[BaseException] = []
    out: list[Any] = [None] * WRITERS

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = write(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    return out


def test_verifications_of_one_export_saved_at_once_leave_one_whole_sidecar_and_no_temporary(tmp_path: Path) -> None:
    zip_path = tmp_path / "run-adapter.zip"
    zip_path.write_bytes(b"PK")
    results = [verify.Verification("adapter", DIFFERENCES, i,
                                   differences=[f"#{n} writer {i}" for n in range(DIFFERENCES)])
               for i in range(WRITERS)]
    wholes = [json.dumps(r.to_dict(), indent=2) for r in results]
    for _ in range(ROUNDS):
        _at_once(lambda i: verify.save(results[i], zip_path))
        got = verify.sidecar(zip_path).read_text(encoding="utf-8")
        assert got in wholes, (len(got), got[-80:])
        assert sorted(p.name for p in tmp_path.iterdir()) == [zip_path.name, verify.sidecar(zip_path).name]


def test_evaluations_saved_in_one_second_each_keep_their_own_whole_result_and_no_temporary(tmp_path: Path) -> None:
    rows = [{"prompt": "p" * 40, "answer": "a" * 40, "n": n} for n in range(1000)]
    for round_ in range(ROUNDS // 5):
        folder = tmp_path / f"run-{round_}"
        results = [{"writer": i, "rows": rows} for i in range(WRITERS)]
        paths = _at_once(lambda i: evaluate.save_result(results[i], folder))
        wholes = [json.dumps({k: v for k, v in r.items() if k != "file"}) for r in results]
        assert len(set(paths)) == WRITERS, paths  # each evaluation keeps a file of its own: none replaced another
        for i, path in enumerate(paths):
            got = json.loads(path.read_text(encoding="utf-8"))
            assert json.dumps(got) == wholes[i], sorted(got)
        assert all(p.suffix == ".json" for p in evaluate.eval_dir(folder).iterdir())  # no temporary left behind
