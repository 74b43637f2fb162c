"""The one owner of the UI's words: the locale files, Gradio's `gr.I18n`, and `t(key)` for layout code.

Every user-visible string of the layout is a key into `locales/<lang>.json` (flat, one file per language);
layout code asks `t("data.upload")` and Gradio's frontend shows it in the page's language. The settings
schema's labels and help texts stay in `phi3_lora.config` (English, shared with the CLI and the YAML dump):
their keys are `cfg.<section>.<field>.label` / `.help`, their English comes from the schema and their other
languages from the locale files. Messages the library raises (UserError) are shown as raised, in English.

How the page's language is picked (gradio 6.31): the frontend takes the browser's language once, at load
(`navigator.language`, e.g. fi-FI -> fi, anything we lack -> en); Gradio's footer Settings can change it in
place but forgets it on reload, and there is no query parameter for it (only `__theme`). Our switch in the
page header calls the same exported frontend function (`changeLocale`) and remembers the choice in the
browser's localStorage; `?lang=fi` in the address picks a language too (a link that opens in Finnish).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.i18n import I18nData

from phi3_lora import config as cfgmod

LOCALE_DIR = Path(__file__).with_name("locales")
LOCALES = ("en", "fi")
# The switch's choices: each language by its own name (never translated).
LANGUAGE_NAMES = {"en": "English", "fi": "Suomi"}
# Gradio's frontend keeps its own strings in these namespaces; ours must not shadow them.
GRADIO_NAMESPACES = frozenset({"3D_model", "annotated_image", "audio", "blocks", "chatbot", "chat_interface",
                               "checkbox", "code", "color_picker", "common", "dataframe", "dropdown", "errors",
                               "file", "highlighted_text", "image", "image_editor", "label", "login", "number",
                               "plot", "radio", "slider", "upload_text", "video"})
SCHEMA_PARTS = ("label", "help")
MARKER = re.compile(r'__i18n__(\{[^{}]*\})')


def locale_file(lang: str) -> dict[str, str]:
    """One locale file as read (flat: key -> text)."""
    return json.loads((LOCALE_DIR / f"{lang}.json").read_text(encoding="utf-8"))


def schema_english() -> dict[str, str]:
    """`cfg.<section>.<field>.label|help` -> the schema's English text (config/schema.py is its source)."""
    out = {}
    for section, cls in cfgmod.SECTIONS.items():
        for f in fields(cls):
            out[f"cfg.{section}.{f.name}.label"] = f.metadata.get("label", f.name)
            out[f"cfg.{section}.{f.name}.help"] = f.metadata.get("help", "")
    return out


@lru_cache(maxsize=1)
def translations() -> dict[str, dict[str, str]]:
    """Every locale's full table: English = en.json + the schema's texts; the others = their files."""
    tables = {lang: locale_file(lang) for lang in LOCALES}
    tables["en"] = {**schema_english(), **tables["en"]}
    return tables


def i18n() -> gr.I18n:
    """What `launch(i18n=...)` gets: every locale's table, translated in the browser."""
    return gr.I18n(**translations())


def t(key: str) -> I18nData:
    """The UI text `key` in the page's language. An unknown key fails here, when the layout is built."""
    if key not in translations()["en"]:
        raise KeyError(f"no UI string {key!r} in {LOCALE_DIR / 'en.json'}")
    return I18nData(key)


def field_label(section: str, name: str) -> I18nData:
    return t(f"cfg.{section}.{name}.label")


def field_help(section: str, name: str) -> I18nData:
    return t(f"cfg.{section}.{name}.help")


def english(value: Any) -> Any:
    """A translated value as English text (what the API page and gradio_client show): I18nData, its dict form,
    or a string with markers in it; anything else unchanged."""
    table = translations()["en"]
    if isinstance(value, I18nData):
        return table.get(value.key, value.key)
    if isinstance(value, dict) and "key" in value and "translation_metadata" in (value.get("__type__"),
                                                                                 value.get("_type")):
        return table.get(value["key"], value["key"])
    if isinstance(value, str) and "__i18n__" in value:
        return MARKER.sub(lambda m: table.get(json.loads(m.group(1)).get("key", ""), m.group(0)), value)
    return value


def keys_in(value: Any) -> set[str]:
    """The translation keys a config value (a component's props, a whole Blocks config) refers to."""
    found: set[str] = set()
    if isinstance(value, I18nData):
        found.add(value.key)
    elif isinstance(value, dict):
        if "translation_metadata" in (value.get("__type__"), value.get("_type")) and "key" in value:
            found.add(value["key"])
        for v in value.values():
            found |= keys_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            found |= keys_in(v)
    elif isinstance(value, str) and "__i18n__" in value:
        found |= {json.loads(m.group(1)).get("key", "") for m in MARKER.finditer(value)}
    return found


# The switch. Runs in the browser: with a choice (the user picked a language) it is remembered and applied;
# without one (page load) the remembered choice or ?lang= is applied. Returns the language now shown, which
# the load event puts into the switch. `changeLocale` is the function Gradio's own footer Settings call.
SWITCH_JS = """async (choice) => {
  const KEY = 'phi3_lora.locale', known = %s;
  const shown = () => ((document.documentElement.lang || 'en').split('-')[0]);
  const asked = new URL(window.location.href).searchParams.get('lang');
  if (choice) { try { localStorage.setItem(KEY, choice); } catch (e) {} }
  let want = choice || asked;
  if (!want) { try { want = localStorage.getItem(KEY); } catch (e) {} }
  if (want && known.includes(want) && want !== shown()) {
    const urls = performance.getEntriesByType('resource').map((e) => e.name)
      .concat([...document.querySelectorAll('link[rel=modulepreload]')].map((l) => l.href));
    const core = urls.find((u) => /\\/assets\\/core-[\\w-]+\\.js$/.test(u));
    try { (await import(core)).changeLocale(want); }
    catch (e) { console.warn('phi3_lora: cannot switch the language here; use Settings at the page foot', e); }
  }
  return known.includes(shown()) ? shown() : 'en';
}""" % json.dumps(list(LOCALES))


def language_switch() -> gr.Dropdown:
    """The header's language menu; `wire_switch` makes it work."""
    return gr.Dropdown([(name, lang) for lang, name in LANGUAGE_NAMES.items()], value=None, label=t("app.language"),
                       elem_id="p3-language", min_width=140, scale=0, container=True)


def wire_switch(switch: gr.Dropdown, demo: gr.Blocks) -> None:
    """All in the browser (no request reaches the server): a choice switches the page's language and is
    remembered; on load the remembered choice is applied and the menu shows the page's language."""
    switch.input(None, switch, None, js=SWITCH_JS)
    demo.load(None, None, switch, js=SWITCH_JS)
