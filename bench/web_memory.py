"""Memory left behind by visitors validating big uploads (issue 13, item 5).

Starts `python app.py --demo` (every request an anonymous visitor), then N browser sessions (gradio_client
clients) each upload a JSONL file of SIZE MB and validate it, a few at a time as the queue allows. Reports the
app process's resident memory at idle (after one validation of the sample, so the tokenizer is loaded), its
peak, and after all sessions finished; then the sessions close and their uploads must be gone.

    python -m bench.web_memory --sessions 10 --mb 100        # the issue's figure: RSS growth < 1.5 GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def write_jsonl(path: Path, mb: float) -> int:
    """A messages-format JSONL file of about `mb` MB; returns its row count."""
    row = {"messages": [{"role": "user", "content": "Tell me about the weather in Lisbon in spring. " * 8},
                        {"role": "assistant", "content": "Spring in Lisbon is mild, sunny and a little windy. " * 10}]}
    line = json.dumps(row) + "\n"
    n = int(mb * 2**20 // len(line))
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(line.replace("Lisbon", f"Lisbon {i}", 1))
    return n


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(runs: Path, model: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs-dir", str(runs),
                                 "--model", model, "--demo"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=runs.parent)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("app.py did not start")


def endpoint_args(client: Any, endpoint: str, **by_label: Any) -> list[Any]:
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"][f"/{endpoint}"]["parameters"]
    return [by_label.get(p.get("label") or "", p.get("parameter_default")) for p in params]


def measure(sessions: int = 10, mb: float = 100, model: str = "embedded: SmolLM2-135M-Instruct",
            workdir: Path | None = None) -> dict[str, Any]:
    from gradio_client import Client, handle_file

    work = Path(workdir or tempfile.mkdtemp(prefix="web-memory-"))
    runs = work / "runs"
    data = work / "big.jsonl"
    rows = write_jsonl(data, mb)
    proc, url = start_app(runs, model, work / "app.log")
    try:
        warm = Client(url, verbose=False)
        warm.predict(*endpoint_args(warm, "validate", **{"Data source": str(ROOT / "data" / "sample_chat.jsonl")}),
                     api_name="/validate")
        warm.close()
        time.sleep(2)
        idle, _ = rss_mib(proc.pid)
        results: list[str] = []
        clients: list[Any] = []
        lock = threading.Lock()

        def session() -> None:
            c = Client(url, verbose=False, httpx_kwargs={"timeout": 1800})  # 100 MB uploads on a busy machine
            with lock:
                clients.append(c)
            source = c.predict(handle_file(str(data)), api_name="/upload_dataset")
            summary = c.predict(*endpoint_args(c, "validate", **{"Data source": source}), api_name="/validate")[0]
            results.append(summary)

        t0 = time.monotonic()
        threads = [threading.Thread(target=session) for _ in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        time.sleep(2)
        after, peak = rss_mib(proc.pid)
        uploads = runs / ".uploads" / "sessions"
        held = sum(1 for _ in uploads.rglob("*.jsonl")) if uploads.exists() else 0
        for c in clients:
            c.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and uploads.exists() and any(uploads.rglob("*.jsonl")):
            time.sleep(1)
        left = sum(1 for _ in uploads.rglob("*.jsonl")) if uploads.exists() else 0
        return {"sessions": sessions, "file_mb": mb, "rows": rows, "validated": sum(f"{rows:,} usable" in r for r in results),
                "idle_rss_mib": round(idle), "peak_rss_mib": round(peak), "after_rss_mib": round(after),
                "growth_mib": round(after - idle), "seconds": round(took, 1), "uploads_held_before_close": held,
                "uploads_left_after_close": left, "answers": [r[:300] for r in results]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--mb", type=float, default=100)
    p.add_argument("--model", default="embedded: SmolLM2-135M-Instruct")
    args = p.parse_args()
    print(json.dumps(measure(args.sessions, args.mb, args.model), indent=1))


if __name__ == "__main__":
    main()
