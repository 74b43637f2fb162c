"""UI languages (issue 18): every key in every locale, and the built app's layout holds keys, not English.

The Finnish page itself is walked in a real browser by tests/test_browser.py::test_finnish_page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from phi3_lora.ui import strings

# Text the layout shows as is in every language: file and folder names, ids, the product's name.
AS_IS = {"run.yaml", "merged", "hf_…", "phi3_lora — fine-tune a chat model on your data"}
# Boxes whose text a handler computes (on load too) and an API client reads: English, like the library's
# messages; the language switch names each language in itself.
HANDLER_TEXT = {"p3-estimate", "p3-time", "p3-progress-box", "p3-language"}
TEXT_PROPS = ("label", "info", "placeholder")
TEXT_VALUES = ("markdown", "html", "button")


def test_every_key_is_in_every_locale() -> None:
    tables = strings.translations()
    assert set(tables) == set(strings.LOCALES) == {"en", "fi"}
    en = tables["en"]
    for lang, table in tables.items():
        assert set(table) == set(en), (lang, sorted(set(en) ^ set(table)))
        empty = [k for k, v in table.items() if not str(v).strip()]
        assert not empty, (lang, empty)
    # The schema's texts are covered: every field's label and help has a key in every locale.
    assert set(strings.schema_english()) <= set(tables["fi"])
    # Each file's own keys: the same on disk (en.json need not repeat the schema's English, fi.json must have it).
    en_file, fi_file = strings.locale_file("en"), strings.locale_file("fi")
    assert set(fi_file) == set(en_file) | set(strings.schema_english())
    # Our keys live in our own namespaces, never in one of Gradio's (which would replace its own strings).
    assert not {k.split(".")[0] for k in en} & strings.GRADIO_NAMESPACES


def test_every_locale_names_every_data_format() -> None:
    """The format help is written by hand in each locale: a new format in formats.FORMATS must reach each."""
    from phi3_lora.formats import FORMATS

    for lang, table in strings.translations().items():
        missing = [name for name in FORMATS if name not in table["cfg.data.format.help"]]
        assert not missing, (lang, missing)


def test_finnish_is_translated_not_copied() -> None:
    en, fi = strings.translations()["en"], strings.translations()["fi"]
    same = [k for k in en if en[k] == fi[k]]
    # Names that are the same in Finnish (DoRA, Top-p, auto, ...) are few.
    assert len(same) <= 0.05 * len(en), same
    # A translation keeps what the page reads literally: Markdown headings and HTML entities.
    for key in en:
        assert re.match(r"#+ ", en[key]) is None or fi[key].startswith(en[key].split(" ")[0] + " "), key
        assert en[key].count("&lt;") == fi[key].count("&lt;"), key


def test_a_key_the_locale_files_lack_fails_when_the_layout_is_built() -> None:
    with pytest.raises(KeyError, match="no UI string"):
        strings.t("data.no_such_text")
    assert strings.english(strings.t("train.start")) == "Start training"
    assert strings.english(f"<b>{strings.t('train.stop')}</b> now") == "<b>Stop</b> now"


def _components(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["components"]


@pytest.fixture(scope="module")
def app(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from phi3_lora.ui import build_app

    demo = build_app(tmp_path_factory.mktemp("i18n_runs"), default_model=str(tiny_llama_dir))
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def built(app: Any) -> dict[str, Any]:
    """The built app's config, as the page receives it (keys in their dict form)."""
    return json.loads(json.dumps(app.get_config_file(),
                                 default=lambda o: o.to_dict() if hasattr(o, "to_dict") else repr(o)))


def test_the_layout_uses_only_keys_every_locale_has(built: dict[str, Any]) -> None:
    used = strings.keys_in(built)
    assert len(used) > 150, len(used)
    tables = strings.translations()
    for lang, table in tables.items():
        assert used <= set(table), (lang, sorted(used - set(table)))
    # Gradio's frontend translates only the first key of a string: no text may hold two.
    for comp in _components(built):
        for name, value in comp["props"].items():
            if isinstance(value, str):
                assert value.count("__i18n__") <= 1, (comp["props"].get("elem_id"), name, value)
    # Every key of the locale files (the schema's aside: Dataset-tab fields have their own widgets) is used by
    # the layout or named in the UI's code (texts a handler sets later).
    source = "\n".join(p.read_text() for p in Path(strings.__file__).parent.glob("*.py"))
    unused = [k for k in strings.locale_file("en") if k not in used and f'"{k}"' not in source and f"'{k}'" not in source]
    assert not unused, unused


