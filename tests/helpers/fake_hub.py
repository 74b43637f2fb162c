"""A Hugging Face Hub on 127.0.0.1 (model and dataset repos of given file sizes) that records every request, and
pointing huggingface_hub in this process at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers.local_http import LocalServer


class FakeModelHub:
    """A Hub on 127.0.0.1 holding model (and dataset) repos (repo id -> file name -> its bytes, or its size to be served as zeros)
    that records every request."""

    def __init__(self, repos: dict[str, dict[str, int | bytes]]) -> None:
        import json
        from http.server import BaseHTTPRequestHandler

        seen: list[str] = []
        sha = "1" * 40

        def size(content: int | bytes) -> int:
            return content if isinstance(content, int) else len(content)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                seen.append(f"{self.command} {self.path}")
                path = self.path.split("?", 1)[0]
                if path.startswith(("/api/datasets/", "/datasets/")):  # a dataset repo: served like a model repo
                    path = path.replace("/api/datasets/", "/api/models/", 1).removeprefix("/datasets")
                repo_id = next((r for r in repos if path == f"/api/models/{r}"
                                or path.startswith((f"/api/models/{r}/", f"/{r}/resolve/"))), None)
                files = repos.get(repo_id or "", {})
                status, headers = 200, {"Content-Type": "application/json"}
                if repo_id is None:
                    status, body, headers = 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
                elif "/tree/" in path:  # what snapshot_download lists
                    body = json.dumps([{"type": "file", "path": name, "size": size(c), "oid": "0" * 40}
                                       for name, c in files.items()]).encode()
                elif path.startswith("/api/models/"):
                    body = json.dumps({"id": repo_id, "sha": sha, "private": False, "siblings": [
                        {"rfilename": name, "size": size(c)} for name, c in files.items()]}).encode()
                else:
                    content = files.get(path.split("/resolve/", 1)[1].split("/", 1)[1], b"")
                    body = content if isinstance(content, bytes) else b"\0" * min(content, 2**20)
                    headers = {"X-Repo-Commit": sha, "ETag": f'"{hash(body)}"'}
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

        self.seen = seen
        self._served = LocalServer(Handler)
        self.url = self._served.url

    def close(self) -> None:
        self._served.close()


def online(hub: FakeModelHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeModelHub:
    """huggingface_hub in this process talks to `hub`, with an empty cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return hub
