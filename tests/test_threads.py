"""The CPU threads of generation: a thread that is done with torch lets go of its OpenMP helpers."""

from __future__ import annotations

import os
import threading
import time

import pytest


def _threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_thread_lets_go_of_its_openmp_helpers_so_the_streaming_worker_has_the_only_pool():
    import torch

    from phi3_lora import threads

    if torch.get_num_threads() < 2 or threads._omp_pause_resource_all() is None or not os.path.isdir("/proc/self/task"):
        pytest.skip("one CPU thread, or not torch's libgomp on Linux: no OpenMP pool to let go of")
    seen: dict[str, int] = {}

    def work() -> None:  # a fresh thread: its own pool, made by its first parallel op
        before = _threads_of_this_process()
        torch.ones(20_000_000).sum()
        seen["pool"] = _threads_of_this_process() - before
        assert threads.release_thread_pool()
        deadline = time.monotonic() + 5
        while _threads_of_this_process() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["after"] = _threads_of_this_process() - before
        torch.ones(20_000_000).sum()  # a later parallel op makes a new pool
        seen["again"] = _threads_of_this_process() - before

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen["pool"] == torch.get_num_threads() - 1  # the helpers of this thread's pool
    assert seen["after"] == 0
    assert seen["again"] == seen["pool"]