def test_no_text_in_the_layout_is_left_untranslated(built: dict[str, Any]) -> None:
    """Labels, infos, placeholders, headings, buttons and help texts: each is a key (or holds one), except the
    few AS_IS texts and what a component computes from data (choices of files, numbers)."""
    english = []
    for comp in _components(built):
        props, kind = comp["props"], comp.get("type", "")
        texts = [(name, props.get(name)) for name in TEXT_PROPS]
        if kind in TEXT_VALUES:
            texts.append(("value", props.get("value")))
        if kind == "tabitem":
            texts.append(("label", props.get("label")))
        for name, value in texts:
            if props.get("elem_id") in HANDLER_TEXT:
                continue
            if isinstance(value, dict) or value is None:
                continue  # a key ({"key": ...}) or nothing
            text = re.sub(r"<[^>]+>", " ", str(value)).strip()
            if not text or "__i18n__" in str(value) or text in AS_IS or not re.search(r"[A-Za-z]{3}", text):
                continue
            english.append((kind, props.get("elem_id"), name, text[:80]))
    assert not english, english


def test_the_api_page_shows_english_labels(app: Any) -> None:
    """Scripts and gradio_client name inputs by label: the API info says "Learning rate", not a key."""
    info = app.get_api_info()
    labels = {p["label"] for e in info["named_endpoints"].values() for p in e["parameters"]}
    assert {"Learning rate", "Data source", "Base model", "Prompt"} <= labels
    assert not [label for label in labels if not isinstance(label, str) or "__i18n__" in label]


def _rest_call(url: str, api_name: str, data: list[Any]) -> list[tuple[str, Any]]:
    """An endpoint called as a REST client calls it (POST /gradio_api/call/<api>, then its event stream): the
    (event, data) pairs the stream sent until it ended."""
    import httpx

    base = url.rstrip("/")
    event_id = httpx.post(f"{base}/gradio_api/call/{api_name}", json={"data": data}, timeout=60).json()["event_id"]
    events, event = [], None
    try:
        with httpx.stream("GET", f"{base}/gradio_api/call/{api_name}/{event_id}", timeout=600) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event not in (None, "heartbeat"):
                    events.append((event, json.loads(line[len("data: "):])))
    except httpx.HTTPError as exc:  # the route dropped the answer mid-stream
        events.append(("broken", str(exc)))
    return events


@pytest.mark.slow
def test_a_rest_client_gets_the_answers_that_carry_translated_text(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The time estimate answers with the preset radio's translated info. gradio's REST route encodes answers with
    the plain json module, which cannot encode I18nData: the answer was dropped (the stream broke off, 'I18nData is
    not JSON serializable'). It carries the page's marker string now: the page translates it, a REST client gets it."""
    from helpers.apps import endpoint_args, served_app

    with served_app(tmp_path / "runs", tiny_llama_dir) as (url, _):
        from gradio_client import Client

        args = endpoint_args(Client(url, verbose=False), "time_estimate")
        events = _rest_call(url, "time_estimate", args)
        assert [e for e, _ in events] == ["complete"], events
        html_out, preset = events[0][1]
        assert "p3-note" in html_out and strings.keys_in(preset.get("info")) == {"timing.preset_info"}, preset


def test_an_error_with_translated_text_reaches_a_rest_client_in_english() -> None:
    """A gr.Error whose message or title is I18nData is dropped by the REST route likewise: the app's error handler
    turns them into English text."""
    import gradio as gr

    from phi3_lora.ui.common import to_gr_error

    error = to_gr_error(gr.Error(strings.t("train.no_run"), title=strings.t("app.language")), "test")
    assert error.message == strings.translations()["en"]["train.no_run"]
    assert error.title == strings.translations()["en"]["app.language"]
    json.dumps([error.message, error.title])
