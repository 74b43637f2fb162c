"""The Compare tab's scoring panel in a real browser: it shows the run's saved scores, Evaluate scores again,
and every number on the page is the saved JSON's. Screenshot: test-output/screenshots/evaluate.png (and
docs/screenshots/evaluate.png with PHI3_LORA_DOCS_SCREENSHOTS=1)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest

from helpers.browser import open_app, screenshots_dir
from phi3_lora import evaluate, scores
from phi3_lora.ui import evaluation

pytestmark = [pytest.mark.slow, pytest.mark.browser]
EVAL_MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def app_url(embedded_sample_run: Path):
    from phi3_lora.ui import build_app, launch

    demo = build_app(embedded_sample_run.parent, default_model="embedded: SmolLM2-135M-Instruct")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def shows_table(page, result: dict) -> None:
    """Every cell of the result's summary is in the table on the page. Waited for, not read once: the table is
    another component than the status line that named the result, and may render after it."""
    from playwright.sync_api import expect

    summary = page.locator("#p3-eval-summary")
    for row in scores.summary_table(result["summary"]):
        for cell in row:
            expect(summary).to_contain_text(cell, use_inner_text=True, timeout=30_000)


def test_scores_in_the_compare_tab_are_the_saved_ones(browser, app_url, embedded_sample_run):
    assert walk_the_scoring_panel(browser, app_url, embedded_sample_run).stat().st_size > 0


def walk_the_scoring_panel(browser: Any, app_url: str, run_dir: Path) -> Path:
    """Open Compare, check the shown scores are the newest saved JSON's, press Evaluate, check again."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_app(page, app_url)
    page.get_by_role("tab", name="4 · Compare").click()
    expect(page.locator("#p3-compare-source input")).to_have_value(re.compile("final adapter"), timeout=60_000)
    # Picking the run shows its newest saved result.
    saved = evaluate.latest_result(run_dir)
    expect(page.locator("#p3-eval-status")).to_contain_text(Path(saved["file"]).name, timeout=60_000)
    shows_table(page, saved)

    before = len(evaluate.load_results(run_dir))
    # Evaluate answers with the tab's "Max new tokens": 32, not the default 128. The 135M model's base answers run to
    # the limit, so the default made this click most of the file's time; the panel under test shows whatever the
    # saved result holds, at any length. The accordion is closed again, so the screenshot stays as it was.
    generation = page.get_by_text("Generation settings (shared by both sides)", exact=True)
    generation.click()
    max_new = page.get_by_label("number input for Max new tokens")
    max_new.fill(str(EVAL_MAX_NEW_TOKENS))
    max_new.press("Tab")
    expect(page.get_by_label("range slider for Max new tokens")).to_have_value(str(EVAL_MAX_NEW_TOKENS))
    generation.click()
    page.get_by_role("button", name="Evaluate on held-out rows").click()
    expect(page.locator("#p3-eval-status")).not_to_contain_text(Path(saved["file"]).name, timeout=600_000)
    results = evaluate.load_results(run_dir)
    assert len(results) == before + 1
    newest = results[-1]
    assert newest["settings"]["max_new_tokens"] == EVAL_MAX_NEW_TOKENS  # the tab's setting, as the panel sent it
    expect(page.locator("#p3-eval-status")).to_contain_text(Path(newest["file"]).name)
    shows_table(page, newest)
    for row in newest["rows"]:
        expect(page.locator("#p3-eval-rows")).to_contain_text(row["reference"][:30], use_inner_text=True,
                                                              timeout=30_000)
    # Every column keeps a readable width, an empty one too (a column of empty answers shrank to one letter).
    widths = page.evaluate("""(names) => [...document.querySelectorAll('#p3-eval-rows th')]
        .filter(th => names.includes(th.innerText.trim())).map(th => [th.innerText.trim(),
                                                                      th.getBoundingClientRect().width])""",
                           list(evaluate.ROW_HEADERS))
    assert {name for name, _ in widths} == set(evaluate.ROW_HEADERS), widths
    wanted = dict(zip(evaluate.ROW_HEADERS, evaluation.ROW_COLUMN_WIDTHS))
    assert all(abs(width - float(wanted[name].removesuffix("px"))) <= 2 for name, width in widths), widths
    shot = screenshots_dir() / "evaluate.png"
    page.locator("#p3-evaluate").scroll_into_view_if_needed()
    page.screenshot(path=str(shot), full_page=True, timeout=120_000)  # a busy CI machine renders slowly
    page.close()
    return shot
