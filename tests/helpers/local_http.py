"""A stand-in web server on 127.0.0.1 for tests that must see what the app sends (the fake Hubs): serves a
BaseHTTPRequestHandler class on a free port in a daemon thread until `close()`."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOT_FOUND = b'{"error": "Repository not found"}'


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request's body, read so the client is not left sending it."""
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def send_json(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    """A JSON answer as the Hub gives it: a 404 carries the Hub's RepoNotFound error code; HEAD gets no body."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    if status == 404:
        handler.send_header("X-Error-Code", "RepoNotFound")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


class LocalServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
