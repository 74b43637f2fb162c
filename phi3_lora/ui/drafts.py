"""The draft: the dataset choice and every setting, kept per browser and restored on load; and "Load settings"
from a past run or a YAML file (through the schema the CLI uses: config.load_yaml / RunConfig).

The draft lives in the browser (gr.BrowserState: localStorage, encrypted with a secret kept beside the runs so
it survives an app restart). An uploaded data file is deleted with its session when the page closes, so the
draft also keeps a copy of it under a random per-browser token (phi3_lora.uploads.keep_for_draft) and the next
page load copies it into the new session.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from phi3_lora import config as cfgmod
from phi3_lora import jobs, models, quotas, runs, uploads
from phi3_lora.access import Action, Requester
from phi3_lora.errors import UserError
from phi3_lora.ui.common import AppState, help_md, notice, user_errors
from phi3_lora.ui import names
from phi3_lora.ui.guard import check, check_model, guarded
from phi3_lora.ui.strings import t

SECRET_FILE = ".browser_secret"
STORAGE_KEY = "phi3_lora_draft"  # its localStorage key


@dataclass(slots=True)
class Loader:
    run: gr.Dropdown
    load_run: gr.Button
    yaml_file: gr.File
    note: gr.HTML
    box: gr.Accordion


def browser_secret(runs_dir: Path) -> str:
    """The key that encrypts the draft in the browser; kept so a restarted app can still read old drafts."""
    path = uploads.root(runs_dir) / uploads.DRAFTS / SECRET_FILE
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        value = secrets.token_hex(16)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(value)
        return value


def build_loader() -> Loader:
    with gr.Accordion(t("drafts.title"), open=False) as box:
        with gr.Row(equal_height=False):
            run = gr.Dropdown([], label=t("train.run"), info=t("drafts.run_info"), scale=3,
                              elem_id="p3-load-run", allow_custom_value=True)
            load_run = gr.Button(t("drafts.load_run"), scale=1)
            yaml_file = gr.File(label=t("drafts.yaml"), file_types=[".yaml", ".yml"], height=90, scale=2,
                                elem_id="p3-load-yaml")
        gr.HTML(help_md(t("drafts.help")))
        note = gr.HTML()
    return Loader(run, load_run, yaml_file, note, box)


def config_values(config: cfgmod.RunConfig, keys: list[str], state: AppState, who: Requester) -> list[Any]:
    """Widget updates for every setting and data field of `config` (target choices from its model), its model and
    data source as the web form names them (ui.names)."""
    from phi3_lora.ui import dataset, settings

    try:
        info = models.model_info(config.model.name)
        targets, fused = info.targets, info.fused
    except UserError:  # a model that is gone: keep its names as the choices
        targets = list(config.lora.target_modules) if isinstance(config.lora.target_modules, list) else []
        fused = False
    vals: list[Any] = settings.values_from_config(config, keys, [t for t in targets if t != "embed_tokens"])
    vals[keys.index("lora.target_modules")] = gr.update(choices=targets, value=vals[keys.index("lora.target_modules")])
    vals[keys.index("lora.fused_slices")] = gr.update(value=config.lora.fused_slices if fused else [], visible=fused)
    vals[keys.index("model.name")] = names.web_model(state, config.model.name)
    d = config.data
    return vals + [config.preset or settings.NO_PRESET, names.web_source(state, d.source), d.format,
                   dataset.mapping_table(d.format if d.format != "auto" else "messages", [], d.mapping),
                   d.eval_fraction]


def wire(loader: Loader, state: AppState, keys: list[str], widgets: list[Any], data_widgets: list[Any],
         preset: gr.Radio, summary: gr.HTML, demo: gr.Blocks) -> list[Any]:
    """Returns the events that fill the form's dataset (the draft's restore on page load, Load this run's settings,
    a run.yaml's upload); the caller validates the dataset after each, so the preview is of that dataset."""
    runs_dir = state.options.runs_dir
    draft = gr.BrowserState({}, storage_key=STORAGE_KEY, secret=browser_secret(runs_dir))
    form = widgets + [preset] + data_widgets

    @guarded(state)
    def on_save(who: Requester, old: dict[str, Any] | None, *values: Any) -> dict[str, Any]:
        from phi3_lora.ui.dataset import mapping_from_table

        old = dict(old or {})
        token = old.get("token") if str(old.get("token", "")).isalnum() else secrets.token_hex(16)
        *settings_values, preset_name, source, fmt, table, fraction = values
        saved = {"token": token, "settings": dict(zip(keys, settings_values)), "preset": preset_name,
                 "data": {"source": source, "format": fmt, "mapping": mapping_from_table(table),
                          "eval_fraction": fraction}}
        on_server = names.server_source(state, who, source)
        if who.session and source and uploads.is_session_upload(runs_dir, who.session, on_server):
            try:  # the session's upload goes when the page closes: the draft keeps its own copy
                saved["data"]["upload"] = uploads.keep_for_draft(on_server, runs_dir, token, quotas.holder_of(who),
                                                                 state.options.limits).name
            except UserError as exc:  # said when the draft is restored (this endpoint shows nothing)
                saved["data"]["upload_refused"] = str(exc)
            except OSError:
                pass
        elif old.get("data", {}).get("source") == source and old.get("data", {}).get("upload"):
            saved["data"]["upload"] = old["data"]["upload"]
        return saved

    @user_errors
    @guarded(state)
    def on_restore(who: Requester, saved: dict[str, Any] | None) -> list[Any]:
        uploads.sweep_drafts(runs_dir)
        saved = saved or {}
        stored = saved.get("settings") or {}
        if not stored:
            return [gr.skip()] * (len(form) + 1)
        out: list[Any] = [stored[k] if k in stored else gr.skip() for k in keys]
        data = saved.get("data") or {}
        source, note = data.get("source") or "", gr.skip()
        if data.get("upload") and who.session and str(saved.get("token", "")).isalnum():
            try:
                restored = uploads.restore_draft(runs_dir, saved["token"], data["upload"], who.session,
                                                 quotas.holder_of(who), state.options.limits)
                source = names.web_source(state, str(restored))  # the form names no folder of the server
            except UserError as exc:  # what happened to it (a copy that gave way to newer drafts), or a quota
                source, note = "", notice("warn", str(exc))
            except (OSError, ValueError):
                source, note = "", notice("warn", f"Your upload {data['upload'].split('-', 1)[-1]} is no longer "
                                                  "kept on the server; upload it again.")
        elif data.get("upload_refused"):
            source, note = "", notice("warn", f"Your upload was not kept with this draft: {data['upload_refused']}")
        from phi3_lora.ui.dataset import mapping_table

        fmt = data.get("format") or "auto"
        out += [saved.get("preset") or gr.skip(), source, fmt,
                mapping_table(fmt if fmt != "auto" else "messages", [], data.get("mapping") or {}),
                data.get("eval_fraction", gr.skip()), note]
        return out

    @user_errors
    @guarded(state)
    def on_load_run(who: Requester, run_id: str | None) -> list[Any]:
        if not run_id:
            raise UserError("No run chosen.", hint="Pick a past run from the list.")
        check(state, who, Action.LOAD_RUN_SETTINGS, started_by=state.starters.get(run_id))
        run_config = runs.run_in(runs_dir, run_id).config
        config = cfgmod.load_yaml(run_config, shown_as=runs.shown_path(run_config))
        return config_values(config, keys, state, who) + [notice("ok", f"Loaded the settings and data of {run_id}.")]

    @user_errors
    @guarded(state)
    def on_load_yaml(who: Requester, path: str | None) -> list[Any]:
        if not path:
            return [gr.skip()] * (len(form) + 1)
        config = cfgmod.load_yaml(path, shown_as=Path(path).name)  # not the server folder gradio saved it in
        config = config.replace(model={"name": check_model(state, who, config.model.name)})  # its layers are read
        return config_values(config, keys, state, who) + [notice("ok", f"Loaded the settings of {Path(path).name}.")]

    def on_open(current: str | None) -> Any:
        ids = [c[1] for c in _run_choices(runs_dir)]
        return gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None))

    gr.on([w.change for w in form], on_save, [draft] + form, draft, api_name="save_draft", queue=False,
          show_progress="hidden", trigger_mode="always_last")
    restored = demo.load(on_restore, draft, form + [summary], api_name="restore_draft")
    loader.box.expand(on_open, loader.run, loader.run, api_name="load_settings_runs")
    run_loaded = loader.load_run.click(on_load_run, loader.run, form + [loader.note], api_name="load_run_settings")
    yaml_loaded = loader.yaml_file.upload(on_load_yaml, loader.yaml_file, form + [loader.note],
                                          api_name="load_yaml_settings")
    return [restored, run_loaded, yaml_loaded]


def _run_choices(runs_dir: Path) -> list[tuple[str, str]]:
    return [(info.run_id, info.run_id) for info in jobs.list_runs(runs_dir)]
