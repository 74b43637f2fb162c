"""A web request never uses the server's Hugging Face token (issue 13, item 1), tried against a fake Hub.

`python app.py` runs as the owner would start it, in each sharing mode, with HF_TOKEN set to a secret and
HF_ENDPOINT pointed at a small HTTP server on 127.0.0.1 that records the Authorization header of every request.
A visitor then pushes an adapter with an empty token box, opens a Hub adapter in Compare, validates a Hub
dataset and asks for the estimate of a Hub model. In demo, share, --auth and Space modes no request carries the
server's token; visitors' own tokens (typed in the form, or their Sign in with Hugging Face token) are used
and never echoed. The owner at the machine is the positive control: there the server's token does reach the
fake Hub, so the test sees tokens when they are sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers.apps import app_process as launched_app
from helpers.apps import endpoint_args
from helpers.local_http import NOT_FOUND, LocalServer, read_body, send_json
from helpers.run_folders import RUN_ID, make_adapter_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SERVER_TOKEN = "hf_SERVERsecretOWNERtoken"
PASTED = "hf_visitorPASTEDtoken"
OAUTH = "hf_visitorOAUTHtoken"
OAUTH_SECRET = "test-oauth-secret"


class FakeHub:
    """Answers every request with 404 'repo not found' and records (method, path, Authorization)."""

    def __init__(self) -> None:
        seen: list[tuple[str, str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                read_body(self)
                seen.append((self.command, self.path, self.headers.get("Authorization") or ""))
                send_json(self, 404, NOT_FOUND)

            do_GET = do_POST = do_HEAD = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.seen = seen
        self._served = LocalServer(Handler)
        self.url = self._served.url

    def close(self) -> None:
        self._served.close()


def forged_session(user: str, token: str) -> str:
    """The cookie Spaces' OAuth login leaves (starlette's signed session, gradio's secret scheme): the Hub's
    sign-in cannot run offline, so the test signs the visitor in the way the server would."""
    from itsdangerous import TimestampSigner

    info = {"oauth_info": {"access_token": token, "token_type": "bearer", "scope": "openid profile",
                           "expires_at": int(time.time()) + 3600,
                           "userinfo": {"sub": "7", "name": user, "preferred_username": user, "profile": "",
                                        "picture": "", "website": ""}}}
    secret = hashlib.sha256((OAUTH_SECRET + "-v4").encode()).hexdigest()
    return TimestampSigner(secret).sign(base64.b64encode(json.dumps(info).encode())).decode()


MODES: dict[str, dict[str, Any]] = {
    "owner": {"args": []},
    "demo": {"args": ["--demo"]},
    "share": {"args": ["--share"]},
    "auth": {"args": [], "env": {"PHI3_LORA_AUTH": "alice:pw-alice"}, "auth": ("alice", "pw-alice")},
    "space": {"args": [], "space": True},  # visited signed out, then signed in as bob
}


@contextmanager
def app_process(mode: str, runs: Path, model: Path, hub: FakeHub, home: Path) -> Iterator[tuple[str, Path]]:
    spec = MODES[mode]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADIO_", "SPACE", "OAUTH"))}
    env.update({"HF_ENDPOINT": hub.url, "HF_TOKEN": SERVER_TOKEN, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "GRADIO_ANALYTICS_ENABLED": "False",
                "GRADIO_SHARE_SERVER_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT), **spec.get("env", {})})
    if spec.get("space"):
        env.update({"SPACE_ID": "someone/phi3-lora", "SPACE_HOST": "someone-phi3-lora.hf.space", "SYSTEM": "spaces",
                    "OAUTH_CLIENT_ID": "client", "OAUTH_CLIENT_SECRET": OAUTH_SECRET, "OAUTH_SCOPES": "openid profile",
                    "OPENID_PROVIDER_URL": hub.url})
    log_path = home / f"{mode}.log"
    with launched_app(["--runs-dir", str(runs), "--model", str(model), *spec["args"]], cwd=home, env=env,
                      log_path=log_path) as (url, _):
        yield url, log_path


def fake_frpc(home: Path) -> None:
    """--share asks gradio for a tunnel; a tunnel binary that exits at once stands in for a machine without
    internet (gradio would otherwise try to download it)."""
    from gradio import tunneling

    folder = home / "gradio" / "frpc"
    folder.mkdir(parents=True)
    binary = folder / f"{tunneling.BINARY_REMOTE_NAME}_v{tunneling.VERSION}{tunneling.EXTENSION}"
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)


def visit(url: str, mode: str, signed_in_as: str | None = None) -> dict[str, str]:
    """What a visitor tries; returns each attempt's answer text (an error message or the outputs)."""
    from gradio_client import Client

    spec = MODES[mode]
    kwargs: dict[str, Any] = {"verbose": False}
    if spec.get("auth"):
        kwargs["auth"] = spec["auth"]
    if signed_in_as:
        kwargs["httpx_kwargs"] = {"cookies": {"session": forged_session(signed_in_as, OAUTH)}}
    client = Client(url, **kwargs)
    api = client.view_api(print_info=False, return_format="dict")
    calls = {
        "push, empty token": ("push_to_hub", {"Adapter": RUN_ID, "Repo id": "visitor/any-name", "Push": "adapter",
                                              "Hugging Face token": ""}),
        "compare, Hub adapter": ("compare", {"Adapter": "someone/private-adapter", "Prompt": "hi"}),
        "validate, Hub dataset": ("validate", {"Data source": "someone/private-dataset"}),
        "estimate, Hub model": ("estimate", {"Base model": "someone/gated-model"}),
    }
    if mode not in ("owner",):
        calls["push, pasted token"] = ("push_to_hub", {"Adapter": RUN_ID, "Repo id": "visitor/mine",
                                                       "Push": "adapter", "Hugging Face token": PASTED})
    answers = {}
    for name, (endpoint, by_label) in calls.items():
        try:
            answers[name] = json.dumps(client.predict(*endpoint_args(api, endpoint, **by_label),
                                                      api_name=f"/{endpoint}"), default=str)
        except Exception as exc:
            answers[name] = str(exc)
    return answers


