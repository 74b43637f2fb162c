"""A real browser (Debian's chromium via Playwright) walks sample data -> settings -> train -> compare -> export.

Screenshots of every tab go to test-output/screenshots/ (docs/screenshots/, the README's, with
PHI3_LORA_DOCS_SCREENSHOTS=1; helpers.browser.screenshots_dir).
Skipped without /usr/bin/chromium unless PHI3_LORA_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from helpers.browser import RENDER_MS, open_app, screenshots_dir, stored_draft
from helpers.training import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    from phi3_lora import jobs
    from phi3_lora.ui import build_app, launch

    runs = tmp_path_factory.mktemp("browser_runs")
    demo = build_app(runs, default_model=str(tiny_llama_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    RUNS["dir"] = runs
    yield url
    if jobs.active_run(runs):
        jobs.stop_run(jobs.active_run(runs), runs, grace=5)
    demo.close()


RUNS: dict[str, Path] = {}
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_chat.jsonl"


def set_number(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Tab")


CATCH_UP_S = 20.0  # CI's two busy cores answered the 1 s poll only every 3-4 s; a bar stuck on a step never does


def shown_step(page) -> int:
    return int(re.search(r"step (\d+) /", page.locator("#p3-progress-stats").inner_text()).group(1))


def numbers_agree_with_the_events(page) -> None:
    """While the run trains, the bar never shows a step the events do not have, and it reaches the events' step of
    any moment within a few polls (how many depends on the machine's load, so this waits rather than assuming a
    lag); the run list, refreshed on state changes only, shows no step count that could lag behind it."""
    from phi3_lora import events, jobs

    run_id = jobs.active_run(RUNS["dir"])
    if run_id is None:  # already over: nothing live to compare
        return
    run_dir = RUNS["dir"] / run_id

    def diary_step() -> int:
        return events.status_from_events(events.read_events(run_dir), True).step

    for _ in range(4):
        written = diary_step()  # before the page is read: the page must reach at least this
        shown = shown_step(page)
        assert shown <= diary_step(), (shown, "a step the events do not have")
        deadline = time.time() + CATCH_UP_S
        while shown < written and time.time() < deadline:
            time.sleep(0.25)
            shown = shown_step(page)
        assert shown >= written, (f"the bar stayed at step {shown} for {CATCH_UP_S:.0f} s after the events "
                                  f"reached step {written}")
        label = page.locator("#p3-runs input").input_value()
        assert run_id in label and ("step" not in label or "running" not in label), label
        time.sleep(1.5)


def test_walk_through_the_app(browser, app_url: str) -> None:
    shots = screenshots_dir()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    t0 = time.time()
    page.goto(app_url, wait_until="domcontentloaded")
    dom = time.time() - t0
    page.wait_for_load_state("load")
    loaded = time.time() - t0
    # Not "networkidle": the Train tab's 1 s timer keeps the network busy by design.
    page.get_by_text("Your chat data").wait_for(timeout=RENDER_MS)
    rendered = time.time() - t0
    print(f"\n[timing] page load: DOMContentLoaded {dom:.2f} s, load {loaded:.2f} s, app rendered {rendered:.2f} s")

    # 1. Dataset: one button and go.
    page.get_by_role("button", name="Use the sample dataset").click()
    page.get_by_text("48 usable of 48 rows").wait_for(timeout=60_000)
    page.locator("#p3-token-preview .p3-trained").first.wait_for()
    assert "Quillon" in page.locator("#p3-token-preview").inner_text()
    page.screenshot(path=str(shots / "1-dataset.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly

    # 2. Settings: a short, strong run for the tiny model.
    page.get_by_role("tab", name="2 · Model & LoRA").click(timeout=120_000)  # a busy machine renders slowly
    set_number(page, "Max steps", "8")
    set_number(page, "Learning rate", "0.01")
    set_number(page, "Max length (tokens)", "128")
    # The run's closing answer scoring still runs, on short answers: the tiny random model never stops on its own,
    # so at the default length that scoring was two thirds of Start -> finished.
    advanced = page.get_by_text("Advanced settings", exact=True)
    advanced.click()
    set_number(page, "Scoring answer length (tokens)", "16")
    advanced.click()  # closed again, so the settings screenshot stays as it was
    page.locator("#p3-estimate").get_by_text("Trainable parameters").wait_for()
    page.get_by_role("button", name="Show config (YAML + CLI)").click()
    page.get_by_text("python -m phi3_lora train --config run.yaml").first.wait_for()
    page.screenshot(path=str(shots / "2-settings.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly

    # 3. Train: start, watch the curve, wait for the end.
    page.get_by_role("tab", name="3 · Train").click(timeout=120_000)  # a busy machine renders slowly
    t_start = time.time()
    page.get_by_role("button", name="Start training").click()
    page.locator("#p3-run-status").get_by_text("training").or_(
        page.locator("#p3-run-status").get_by_text("finished")).first.wait_for(timeout=120_000)
    numbers_agree_with_the_events(page)
    page.locator("#p3-run-status").get_by_text("finished").wait_for(timeout=600_000)
    print(f"[timing] browser: Start -> finished (tiny model, 8 steps) {time.time() - t_start:.1f} s")
    assert "8 / 8" in page.locator("#p3-progress-stats").inner_text()
    page.screenshot(path=str(shots / "3-train.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly

    # 4. Compare: the adapter is preselected; both panes answer.
    page.get_by_role("tab", name="4 · Compare").click(timeout=120_000)  # a busy machine renders slowly
    from playwright.sync_api import expect

    # The tab lists the finished run's adapter when it opens; wait for it before asking for an example.
    expect(page.locator("#p3-compare-source input")).to_have_value(re.compile("final adapter"), timeout=30_000)
    # Turn 1: a held-out question from the eval split, with its reference answer shown.
    page.get_by_role("button", name="Held-out example").click()
    page.get_by_text("Reference answer", exact=True).wait_for(timeout=30_000)
    prompt = page.locator("#p3-prompt textarea")
    expect(prompt).not_to_have_value("", timeout=30_000)
    question = prompt.input_value()
    page.get_by_role("button", name="Send", exact=True).click()
    page.get_by_text("done (temperature").wait_for(timeout=180_000)
    expect(prompt).to_have_value("", timeout=30_000)  # sent: the box is cleared for the next turn
    # Turn 2: typed; each pane keeps its own conversation, so both questions are in both panes.
    # Turn 1's "done" stays shown until turn 2's first update replaces it: a MutationObserver (it sees every change,
    # where polling could miss a short one) notes when it leaves, so the wait is for turn 2's own "done".
    page.evaluate("""() => {
      const done = () => (document.querySelector('#p3-compare-status')?.textContent || '').includes('done (temperature');
      window.p3Turn1DoneGone = false;
      new MutationObserver((_, observer) => {
        if (!done()) { window.p3Turn1DoneGone = true; observer.disconnect(); }
      }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    prompt.fill("What is your name?")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator("#p3-base-chat")).to_contain_text("What is your name?", timeout=180_000)
    page.wait_for_function("() => window.p3Turn1DoneGone && document.querySelector('#p3-compare-status')"
                           ".textContent.includes('done (temperature')", timeout=180_000)
    base = page.locator("#p3-base-chat").inner_text()
    tuned = page.locator("#p3-tuned-chat").inner_text()
    for text in (base, tuned):
        assert question in text and "What is your name?" in text
    page.screenshot(path=str(shots / "4-compare.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly

    # 5. Export.
    page.get_by_role("tab", name="5 · Export").click(timeout=120_000)  # a busy machine renders slowly
    expect(page.locator("#p3-export-source input")).to_have_value(re.compile("final adapter"), timeout=30_000)
    page.get_by_role("button", name="Build adapter zip").click()
    try:
        # the zip is verified in a fresh process before it is offered: minutes on a loaded 2-core machine
        page.locator("#p3-zip-file").get_by_text(re.compile(r"\.zip")).first.wait_for(timeout=600_000)
    finally:
        page.screenshot(path=str(shots / "5-export.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly
    page.close()


def test_reload_keeps_the_draft_and_load_settings_fills_the_form(browser, app_url: str) -> None:
    """Issue 16 items 1-3: the form and the dataset survive a reload and a second tab; a past run's settings load
    into the widgets; the upload's × clears the source."""
    from playwright.sync_api import expect

    shots = screenshots_dir()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    open_app(page, app_url)
    source = page.locator("#cfg-data-source").locator("textarea, input").first

    # Files dropped on the Column mapping table are not taken (it read a CSV into itself, or toasted
    # "Invalid file type"): the page's guard swallows the drag events before the table's handlers see them.
    # dispatchEvent runs every listener before it returns, so what reached the table is known at once (no waiting
    # for a toast that must not come): no event reached it, each was refused, the table is as it was.
    mapping = page.locator("#p3-mapping tbody")  # the cells only (the block may show a progress timer)
    before = mapping.inner_text()
    assert page.evaluate("window.p3DropGuard === true"), "the drop guard is a head script: in place before the app renders"
    reached = page.evaluate("""() => {
      const el = document.querySelector('#p3-mapping table') || document.querySelector('#p3-mapping');
      const kinds = ['dragenter', 'dragover', 'drop'], seen = [], allowed = [];
      const spy = (e) => seen.push(e.type);
      for (const kind of kinds) el.addEventListener(kind, spy);
      for (const [name, body] of [['x.csv', 'field,column\\nzzz,yyy\\n'], ['x.txt', 'hello']]) {
        const dt = new DataTransfer(); dt.items.add(new File([body], name));
        for (const kind of kinds) {
          const event = new DragEvent(kind, {dataTransfer: dt, bubbles: true, cancelable: true});
          if (el.dispatchEvent(event)) allowed.push(kind);  // true: nobody called preventDefault
        }
      }
      for (const kind of kinds) el.removeEventListener(kind, spy);
      return {seen, allowed};
    }""")
    assert reached == {"seen": [], "allowed": []}, reached
    assert mapping.inner_text() == before and "zzz" not in mapping.inner_text()
    expect(page.get_by_text("Invalid file type")).to_have_count(0)

    # The upload's × takes the file out of the source too.
    page.locator("#p3-upload input[type=file]").set_input_files(str(SAMPLE))
    page.get_by_text("sample_chat.jsonl: format messages").wait_for(timeout=60_000)
    expect(source).to_have_value(re.compile(r"^upload:[0-9a-f]{10}-sample_chat\.jsonl$"))  # no server folder
    page.locator("#p3-upload").get_by_label("Clear").click()
    expect(source).to_have_value("", timeout=30_000)
    page.get_by_text("No data yet").wait_for()

    # Upload again and edit the settings: a reload and a second tab bring all of it back.
    page.locator("#p3-upload input[type=file]").set_input_files(str(SAMPLE))
    page.get_by_text("48 usable of 48 rows").wait_for(timeout=60_000)
    page.get_by_role("tab", name="2 · Model & LoRA").click(timeout=120_000)  # a busy machine renders slowly
    set_number(page, "Max steps", "5")
    set_number(page, "Learning rate", "0.005")
    expect(page.locator("#p3-time")).to_contain_text("Time:", timeout=30_000)
    # The draft is saved on change (a round trip, then the page writes it to localStorage): reload only once the
    # stored draft holds these values, or the reload brings back an older one.
    wait_until(lambda: {k: float(v) for k, v in (stored_draft(page, RUNS["dir"]).get("settings") or {}).items()
                        if k in ("train.max_steps", "train.learning_rate")}
               == {"train.max_steps": 5.0, "train.learning_rate": 0.005}, timeout=60)
    for view in (page, context.new_page()):
        open_app(view, app_url, reload=view is page)
        view.get_by_text("48 usable of 48 rows").wait_for(timeout=60_000)
        expect(view.locator("#cfg-data-source").locator("textarea, input").first).to_have_value(re.compile(r"sample_chat\.jsonl$"))
        view.get_by_role("tab", name="2 · Model & LoRA").click()
        expect(view.get_by_label("Max steps", exact=True)).to_have_value("5", timeout=30_000)
        expect(view.get_by_label("Learning rate", exact=True)).to_have_value("0.005")

    # Load a past run's settings (the walk's run, or one written here): its values fill the widgets.
    run_id = write_past_run(RUNS["dir"])
    page.get_by_text("Load settings from a past run or a YAML file").click()
    # Opening fills the list and picks the newest run (the walk's, in the full suite): wait for that, then pick
    # this run from the list itself (typing raced with that fill and loaded the walk's run instead)
    picker = page.locator("#p3-load-run input")
    expect(picker).not_to_have_value("", timeout=30_000)
    picker.click()
    page.get_by_role("option", name=run_id, exact=True).click()
    expect(picker).to_have_value(run_id)
    page.get_by_role("button", name="Load this run's settings").click()
    page.get_by_text(f"Loaded the settings and data of {run_id}.").wait_for(timeout=60_000)
    expect(page.get_by_label("Max steps", exact=True)).to_have_value("7", timeout=30_000)
    expect(page.get_by_label("Learning rate", exact=True)).to_have_value("0.003")
    page.screenshot(path=str(shots / "2-settings-loaded.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly
    context.close()


def test_loaded_settings_show_the_dataset_they_name(browser, app_url: str, tmp_path: Path) -> None:
    """A run.yaml (or a past run) names its dataset: once loaded, the Dataset tab validates and previews that one. It
    kept showing the dataset validated before (its rows, its counts) beside the new source, or "No data yet"."""
    from playwright.sync_api import expect

    from phi3_lora import config as cfgmod

    other = tmp_path / "three_chats.jsonl"
    other.write_text("".join('{"messages": [{"role": "user", "content": "zebra %d"}, {"role": "assistant", '
                             '"content": "stripes"}]}\n' % i for i in range(3)))
    run_yaml = tmp_path / "run.yaml"
    cfgmod.save_yaml(cfgmod.RunConfig().replace(data={"source": str(SAMPLE)}, train={"max_steps": 9},
                                                model={"load_in_4bit": False}), run_yaml)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    open_app(page, app_url)
    page.locator("#p3-upload input[type=file]").set_input_files(str(other))
    page.get_by_text("3 usable of 3 rows").wait_for(timeout=60_000)
    page.get_by_role("tab", name="2 · Model & LoRA").click(timeout=120_000)
    page.get_by_text("Load settings from a past run or a YAML file").click()
    page.locator("#p3-load-yaml input[type=file]").set_input_files(str(run_yaml))
    page.get_by_text("Loaded the settings of run.yaml.").wait_for(timeout=60_000)
    expect(page.get_by_label("Max steps", exact=True)).to_have_value("9", timeout=30_000)
    page.get_by_role("tab", name="1 · Dataset").click()
    expect(page.locator("#cfg-data-source").locator("textarea, input").first).to_have_value(
        re.compile(r"sample_chat\.jsonl$"))
    page.get_by_text("48 usable of 48 rows").wait_for(timeout=60_000)  # the loaded dataset, validated
    expect(page.get_by_text("zebra 0")).to_have_count(0)  # no row of the dataset validated before
    context.close()


def write_past_run(runs: Path) -> str:
    from phi3_lora import config as cfgmod
    from phi3_lora import events

    run_id = "20260101-000000-past"
    run = runs / run_id
    run.mkdir(exist_ok=True)
    config = cfgmod.RunConfig().replace(train={"max_steps": 7, "learning_rate": 0.003},
                                        data={"source": str(SAMPLE)}, model={"load_in_4bit": False})
    cfgmod.save_yaml(config, run / "config.yaml")
    events.append_event(run, "end", status="finished", step=7, max_steps=7)
    return run_id


HANDLER_BOXES = ["#p3-time", "#p3-estimate", "#p3-run-status"]


def test_finnish_page(browser, app_url: str) -> None:
    """Issue 18: a Finnish browser (locale fi-FI) gets every tab in Finnish, no English layout text; the header's
    switch changes the page to English in place and the choice survives a reload. Screenshots of each tab go
    to screenshots_dir()/fi/."""
    from playwright.sync_api import expect

    from phi3_lora.ui import strings

    shots = screenshots_dir() / "fi"
    shots.mkdir(exist_ok=True)
    en, fi = strings.translations()["en"], strings.translations()["fi"]
    # Layout texts only (handler-set notices stay English, like the library's messages); long enough not to
    # match inside another word.
    english = sorted({v for k, v in en.items() if v != fi[k] and len(v) >= 12 and not k.startswith("cfg.")
                      and "&" not in v and "\n" not in v} | {en[f"cfg.train.{f}.label"] for f in
                                                            ("learning_rate", "gradient_accumulation_steps")})
    context = browser.new_context(locale="fi-FI", viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    open_app(page, app_url, "Keskusteluaineistosi")
    tabs = [("1 · Aineisto", "1-aineisto", "Käytä esimerkkiaineistoa"), ("2 · Malli ja LoRA", "2-malli", "Oppimisnopeus"),
            ("3 · Koulutus", "3-koulutus", "Aloita koulutus"), ("4 · Vertailu", "4-vertailu", "Sivuun jätetty esimerkki"),
            ("5 · Vienti", "5-vienti", "Tee adapterin zip-paketti")]
    for tab, name, finnish in tabs:
        page.get_by_role("tab", name=tab).click()
        page.get_by_text(finnish, exact=True).first.wait_for(timeout=30_000)
        # the tab's own load events (draft restore, run lists) finish before the picture: no progress timers
        page.wait_for_function("() => !document.querySelector('.progress-text, .eta-bar')", timeout=120_000)
        # The page's text less what handlers wrote (English, see strings.py), read in one go: the Train tab's timer
        # rewrites its boxes between two separate reads
        shown = page.evaluate("""(boxes) => {
          let text = document.body.innerText;
          for (const box of document.querySelectorAll(boxes)) text = text.split(box.innerText).join('');
          return text;
        }""", ", ".join(HANDLER_BOXES))
        left = [text for text in english if text in shown]
        assert not left, (tab, left)
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True, timeout=120_000)  # a busy CI machine renders slowly
    expect(page.locator("#p3-language input")).to_have_value("Suomi")

    # The switch: English in place, and still English after a reload (remembered in this browser).
    page.locator("#p3-language input").click()
    page.get_by_role("option", name="English").click()
    page.get_by_role("tab", name="1 · Dataset").wait_for(timeout=30_000)
    open_app(page, app_url, reload=True)
    # the page's load event (in the browser, after the first render) puts the language shown into the switch
    expect(page.locator("#p3-language input")).to_have_value("English", timeout=30_000)
    assert "Keskusteluaineistosi" not in page.locator("body").inner_text()
    # A link can ask for a language: ?lang=fi wins over the remembered English.
    open_app(page, app_url.rstrip("/") + "/?lang=fi", "Keskusteluaineistosi")
    expect(page.locator("#p3-language input")).to_have_value("Suomi", timeout=30_000)
    context.close()


def test_delete_asks_before_a_run_goes(browser, app_url: str) -> None:
    """Delete run asks in the browser first: declined, the run stays; accepted, it goes. Last in the file: it
    deletes the run the walk-through trained."""
    from playwright.sync_api import expect

    from phi3_lora import runs

    run_ids = [r.run_id for r in runs.run_dirs(RUNS["dir"])]
    assert run_ids, "the walk-through above trains the run this test deletes"
    run_id = run_ids[0]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Your chat data").wait_for(timeout=RENDER_MS)
    page.get_by_role("tab", name="3 · Train").click(timeout=120_000)
    expect(page.locator("#p3-runs input")).to_have_value(re.compile(run_id), timeout=60_000)
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.get_by_role("button", name="Delete run").click()
    deadline = time.time() + 30
    while not asked and time.time() < deadline:
        page.wait_for_timeout(250)
    assert asked and run_id in asked[0] and "cannot be undone" in asked[0], asked
    page.wait_for_timeout(5_000)  # a declined delete sends no run: nothing may go
    assert (RUNS["dir"] / run_id).is_dir()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete run").click()
    wait_until(lambda: not (RUNS["dir"] / run_id).exists(), timeout=120)
    page.close()
