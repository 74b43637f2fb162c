"""How often a visitor may call an unqueued event (phi3_lora.ui.bodies.CallRate): the Train tab's poll and the
draft's save are plain HTTP posts to gradio_api/run/<name>, answered at once, which no queue bounds. Through the
real server: a visitor's burst is refused past their rate and a loop is held to it, another visitor is not held
back, the owner is never limited, and a real browser's page (its 1 s poll, a dragged slider's draft saves) is never
refused. The app's own limits (quotas.LIMITS), not smaller ones: the page must pass under the numbers it ships with."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from helpers.apps import free_port
from helpers.run_folders import RUN_ID, make_adapter_run
from phi3_lora import quotas

LIMITS = quotas.LIMITS
# sent at once: far past the burst and what the rate refills while calls wait their turn (calls_wait_s)
BURST = 2 * (LIMITS.calls_burst + int(LIMITS.calls_per_s * LIMITS.calls_wait_s)) + 20


def _serve(runs: Path, model_dir: Path, shared: bool) -> Iterator[str]:
    from phi3_lora.ui import AppOptions, build_app, launch

    make_adapter_run(runs, model_dir)  # a finished run for the poll to read
    demo = build_app(options=AppOptions(runs_dir=runs, default_model=str(model_dir), shared=shared))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture(scope="module")
def visitors(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[str]:
    """A share link's server: every request is a visitor's, each client told apart by its address."""
    yield from _serve(tmp_path_factory.mktemp("rate_shared") / "runs", tiny_llama_dir, shared=True)


@pytest.fixture(scope="module")
def owners(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[str]:
    """A server on this machine only: every request is the owner's."""
    yield from _serve(tmp_path_factory.mktemp("rate_local") / "runs", tiny_llama_dir, shared=False)


def _poll(http: httpx.Client, base: str, client: str, run_id: str | None = RUN_ID) -> httpx.Response:
    # Through a share link's tunnel (a loopback peer) the client is the address the tunnel appended last.
    return http.post(f"{base}/gradio_api/run/poll_run", json={"data": [run_id, None]},
                     headers={"x-forwarded-for": client})


def _burst(base: str, client: str) -> list[httpx.Response]:
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=BURST)) as http, \
            ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda _: _poll(http, base, client), range(BURST)))


def test_a_visitors_burst_is_refused_past_their_rate_and_another_visitor_answered(visitors: str) -> None:
    answers = _burst(visitors, "198.51.100.30")
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429}, codes
    # at most the burst, and what the rate refills while the rest wait their turn, is answered
    assert codes.count(200) <= LIMITS.calls_burst + LIMITS.calls_per_s * (LIMITS.calls_wait_s + 5), codes
    refused = next(a for a in answers if a.status_code == 429).json()["error"]  # what the page shows
    assert "Too many requests" in refused and f"{LIMITS.calls_per_s:g} a second" in refused, refused
    assert "Wait a few seconds" in refused, refused
    with httpx.Client(timeout=60) as http:
        other = _poll(http, visitors, "203.0.113.30")
        assert other.status_code == 200 and RUN_ID in other.text, other.text[:300]
        time.sleep(LIMITS.calls_wait_s + LIMITS.calls_burst / LIMITS.calls_per_s)  # the bucket fills up again
        again = _poll(http, visitors, "198.51.100.30")
        assert again.status_code == 200, again.text[:300]


def test_a_visitor_calling_in_a_loop_is_held_to_their_rate(visitors: str) -> None:
    """One call after another, each waiting for its answer: past the burst each waits its turn, so the loop runs
    at calls_per_s, not as fast as the server answers (a poll with no run picked: ~35 ms)."""
    calls = LIMITS.calls_burst + 4 * int(LIMITS.calls_per_s)
    started = time.monotonic()
    with httpx.Client(timeout=60) as http:
        codes = [_poll(http, visitors, "198.51.100.31", None).status_code for _ in range(calls)]
    took = time.monotonic() - started
    assert codes == [200] * calls, codes
    assert took >= 4 * 0.9, took  # the calls past the burst came at calls_per_s


def test_the_owners_burst_is_never_refused(owners: str) -> None:
    codes = [a.status_code for a in _burst(owners, "198.51.100.32")]
    assert codes == [200] * BURST, codes


def test_the_pages_own_polls_and_draft_saves_are_never_refused(visitors: str, browser: Any) -> None:
    """A visitor's page: the draft saved on every change while a slider is dragged and a number typed fast, and the
    Train tab's poll every second: every unqueued call it makes is answered."""
    from helpers.browser import open_app

    config = httpx.get(f"{visitors}/config", timeout=60).json()
    named = {d["id"]: d.get("api_name") for d in config["dependencies"]}
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    calls: list[tuple[str, int]] = []  # (api name, status) of each unqueued call: gradio_api/run/predict, fn_index
    page.on("response", lambda r: calls.append((named.get((r.request.post_data_json or {}).get("fn_index")), r.status))
            if "/gradio_api/run/" in r.url else None)
    try:
        open_app(page, visitors)
        page.get_by_role("tab", name="2 · Model & LoRA").click(timeout=120_000)
        slider = page.locator("#cfg-lora-r input[type=range]")
        box = slider.bounding_box(timeout=120_000)
        assert box is not None
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + 2, y)
        page.mouse.down()
        for i in range(120):  # dragged end to end and back
            page.mouse.move(box["x"] + box["width"] * abs((i % 60) - 30) / 30, y)
            page.wait_for_timeout(16)
        page.mouse.up()
        steps = page.get_by_label("Max steps", exact=True)
        for _ in range(3):  # a number typed fast, three times: a draft save on every key
            steps.click()
            steps.press("Control+a")
            steps.press_sequentially("123456789", delay=20)
        page.get_by_role("tab", name="3 · Train").click()  # its timer polls while the tab shows
        page.wait_for_timeout(6_000)
    finally:
        page.close()
    names = [name for name, _ in calls]
    assert names.count("poll_run") >= 3 and names.count("save_draft") >= 10, names
    assert all(status == 200 for _, status in calls), [c for c in calls if c[1] != 200]
