"""The app under test: free ports, launching app.py as a process and waiting until it serves, and calling its
endpoints through gradio_client (inputs by widget label)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample_chat.jsonl"
NO_MAPPING = {"headers": ["field the format expects", "column in your data"], "data": [["", ""]], "metadata": None}
# Max steps of a run that a test stops itself and checks while it trains: it cannot end first, on any machine
# (400 steps of the tiny models took ~95 s on an idle 2-core machine: not far from what a test does meanwhile).
ENDLESS_STEPS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def val(x: Any) -> Any:
    """The value of an output that may come back as an update dict."""
    return x.get("value") if isinstance(x, dict) and x.get("__type__") == "update" else x


def endpoint_args(api: Any, endpoint: str, **by_label: Any) -> list[Any]:
    """An endpoint's inputs in order: each widget's default, replaced where its label is given. `api`: a
    gradio_client Client or its view_api dict."""
    if hasattr(api, "view_api"):
        api = api.view_api(print_info=False, return_format="dict")
    endpoint = endpoint.lstrip("/")
    params = api["named_endpoints"][f"/{endpoint}"]["parameters"]
    labels = [p.get("label") or "" for p in params]
    missing = set(by_label) - set(labels)
    assert not missing, f"/{endpoint} has no input labelled {missing}"
    return [by_label[label] if label in by_label else p.get("parameter_default") for label, p in zip(labels, params)]


NO_SCORING = {"Score answers at the end": False}


def start_args(c: Any, **by_label: Any) -> list[Any]:
    """Start's inputs in order: each widget's default, replaced where its label is given. The end-of-run scoring
    of answers is off unless a test asks for it: it loads the model again and answers every held-out row (a run
    ends only after it), and test_evaluate and the browser tests are where it is checked."""
    return endpoint_args(c, "start_training", **{**NO_SCORING, **by_label})


@contextmanager
def app_process(args: list[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None,
                app: Path | str = ROOT / "app.py", ready: str = "gradio_api/info",
                timeout: float = 400) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python app.py --port P ARGS` as a process; yields (url, process) once `ready` answers (a 401 under --auth
    counts: it is up), and stops it afterwards. A busy machine takes minutes to import torch and gradio."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(app), "--port", str(port), *args], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py {' '.join(args)} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + ready, timeout=5):
                    break
            except urllib.error.HTTPError:  # 401 with --auth: it is up
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py {' '.join(args)} did not serve in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def served_app(runs: Path, model: Path | str, **launch_options: Any) -> Iterator[tuple[str, Any]]:
    """The app built in this process on a free port (`auth=...` and other launch options pass through); yields
    (url, Blocks). On the way out a run still going is stopped, then the server closes."""
    from phi3_lora import jobs
    from phi3_lora.ui import build_app, launch

    demo = build_app(runs, default_model=str(model))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True, **launch_options)
    try:
        yield url, demo
    finally:
        active = jobs.active_run(runs)
        if active:
            jobs.stop_run(active, runs, grace=5)
        demo.close()


def raw_call(url: str, api_name: str, data: list[Any], session_hash: str = "rawcall1") -> tuple[str, list[Any]]:
    """An endpoint called as the page calls it (the queue), no client-side processing: (the answer's text exactly as
    the server sent it, its decoded outputs). What a visitor's browser could read is all in that text."""
    import json

    import httpx

    base = url.rstrip("/")
    config = httpx.get(f"{base}/config", timeout=60).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name.lstrip("/"))
    joined = httpx.post(f"{base}/gradio_api/queue/join", timeout=60, json={
        "data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None, "trigger_id": None})
    event_id = joined.json()["event_id"]
    lines = []
    with httpx.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session_hash},
                      timeout=600) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            message = json.loads(line[len("data: "):]) if line.startswith("data: ") else {}
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                output = message.get("output") or {}
                assert message.get("success"), output
                return "\n".join(lines), output.get("data") or []
    raise AssertionError(f"/{api_name} never completed:\n" + "\n".join(lines)[-2000:])
