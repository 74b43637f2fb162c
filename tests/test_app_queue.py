"""The app's queue does not busy-poll: gradio's own intervals (1 ms for an event to start, 10 ms for progress)
woke its event loop ~1,100 times a second, idle or not, and during Compare on a 2-core CPU each wake took the GIL
and a core from the decoding threads (docs/benchmarks.md). The served app's queue polls at the app's intervals,
and an event still starts and finishes through it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.apps import client, served_app


def test_the_served_queue_polls_at_the_apps_intervals_and_still_runs_events(tmp_path: Path,
                                                                              tiny_llama_dir: Path) -> None:
    from phi3_lora.ui import app as app_module

    with served_app(tmp_path / "runs", tiny_llama_dir) as (url, demo):
        queue = demo._queue
        assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (
            app_module.QUEUE_POLL_S, app_module.PROGRESS_POLL_S) == (0.02, 0.05)
        result = client(url).predict(api_name="/use_sample")  # a queued event, start to end
        assert "sample_chat" in str(result), result
