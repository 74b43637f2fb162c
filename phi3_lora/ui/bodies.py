"""How much a web request may send: an ASGI middleware in front of gradio's routes (ui.app.launch installs it).

gradio bounds one uploaded file (max_file_size) and nothing else: its upload route takes a thousand files per request
into its cache, as often as it is asked, and an event's inputs are read into memory whole, however large. Here every
request that is not the owner's is bounded before gradio reads it (quotas.Limits): an upload by one file of
max_file_size and by the sender's room for files in gradio's cache ('received': what they sent within
upload_cache_s), any other body by request_bytes. A refusal is a 413 whose text says what to do.

gradio's queue holds queue_max_size events of everybody together, each up to minutes long (a Compare answer pair:
120 s): one client that joined that many kept every other visitor out ("Queue is full"). Each sender (quotas.holder_of)
has at most half of the queue waiting or running (quotas.Limits.events_share); past it a join is refused as the queue
refuses one when full (503), with what to do.

An unqueued event (the Train tab's poll, the draft's save) is a plain HTTP post to gradio_api/run/<name> (or
api/<name>), answered at once: no queue bounds how often a client calls it. Each sender has a rate of them
(quotas.Limits.calls_*, a token bucket): a call past it waits its turn, up to calls_wait_s, so the page's own calls
(one poll a second, one draft save at a time) are slowed at most, never refused; past that wait it is refused (429)
with what to do. The policy of who may call what (access.py) is not asked: this is how often, not whether.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

from phi3_lora import access, quotas
from phi3_lora.errors import UserError

# A multipart request carries its file and a few headers and boundaries around it.
MULTIPART_OVERHEAD = 64 * 2**10


class Received:
    """What each holder (quotas.holder_of) sent to the upload route and gradio's cache still keeps: a ledger in
    memory, since the cache is this process's and is emptied with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[quotas.Held] = deque()

    def admit(self, room: quotas.Room, holder: str, size: int, now: float, keep_s: float) -> UserError | None:
        """Count `size` bytes for `holder` and return None, or the refusal when they do not fit `room` (entries older
        than `keep_s` have left gradio's cache and count no more)."""
        with self._lock:
            while self._entries and now - self._entries[0].used_at > keep_s:
                self._entries.popleft()
            used = quotas.usage(self._entries)
            if quotas.over(room, used, holder, size):
                return quotas.room_refusal(room, used, holder, size, "This upload",
                                           instead="Files sent here are deleted within 90 minutes.")
            self._entries.append(quotas.Held("upload", holder, size, now))
            return None


class CallRate:
    """Each holder's unqueued calls (is_direct_call) as a token bucket: `calls_burst` at once, refilled at
    `calls_per_s`. In memory: a rate, not a record. One event loop touches it (no await inside), so no lock."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # holder -> (tokens, when counted); below 0: calls waiting

    def wait_for(self, holder: str, now: float, limits: quotas.Limits) -> float | None:
        """Seconds this call waits for its turn (0: none), counting it; None, not counted, when that would be over
        `limits.calls_wait_s`."""
        rate, burst = limits.calls_per_s, float(limits.calls_burst)
        if len(self._buckets) > 4096:  # forget the holders whose bucket has filled up again
            self._buckets = {h: (t, at) for h, (t, at) in self._buckets.items() if t + (now - at) * rate < burst}
        tokens, at = self._buckets.get(holder, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate) - 1
        wait = max(0.0, -tokens / rate)
        if wait > limits.calls_wait_s:
            self._buckets[holder] = (tokens + 1, now)
            return None
        self._buckets[holder] = (tokens, now)
        return wait


def is_direct_call(scope: dict[str, Any]) -> bool:
    """An event called at once, outside the queue: gradio's gradio_api/run/<name> and gradio_api/api/<name> (the
    page's unqueued events; queued ones are refused there, api_open=False)."""
    parts = scope.get("path", "").rstrip("/").split("/")
    return (scope.get("method") == "POST" and len(parts) >= 3 and parts[-3] == "gradio_api"
            and parts[-2] in ("run", "api"))


def _rate_refusal(limits: quotas.Limits) -> UserError:
    return UserError(f"Too many requests from you at once: this app answers {limits.calls_per_s:g} a second from "
                     f"one visitor (a page makes about one).",
                     hint="Wait a few seconds, then try again; close other tabs of this app that you do not use.")


def is_upload(scope: dict[str, Any]) -> bool:
    """gradio's file upload route (under any root path)."""
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/").endswith("/upload")


def is_join(scope: dict[str, Any]) -> bool:
    """A request that puts an event in gradio's queue: the page's join or the REST API's call."""
    path = scope.get("path", "")
    return scope.get("method") == "POST" and (path.rstrip("/").endswith("/queue/join") or "/call/" in path)


def _declared_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def web_requester(state: Any, scope: dict[str, Any]) -> access.Requester:
    """The policy's view of a raw request (before gradio made a gr.Request of it): the --auth user its cookie names
    (gradio's own token table), the Sign in with Hugging Face session, the client's network."""
    from starlette.requests import HTTPConnection

    from phi3_lora.ui.guard import requester_of

    app, username = scope.get("app"), None
    if getattr(app, "tokens", None) is not None:
        cookies = HTTPConnection(scope).cookies
        cookie_id = getattr(app, "cookie_id", "")
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        username = app.tokens.get(token) if token else None
    return requester_of(state, SimpleNamespace(username=username, scope=scope, session_hash=None))


