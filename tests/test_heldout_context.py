"""Compare's "Held-out example" is the conversation scoring answers: the row's system prompt and earlier turns go
to both models, shown to the user, and a typed follow-up keeps the system prompt.

The real app (built in this process, served on a free port) on a finished tiny-Llama run whose held-out rows carry
a system prompt and two exchanges; called through gradio_client and walked in chromium. What the model receives is
read where it receives it: the token ids its embedding layer is called with (a torch forward pre-hook).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from helpers.apps import client, endpoint_args, served_app, val
from helpers.browser import open_app
from helpers.run_folders import RUN_ID, make_adapter_run
from phi3_lora.runs import RunDir
from phi3_lora.ui.common import message_text

pytestmark = pytest.mark.slow

ROWS = [{"messages": [{"role": "system", "content": f"You are Brisket {i}, a lighthouse keeper who speaks tersely."},
                      {"role": "user", "content": f"Where do you live, keeper {i}?"},
                      {"role": "assistant", "content": "On the rock at Skerry Point."},
                      {"role": "user", "content": f"What do you eat, keeper {i}?"},
                      {"role": "assistant", "content": f"Kelp soup, {i} bowls a day."}]} for i in range(2)]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[tuple[str, Path]]:
    runs = tmp_path_factory.mktemp("runs")
    run_dir = make_adapter_run(runs, tiny_llama_dir)
    RunDir(run_dir).eval_rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    with served_app(runs, tiny_llama_dir) as (url, _):
        yield url, run_dir


class PromptIds:
    """The token ids each model call's prompt (its first forward, longer than one token) reaches the embedding
    layer with: one row per side."""

    def __init__(self) -> None:
        self.prompts: list[list[list[int]]] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding) and args and args[0].dim() == 2 and args[0].shape[1] > 1:
            self.prompts.append(args[0].tolist())

    def __enter__(self) -> "PromptIds":
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _compare(c: Any, **by_label: Any) -> tuple[list[Any], list[list[int]]]:
    """One /compare call: its outputs and the prompt ids of each side."""
    args = endpoint_args(c, "compare", **{"Adapter": RUN_ID, "Max new tokens": 8, **by_label})
    with PromptIds() as seen:
        out = c.predict(*args, api_name="/compare")
    assert seen.prompts, "the model was never called with a prompt"
    return out, [row for call in seen.prompts for row in call]


def test_heldout_example_gives_both_models_the_rows_system_prompt_and_turns(app) -> None:
    from transformers import AutoTokenizer

    from phi3_lora.evaluate import prepare

    url, run_dir = app
    c = client(url)
    prompt, reference, system, base_chat, tuned_chat, status = c.predict(RUN_ID, api_name="/heldout_example")
    row = next(r for r in ROWS if r["messages"][-1]["content"] in val(reference))["messages"]
    # Shown: the system prompt in its box, the earlier exchange in both chats, the last user turn to send.
    assert system == row[0]["content"] and "system prompt" in status
    assert [(m["role"], message_text(m["content"])) for m in base_chat] == \
        [(m["role"], m["content"]) for m in row[1:3]]
    assert tuned_chat == base_chat and prompt == row[3]["content"]

    tokenizer = AutoTokenizer.from_pretrained(RunDir(run_dir).adapter)  # the template training saved
    item = prepare([{"messages": row}], tokenizer, 512, 8)[0][0]  # what held-out scoring answers
    expected = tokenizer.apply_chat_template(item.history, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    out, sides = _compare(c, Prompt=prompt, **{"System prompt": system, "Base model": base_chat,
                                               "Tuned (base + adapter)": tuned_chat})
    assert len(sides) == 2 and sides[0] == sides[1] == expected, "both sides get exactly scoring's prompt"
    text = tokenizer.decode(sides[0])
    assert row[0]["content"] in text and row[1]["content"] in text and row[2]["content"] in text
    assert "SmolLM" not in text  # the template's default system prompt did not stand in for the row's
    assert out[4] == {"__type__": "update"}, "the reference answers exactly this context: it stays shown"

    # A typed follow-up keeps the system prompt; the reference no longer answers the conversation and goes.
    out, sides = _compare(c, Prompt="And in winter?", **{"System prompt": system, "Base model": out[0],
                                                         "Tuned (base + adapter)": out[1]})
    assert len(sides) == 2 and all(tokenizer.decode(s).count(row[0]["content"]) == 1 for s in sides)
    assert all("And in winter?" in tokenizer.decode(s) for s in sides)
    assert val(out[4]) is None and out[4].get("visible") is False


@pytest.mark.browser
def test_browser_shows_the_heldout_rows_system_prompt(app, browser) -> None:
    from playwright.sync_api import expect

    url, _ = app
    page = browser.new_page()
    open_app(page, url)
    page.get_by_role("tab", name="4 · Compare").click(timeout=120_000)  # a busy machine renders slowly
    expect(page.locator("#p3-compare-source input")).to_have_value(re.compile("final adapter"), timeout=30_000)
    page.get_by_role("button", name="Held-out example").click()
    page.get_by_text("Reference answer", exact=True).wait_for(timeout=30_000)
    box = page.locator("#p3-system textarea")
    expect(box).to_have_value(re.compile(r"^You are Brisket \d, a lighthouse keeper"), timeout=30_000)
    assert page.get_by_label("System prompt").is_visible()
    for chat in ("#p3-base-chat", "#p3-tuned-chat"):  # the earlier exchange, on both sides
        expect(page.locator(chat)).to_contain_text("On the rock at Skerry Point.", timeout=30_000)
    expect(page.locator("#p3-prompt textarea")).to_have_value(re.compile(r"^What do you eat, keeper \d\?$"))
    expect(page.locator("#p3-compare-status")).to_contain_text("system prompt")
    page.close()
