"""Password login for --auth: where the passwords come from, and a login that slows down guessers.

Gradio checks a plain user/password list as fast as it is asked (200 wrong passwords in 2.8 s). Here the check
is an async callable gradio awaits: after FREE_FAILURES failed logins of one client, or for one user name, each
further attempt waits (doubling, up to MAX_DELAY_S) and attempts of that client or name queue one behind the
other, so sending many in parallel does not help; beyond MAX_WAITING queued attempts the rest are refused
unchecked (a flood can neither try its guesses nor pile up waiting requests). A success clears the client's and
the name's count.

The client is the connection's address; through a local proxy or tunnel (peer on loopback) the address the
proxy appended last to X-Forwarded-For. That header can be forged through a tunnel, so the per-name count is
the backstop.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Awaitable, Callable

from phi3_lora.access import LOOPBACK_HOSTS

log = logging.getLogger("phi3_lora.ui")

AUTH_ENV = "PHI3_LORA_AUTH"
FREE_FAILURES = 3
BASE_DELAY_S = 1.0
MAX_DELAY_S = 30.0
MAX_WAITING = 4
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("phi3_lora_client", default="unknown")


# --- where the passwords come from ---------------------------------------------------------------------

def parse_credentials(text: str, where: str) -> list[tuple[str, str]]:
    """'user:password' lines (blank lines and # comments skipped); ValueError names the bad line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where}, line {number}: expected user:password")
        out.append((user.strip(), password))
    return out


def load_credentials(flag: str | None, file: str | None, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """--auth USER:PASS, else --auth-file FILE, else $PHI3_LORA_AUTH; [] when none is given. The file and the
    variable keep the password out of `ps`."""
    env = os.environ if env is None else env
    if flag:
        return parse_credentials(flag, "--auth")
    if file:
        try:
            text = Path(file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--auth-file {file}: cannot read it ({exc.__class__.__name__})") from None
        creds = parse_credentials(text, f"--auth-file {file}")
        if not creds:
            raise ValueError(f"--auth-file {file}: no user:password line in it")
        return creds
    if env.get(AUTH_ENV, "").strip():
        return parse_credentials(env[AUTH_ENV], AUTH_ENV)
    return []


# --- slowing down guessers -----------------------------------------------------------------------------

def client_key(scope: dict[str, Any]) -> str:
    peer = (scope.get("client") or ("unknown", 0))[0]
    if peer in LOOPBACK_HOSTS:
        for name, value in scope.get("headers") or []:
            if name == b"x-forwarded-for":
                last = value.decode("latin-1").split(",")[-1].strip()
                if last:
                    return last
    return str(peer)


class ClientAddress:
    """ASGI middleware: the requesting client's address, for the login check (gradio passes it only the user
    name and password)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        token = CLIENT.set(client_key(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)


def delay_for(failures: int, free: int = FREE_FAILURES, base: float = BASE_DELAY_S, cap: float = MAX_DELAY_S) -> float:
    """Seconds to wait before checking an attempt after `failures` failed ones (pure)."""
    return 0.0 if failures < free else min(cap, base * 2 ** (failures - free))


def throttled_login(credentials: list[tuple[str, str]], *, free: int = FREE_FAILURES, base: float = BASE_DELAY_S,
                    cap: float = MAX_DELAY_S) -> Callable[[str, str], Awaitable[bool]]:
    """The async `auth` callable for gradio's launch (a coroutine function: gradio awaits only those)."""
    users = {user: password.encode() for user, password in credentials}
    failures: dict[str, int] = defaultdict(int)
    waiting: dict[str, int] = defaultdict(int)
    locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def check(username: str, password: str) -> bool:
        keys = (f"client:{CLIENT.get()}", f"user:{username}")
        if any(waiting[k] >= MAX_WAITING for k in keys):
            return False  # refused unchecked: this guess is never compared
        for k in keys:
            waiting[k] += 1
        try:
            return await _checked(keys, username, password)
        finally:
            for k in keys:
                waiting[k] -= 1

    async def _checked(keys: tuple[str, str], username: str, password: str) -> bool:
        async with locks[keys[0]], locks[keys[1]]:
            wait = max(delay_for(failures[k], free, base, cap) for k in keys)
            if wait:
                await asyncio.sleep(wait)
            expected = users.get(username)
            ok = hmac.compare_digest(password.encode(), expected if expected is not None else b"\0" * 32) \
                and expected is not None
            for k in keys:
                failures[k] = 0 if ok else failures[k] + 1
            if not ok and failures[keys[0]] == free:
                log.warning("login: %d failed attempts from %s; further attempts are slowed down", free, keys[0][7:])
            return ok

    return check