def _too_large(size: int | None, limit: int, upload: bool) -> UserError:
    """The refusal of a body over `limit` (`size`: its length, None when it came without one and was cut off)."""
    what = "An upload" if upload else "A request"
    how = ("Send one file at a time, each within the upload limit." if upload else
           "Files go through an upload button; shorten what you typed or send it in parts.")
    of = f"of {quotas.size_text(size)}" if size is not None else "that goes on"
    return UserError(f"{what} {of} is over this app's size limit ({quotas.size_text(limit)}).", hint=how)


class BodyLimit:
    """ASGI middleware: refuse (413) a request body over its bound before the app reads it; a body without a length
    is counted as it arrives and cut off at the bound."""

    def __init__(self, app: Any, state: Any, max_file_size: int | None) -> None:
        self.app, self.state = app, state
        self.max_file_size = max_file_size
        self.received = Received()
        self.joining: dict[str, int] = {}  # holder -> joins on their way into the queue (one event loop: no lock)
        self.calls = CallRate()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        holder = quotas.holder_of(web_requester(self.state, scope))
        if holder is None:  # the owner: never bounded
            await self.app(scope, receive, send)
            return
        limits: quotas.Limits = getattr(self.state.options, "limits", quotas.LIMITS)
        upload = is_upload(scope)
        limit = (self.max_file_size or limits.request_bytes) + MULTIPART_OVERHEAD if upload else limits.request_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, _too_large(declared, limit, upload))
            return
        if is_direct_call(scope):
            wait = self.calls.wait_for(holder, time.monotonic(), limits)
            if wait is None:
                await _refuse(send, _rate_refusal(limits), status=429)
                return
            if wait:
                await asyncio.sleep(wait)
        if is_join(scope):
            # Joins sent at once are counted from when they pass here until gradio has queued them (or not).
            refused = self._events_refusal(scope, holder, limits)
            if refused is not None:
                await _refuse(send, refused, status=503)
                return
            self.joining[holder] = self.joining.get(holder, 0) + 1
            try:
                await self._bounded(scope, receive, send, limit, upload)
            finally:
                self.joining[holder] -= 1
            return
        if upload and declared is None:  # counted by what it says it sends: a browser's upload always says it
            await _refuse(send, UserError("An upload must say its length (Content-Length).",
                                          hint="Upload the file with the page's upload button or gradio_client."),
                          status=411)
            return
        if upload:
            room = limits.received()
            refused = self.received.admit(room, holder, declared, time.time(), limits.upload_cache_s)
            if refused is not None:
                await _refuse(send, refused)
                return
        await self._bounded(scope, receive, send, limit, upload)

    def _events_refusal(self, scope: dict[str, Any], holder: str, limits: quotas.Limits) -> UserError | None:
        """None while `holder` has fewer events in gradio's queue (waiting or running, or being queued now) than their
        share of it."""
        app = scope.get("app")
        queue = getattr(getattr(app, "get_blocks", lambda: None)(), "_queue", None)
        events = list(getattr(queue, "event_ids_to_events", {}).values())
        share = max(1, int((getattr(queue, "max_size", None) or 32) * limits.events_share))
        mine = self.joining.get(holder, 0)
        for event in events:
            request = getattr(event, "request", None)
            event_scope = getattr(request, "scope", None)
            if isinstance(event_scope, dict) and (quotas.holder_of(web_requester(self.state, event_scope))
                                                  or quotas.OWNER) == holder:
                mine += 1
        if mine < share:
            return None
        return UserError(f"You have {mine} requests waiting or running on this server; one visitor may have {share} "
                         f"at once, so others get their turn.",
                         hint="Wait for an answer to finish (or close other tabs of this app), then try again.")

    async def _bounded(self, scope: dict[str, Any], receive: Any, send: Any, limit: int, upload: bool) -> None:
        """Pass the request on, counting its body: past `limit` the app is told the client left, and its answer is
        replaced by the refusal."""
        seen, cut = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal seen, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    cut = True
                    return {"type": "http.disconnect"}
            return message

        refused = False

        async def replaced(message: dict[str, Any]) -> None:
            nonlocal refused
            if not cut:
                await send(message)
            elif not refused:
                refused = True
                await _refuse(send, _too_large(None, limit, upload))

        await self.app(scope, counted, replaced)


async def _refuse(send: Any, error: UserError, status: int = 413) -> None:
    """The refusal as gradio answers a refused join (JSON 'detail', which the page shows) or a failed direct call
    (429: JSON 'error', which the page shows), else as plain text (413: too large, 411: an upload that does not say
    its length)."""
    if status in (503, 429):
        key = "detail" if status == 503 else "error"
        body, kind = json.dumps({key: str(error)}).encode("utf-8"), b"application/json"
    else:
        body, kind = str(error).encode("utf-8"), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
