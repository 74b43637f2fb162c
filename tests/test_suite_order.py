"""The suite's own scheduling (tests/conftest.py, README's `-n 2 --dist loadfile`): every file its lists name
exists, and the scheduler hands out whole units, costliest first. A renamed or deleted test file left in
COSTLIEST_FIRST or SHARED_UNITS would otherwise lose its place without a word (run last, or apart from its unit)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest

TESTS = Path(__file__).resolve().parent


def test_every_name_in_the_scheduling_lists_is_a_test_file_or_a_shared_unit() -> None:
    files = {p.name for p in TESTS.glob("test_*.py")}
    units = set(conftest.SHARED_UNITS.values())
    assert not set(conftest.SHARED_UNITS) - files, "SHARED_UNITS names a file not in tests/"
    assert not set(conftest.COSTLIEST_FIRST) - files - units, "COSTLIEST_FIRST names a file not in tests/"
    assert len(set(conftest.COSTLIEST_FIRST)) == len(conftest.COSTLIEST_FIRST), "a name twice in COSTLIEST_FIRST"
    # a file of a shared unit is scheduled as its unit, so its own name in COSTLIEST_FIRST would never match
    assert not set(conftest.COSTLIEST_FIRST) & set(conftest.SHARED_UNITS)
    assert units <= set(conftest.COSTLIEST_FIRST), "a shared unit without a place in COSTLIEST_FIRST"


class FakeWorker:
    """What xdist's scheduler uses of a worker."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent += indices

    def shutdown(self) -> None:
        self.shutting_down = True


def test_the_scheduler_hands_out_whole_units_costliest_first() -> None:
    pytest.importorskip("xdist")
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True),
                             getvalue=lambda name: {"dist": "loadfile", "tx": ["2*popen"]}[name])
    scheduler = conftest.pytest_xdist_make_scheduler(config, SimpleNamespace(loadscopesched=lambda *args: None))
    # pytest's collection order: alphabetical files; the shared unit's files are apart from each other
    collection = [f"tests/{file}::test_{i}" for file, n in
                  (("test_a.py", 3), ("test_browser.py", 2), ("test_browser_evaluate.py", 1), ("test_gguf.py", 1),
                   ("test_learns_a_fact.py", 2), ("test_z.py", 1)) for i in range(n)]
    workers = [FakeWorker("gw0"), FakeWorker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
    for worker in workers:
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    handed_out = [[conftest.work_unit(collection[i]) for i in worker.sent] for worker in workers]
    # each worker got whole units, the two costliest first; one more where at most 2 tests were left (xdist's rule)
    assert handed_out == [["test_browser.py"] * 2 + ["test_gguf.py"], ["embedded_sample_run"] * 3]
    assert list(scheduler.workqueue) == ["test_a.py", "test_z.py"]  # the units not listed, in collection order
