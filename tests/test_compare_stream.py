"""Compare streams both answers to the browser a few times a second, not once per token, and its last update
carries the whole answers.

The real app (built in this process, served on a free port) on a tiny-Llama run, called as the page calls it (the
queue's event stream, every message counted and timed); the whole answers are the engine's own, from a fresh
ChatEngine of the same model and adapter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.apps import served_app
from helpers.run_folders import RUN_ID, make_adapter_run
from phi3_lora.ui.common import message_text
from phi3_lora.ui.compare import STREAM_EVERY_S

pytestmark = pytest.mark.slow

PROMPT = "Tell me a long story about the sea."
TOKENS = 256  # a long answer: the random tiny model rarely ends one early


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[tuple[str, Path, Path]]:
    runs = tmp_path_factory.mktemp("runs")
    run_dir = make_adapter_run(runs, tiny_llama_dir)
    with served_app(runs, tiny_llama_dir) as (url, _):
        yield url, run_dir, tiny_llama_dir


def _answers(outputs: list[Any]) -> tuple[str, str]:
    """Both chats' last answers, up to whitespace (gradio's Chatbot trims an answer's ends and dedents its lines)."""
    return tuple(_shown(message_text(chat[-1]["content"])) if chat and chat[-1]["role"] == "assistant" else ""
                 for chat in outputs[:2])


def _shown(text: str) -> str:
    return " ".join(text.split())


def compare_stream(url: str, temperature: float) -> dict[str, Any]:
    """One Compare answer through the queue as the page gets it (bench.app_stream.queue_outputs): each streamed
    update's answers and the final outputs, with the call's wall seconds."""
    import httpx

    from bench.app_stream import queue_outputs

    config = httpx.get(f"{url.rstrip('/')}/config", timeout=60).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "compare")
    data = [PROMPT, RUN_ID, temperature, 0.9, TOKENS, 0, [], [], None, ""]
    started = time.monotonic()
    updates: list[tuple[str, str]] = []
    for final, outputs in queue_outputs(url, fn_index, data):
        if final:
            return {"updates": updates, "final": outputs, "wall": time.monotonic() - started}
        updates.append(_answers(outputs))
    raise AssertionError("the compare call never completed")


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_compare_streams_a_few_updates_a_second_and_ends_with_the_whole_answers(app, temperature) -> None:
    from phi3_lora.generate import ChatEngine, GenerationSettings

    url, run_dir, model = app
    got = compare_stream(url, temperature)
    engine = ChatEngine(str(model), run_dir / "adapter")
    whole = tuple(_shown(text) for text in engine.answer_pairs(
        [[{"role": "user", "content": PROMPT}]], GenerationSettings(temperature=temperature, max_new_tokens=TOKENS))[0])
    tokens = max(len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in whole)
    assert tokens >= TOKENS // 2, f"the answer is too short to show streaming ({tokens} tokens)"
    # the final chats (and the last update) hold the whole answers, and the status says done
    assert _answers(got["final"]) == whole
    assert got["updates"][-1] == whole
    assert "done" in str(got["final"][3])
    # a few updates a second, not one per token: per token it was ~TOKENS + 2 messages
    updates = len(got["updates"])
    print(f"\n[stream] {updates} updates in {got['wall']:.2f} s for {tokens} tokens")
    assert updates <= got["wall"] / STREAM_EVERY_S + 4, (updates, got["wall"])
    # and still live: the answers showed while they grew, more than once before they were whole
    partial = [u for u in got["updates"] if any(u) and u != whole]
    assert len(partial) >= 2, got["updates"]

