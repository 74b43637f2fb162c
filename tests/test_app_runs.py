"""The app with a runs folder a crash, a hand edit or a restart can leave (issue 13 items 4 and 6), through its
HTTP API: every list and the poll keep working, each corrupt run reads "unreadable: <reason>", and Stop never
signals a process a pid file names unless it is provably the run's (not an unrelated one, not the app itself)."""

from __future__ import annotations

import html
import os
import subprocess
from pathlib import Path

import pytest
from helpers.run_folders import corrupt_runs

from helpers.apps import free_port, val
from helpers.run_folders import make_adapter_run
from phi3_lora import events
from phi3_lora.runs import ProcessRecord, RunDir

pytestmark = pytest.mark.slow

HEALTHY = "20260101-000000-healthy"
REUSED = "20250101-000010-pid-reused"
OWN = "20250101-000011-own-pid"


def serve(runs: Path, model_dir: Path):
    from gradio_client import Client

    from phi3_lora.ui import build_app, launch

    demo = build_app(runs, default_model=str(model_dir))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, Client(url, verbose=False)


def _interrupted_run(runs: Path, run_id: str, record: str) -> RunDir:
    run = RunDir(runs / run_id)
    run.path.mkdir(parents=True)
    run.config.write_bytes(RunDir(runs / HEALTHY).config.read_bytes())
    events.append_event(run.path, "start", step=0, max_steps=10)
    run.process_file.write_text(record)
    return run


def choices(update) -> list[tuple[str, str]]:
    return [tuple(c) for c in update["choices"]]


def test_corrupt_runs_and_reused_pids_through_the_app(tmp_path, tiny_llama_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    expected = corrupt_runs(runs)
    make_adapter_run(runs, tiny_llama_dir, HEALTHY)
    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    _interrupted_run(runs, REUSED, str(sleeper.pid))
    _interrupted_run(runs, OWN, ProcessRecord.of(os.getpid()).to_json())  # the app's own pid, a valid record
    try:
        for attempt in ("first start", "after a restart"):
            demo, c = serve(runs, tiny_llama_dir)
            try:
                loaded = c.predict(api_name="/load_page")
                run_list, status_html = loaded[0], loaded[1]
                assert val(run_list) == HEALTHY and "finished" in status_html, attempt
                labels = dict((v, label) for label, v in choices(run_list))
                assert set(labels) == set(expected) | {HEALTHY, REUSED, OWN}
                for run_id, phrase in expected.items():
                    assert "unreadable: " in labels[run_id] and phrase in labels[run_id], labels[run_id]
                compare_list, export_list = loaded[-2], loaded[-1]
                for adapters in (compare_list, export_list, c.predict(None, api_name="/list_adapters"),
                                 c.predict(None, api_name="/list_export_adapters")):
                    assert HEALTHY in [v for _, v in choices(adapters)], adapters
                assert HEALTHY in [v for _, v in choices(c.predict(HEALTHY, api_name="/list_runs")[0])]
                if attempt != "first start":
                    continue
                for run_id, phrase in expected.items():
                    polled = html.unescape(c.predict(run_id, "", api_name="/poll_run")[1])
                    assert "unreadable" in polled and phrase in polled, polled
                    assert "unreadable" in c.predict(run_id, api_name="/select_run")[0]
                    with pytest.raises(Exception, match="cannot be resumed|not UTF-8|must be text|deeply"):
                        c.predict(run_id, api_name="/resume_training")

                # Pid reuse: an unrelated process and the app's own pid are never signalled.
                for run_id in (REUSED, OWN):
                    assert "interrupted" in c.predict(run_id, "", api_name="/poll_run")[1]
                    with pytest.raises(Exception, match="not running"):
                        c.predict(run_id, api_name="/stop_training")
                    assert sleeper.poll() is None
                assert val(c.predict(api_name="/load_page")[0]) == HEALTHY  # the server is still up
            finally:
                demo.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [e["type"] for e in events.read_events(runs / REUSED)] == ["start"]