def test_no_web_request_carries_the_servers_token(tmp_path_factory: pytest.TempPathFactory,
                                                  tiny_llama_dir: Path) -> None:
    runs = tmp_path_factory.mktemp("runs")
    make_adapter_run(runs, tiny_llama_dir)
    hubs = {mode: FakeHub() for mode in MODES}
    homes = {mode: tmp_path_factory.mktemp(f"home-{mode}") for mode in MODES}
    for home in homes.values():
        fake_frpc(home)
    results: dict[str, dict[str, str]] = {}
    with ExitStack() as stack:  # all apps start together: startup dominates the time on a busy machine
        apps = {mode: stack.enter_context(app_process(mode, runs, tiny_llama_dir, hubs[mode], homes[mode]))
                for mode in MODES}
        for mode, (url, _) in apps.items():
            results[mode] = visit(url, mode)
        before = len(hubs["space"].seen)
        results["space-signed-in"] = visit(apps["space"][0], "space", signed_in_as="bob")
        signed_in_headers = [auth for _, _, auth in hubs["space"].seen[before:]]
        logs = {mode: log.read_text() for mode, (_, log) in apps.items()}
    for hub in hubs.values():
        hub.close()

    report = []
    for mode in MODES:
        headers = [auth for _, _, auth in hubs[mode].seen]
        report.append(f"{mode}: {len(headers)} Hub requests, with the server's token: "
                      f"{sum(SERVER_TOKEN in h for h in headers)}")
        if mode == "owner":
            assert any(SERVER_TOKEN in h for h in headers), (hubs[mode].seen, results[mode])
            continue
        assert headers, f"{mode}: the visitor's calls reached no Hub at all: {results[mode]}"
        assert not any(SERVER_TOKEN in h for h in headers), (mode, hubs[mode].seen)
        answers = " ".join(results[mode].values())
        if mode != "space":
            assert not any(OAUTH in h for h in headers)
        assert PASTED not in answers and PASTED not in logs[mode] and OAUTH not in logs[mode], mode  # never echoed
        assert SERVER_TOKEN not in answers and SERVER_TOKEN not in logs[mode]
        if mode == "auth":  # the visitor's own token does reach the Hub
            assert any(PASTED in h for h in headers), (mode, hubs[mode].seen)
            assert "Pushing needs your own Hugging Face token" in results[mode]["push, empty token"]
        if mode in ("demo", "share", "space"):  # signed out
            assert "Not allowed for an anonymous visitor" in results[mode]["push, empty token"]
            assert "Not allowed for an anonymous visitor" in results[mode]["validate, Hub dataset"]
    # Bob signed in on the Space: his Sign in with Hugging Face token (or the one he typed), never the server's.
    answers = " ".join(results["space-signed-in"].values())
    assert any(OAUTH in h for h in signed_in_headers) and any(PASTED in h for h in signed_in_headers)
    assert not any(SERVER_TOKEN in h for h in signed_in_headers) and OAUTH not in answers and PASTED not in answers
    assert "Pushing needs your own" not in results["space-signed-in"]["push, empty token"]
    report.append(f"space signed in: {len(signed_in_headers)} Hub requests, with the visitor's own token: "
                  f"{sum(OAUTH in h or PASTED in h for h in signed_in_headers)}")
    print("\n[credentials] " + "; ".join(report))
