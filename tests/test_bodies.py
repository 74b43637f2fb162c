"""What a stranger may send the app (phi3_lora.ui.bodies) and make it hold: through the real server of a share link,
raw HTTP as any client could send it. gradio bounds one uploaded file and nothing else."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from helpers.apps import free_port
from helpers.run_folders import RUN_ID, make_adapter_run

MiB = 2**20
# Small limits, so the test sends little: a file of 1 MB at most, 2 MiB of files per client in gradio's cache.
LIMITS: dict[str, Any] = {"received_total": 8 * MiB, "received_share": 4 * MiB, "received_anonymous": 3 * MiB,
                          "received_anonymous_client": 2 * MiB, "request_bytes": 1 * MiB}


QWEN_RUN = "20260101-000001-qwen"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> Iterator[Any]:
    from phi3_lora import quotas
    from phi3_lora.ui import AppOptions, build_app, launch

    runs = tmp_path_factory.mktemp("bodies") / "runs"
    make_adapter_run(runs, tiny_llama_dir)  # finished runs for Compare (no training), on two base models
    make_adapter_run(runs, tiny_qwen2_dir, QWEN_RUN)
    # A queue of 4 events: each sender may have 2 in it at once.
    demo = build_app(options=AppOptions(runs_dir=runs, default_model=str(tiny_llama_dir), shared=True,
                                        max_file_size="1mb", queue_max_size=4,
                                        limits=quotas.Limits(**LIMITS)))
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url.rstrip("/"), demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def shared(served: Any) -> str:
    return served[0]


def _join(base: str, content: Any) -> httpx.Response:
    return httpx.post(f"{base}/gradio_api/queue/join", content=content, timeout=60,
                      headers={"content-type": "application/json"})


def _event(base: str, api_name: str, values: list[Any], session: str, client: str) -> httpx.Response:
    """Join the queue as the page does, as `client` (the address a share link's tunnel appended)."""
    config = httpx.get(f"{base}/config", timeout=60).json()
    dep = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    kinds = {c["id"]: c["type"] for c in config["components"]}
    given = iter(values)
    data = [None if kinds[i] == "state" else next(given) for i in dep["inputs"]]
    return httpx.post(f"{base}/gradio_api/queue/join", timeout=60, headers={"x-forwarded-for": client}, json={
        "data": data, "fn_index": dep["id"], "session_hash": session, "event_data": None, "trigger_id": None})


def _upload(base: str, files: list[tuple[str, bytes]], client: str) -> httpx.Response:
    # Through a share link's tunnel (a loopback peer) the client is the address the tunnel appended last.
    return httpx.post(f"{base}/gradio_api/upload", files=[("files", f) for f in files], timeout=60,
                      headers={"x-forwarded-for": client})


def test_an_events_inputs_are_bounded_before_they_are_read(shared: str) -> None:
    """A 300 MB prompt sent to the queue raised the app's memory by 0.9 GB and stayed while the event waited: a body
    over the bound is refused, with or without a Content-Length, before gradio reads it."""
    huge = json.dumps({"data": ["x" * (3 * MiB)], "fn_index": 0, "session_hash": "big1", "event_data": None})
    answer = _join(shared, huge)
    assert answer.status_code == 413 and "size limit (1 MiB)" in answer.text and "shorten" in answer.text, \
        answer.text[:300]
    answer = _join(shared, iter([b"x" * (MiB // 2)] * 6))  # no length said: counted as it arrives
    assert answer.status_code == 413 and "size limit" in answer.text, answer.text[:300]
    config = httpx.get(f"{shared}/config", timeout=60).json()  # an ordinary event still goes in
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "use_sample")
    answer = _join(shared, json.dumps({"data": [], "fn_index": fn, "session_hash": "small1", "event_data": None}))
    assert answer.status_code == 200 and "event_id" in answer.json(), answer.text[:300]


def test_files_sent_to_the_upload_route_count_for_their_sender(shared: str) -> None:
    """gradio's upload route took a thousand files of the size limit per request, as often as asked, into its cache
    (kept for an hour): one client could fill the disk. One request carries one file's worth; what a client sent
    within the cache's life counts in its room, and another client keeps its own."""
    many = _upload(shared, [(f"part{i}.bin", os.urandom(MiB // 2)) for i in range(3)], "198.51.100.7")
    assert many.status_code == 413 and "size limit" in many.text and "one file at a time" in many.text, many.text[:300]
    for i in range(2):
        sent = _upload(shared, [(f"mine{i}.jsonl", os.urandom(900 * 2**10))], "198.51.100.7")
        assert sent.status_code == 200 and sent.json()[0].endswith(f"mine{i}.jsonl"), sent.text[:300]
    third = _upload(shared, [("mine2.jsonl", os.urandom(900 * 2**10))], "198.51.100.7")
    assert third.status_code == 413, third.text[:300]
    assert "your network address have" in third.text and "files sent" in third.text, third.text
    assert "deleted within 90 minutes" in third.text, third.text
    other = _upload(shared, [("theirs.jsonl", os.urandom(900 * 2**10))], "203.0.113.9")
    assert other.status_code == 200, other.text[:300]
    # An upload that does not say its length would not be counted: refused (a browser's always says it).
    boundary = "p3boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"sly.jsonl\"\r\n\r\n"
            ).encode() + os.urandom(900 * 2**10) + f"\r\n--{boundary}--\r\n".encode()
    sly = httpx.post(f"{shared}/gradio_api/upload", content=iter([body]), timeout=60, headers={
        "x-forwarded-for": "198.51.100.7", "content-type": f"multipart/form-data; boundary={boundary}"})
    assert sly.status_code == 411 and "must say its length" in sly.text, (sly.status_code, sly.text[:300])


def test_the_app_holds_one_base_model_at_a_time(served: Any) -> None:
    """Compare kept an engine per base model and setting for good: a visitor whose adapters name one base after
    another (each checked to fit the memory alone) made the app hold them all until it was killed for memory. Moving
    to another base drops the one before."""
    from gradio_client import Client

    url, demo = served
    client = Client(url, verbose=False)
    for run_id, model in ((RUN_ID, "tiny_llama"), (QWEN_RUN, "tiny_qwen2"), (RUN_ID, "tiny_llama")):
        client.predict("What is LoRA?", run_id, 0.7, 0.9, 8, 0, [], [], "", api_name="/compare")
        held = [key[0] for key in demo.phi3_state.engines]
        assert len(held) == 1 and model in held[0], (run_id, held)


def test_one_client_cannot_fill_the_queue(shared: str) -> None:
    """gradio's queue holds queue_max_size events of everybody together, a Compare answer pair up to 120 s each: one
    client that joined that many kept every other visitor out ('Queue is full') for an hour. A sender has at most
    half of it waiting or running; another client still gets in."""
    ask = ["What is LoRA?", RUN_ID, 0.7, 0.9, 64, 0, [], [], ""]  # Compare's inputs, as the page sends them
    first = [_event(shared, "compare", ask, f"busy{i}", "198.51.100.20") for i in range(2)]  # one runs, one waits
    assert all(r.status_code == 200 and "event_id" in r.json() for r in first), [r.text[:200] for r in first]
    third = _event(shared, "compare", ask, "busy2", "198.51.100.20")
    assert third.status_code == 503, third.text[:300]
    said = third.json()["detail"]
    assert "2 requests waiting or running" in said and "one visitor may have 2" in said and "Wait" in said, said
    other = _event(shared, "use_sample", [], "calm1", "203.0.113.20")
    assert other.status_code == 200 and "event_id" in other.json(), other.text[:300]


def test_queued_events_are_not_callable_around_the_queue(shared: str) -> None:
    """Off Spaces gradio also serves every queued event at gradio_api/run/<name>, which ran it at once: around the
    queue, its concurrency limits (one job, one generation at a time) and each sender's share of it. Only the queue
    takes them; an unqueued one (the Train tab's poll) still answers there."""
    around = httpx.post(f"{shared}/gradio_api/run/use_sample", json={"data": []}, timeout=60)
    assert around.status_code == 404 and "join the queue" in around.text, (around.status_code, around.text[:300])
    config = httpx.get(f"{shared}/config", timeout=60).json()
    poll = next(d for d in config["dependencies"] if d.get("api_name") == "poll_run")
    assert poll.get("queue") is False
    answer = httpx.post(f"{shared}/gradio_api/run/poll_run", json={"data": [RUN_ID, None]}, timeout=60)  # run, state
    assert answer.status_code == 200 and RUN_ID in answer.text, answer.text[:300]
