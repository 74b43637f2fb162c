"""`build_app(runs_dir, default_model=...) -> gr.Blocks`: the five tabs wired together, and `launch`."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import utils as gr_utils
from starlette.middleware import Middleware

from phi3_lora import access, gguf_bundle, models, portable, uploads
from phi3_lora.config import dump_yaml
from phi3_lora.access import Requester
from phi3_lora.runs import default_runs_dir, old_exports_dir, remove_old_exports
from phi3_lora.ui import (bodies, compare, dataset, drafts, export_tab, login, names, settings, strings, timing,
                          train_tab)
from phi3_lora.ui.common import CSS, AppOptions, AppState, log, notice, user_errors
from phi3_lora.ui.strings import t
from phi3_lora.ui.guard import check_model, check_source, check_template, guarded, session_key

DATA_KEYS = ["data.source", "data.format", "data.mapping", "data.eval_fraction"]
# The Column mapping table is an editable Dataframe, which also takes CSV files dropped on it ("Invalid file type");
# Gradio has no switch for that, so the page swallows drag-and-drop over it before the table sees it. It is a head
# script, not launch(js=...): the head runs before the app renders, js= only after, which left a window where a drop
# reached the table (seen on a slow CI machine). `window.p3DropGuard` says it is in place.
PAGE_HEAD = """<script>(() => {
  const block = (e) => {
    if (e.target instanceof Element && e.target.closest('#p3-mapping')) {
      e.preventDefault(); e.stopPropagation();
      if (e.dataTransfer) e.dataTransfer.dropEffect = 'none';
    }
  };
  for (const kind of ['dragenter', 'dragover', 'drop']) window.addEventListener(kind, block, true);
  window.p3DropGuard = true;
})();</script>"""


class App(gr.Blocks):
    """The app's Blocks. Its API page and gradio_client see each widget's English label, not a translation
    key: scripts name inputs by label, and a key means nothing to them.

    build_app sets the two attributes declared here and no other beyond gr.Blocks' own (tests/test_ui_contracts.py)."""

    phi3_options: AppOptions  # read by launch()
    phi3_state: AppState      # launch() sets its server mode

    def get_api_info(self, *args: Any, **kwargs: Any) -> Any:
        info = super().get_api_info(*args, **kwargs)
        for endpoint in [*(info or {}).get("named_endpoints", {}).values(),
                         *(info or {}).get("unnamed_endpoints", {}).values()]:
            for item in endpoint.get("parameters", []) + endpoint.get("returns", []):
                if "label" in item:
                    item["label"] = strings.english(item["label"])
        return info


# How often gradio's queue looks for an event to start, and for progress to send, while it has none (seconds).
# gradio's own 0.001 / 0.01 (0.05 / 0.1 on Windows) wake its event loop ~1,100 times a second, idle or not: 4% of a
# core on the 2-core CPU with the app doing nothing, and during Compare on that CPU each wake takes the GIL and a
# core from the decoding threads. 20 ms more before an event starts is not seen beside a model's answer.
QUEUE_POLL_S = 0.02
PROGRESS_POLL_S = 0.05


def quiet_queue(demo: gr.Blocks) -> None:
    """Gradio's queue polls at QUEUE_POLL_S / PROGRESS_POLL_S when free (attributes of its Queue; the gradio pin
    keeps their names, and test_app_queue fails if they go)."""
    queue = demo._queue
    queue.sleep_when_free = QUEUE_POLL_S
    queue.progress_update_sleep_when_free = PROGRESS_POLL_S


THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", radius_size="md")


def build_app(runs_dir: str | Path | None = None, default_model: str = "auto",
              options: AppOptions | None = None) -> gr.Blocks:
    """The whole app. Nothing heavy happens here or on page load: models load on first use."""
    options = options or AppOptions(runs_dir=Path(runs_dir or default_runs_dir()), default_model=default_model)
    options.runs_dir.mkdir(parents=True, exist_ok=True)
    uploads.sweep(options.runs_dir)  # sessions that ended while the app was down
    gguf_bundle.sweep_stale_temporaries(options.runs_dir)  # GGUF exports cut short while the app was down
    if remove_old_exports(options.runs_dir):  # earlier versions' served downloads: gone once, only if all ours
        log.info("removed %s, the downloads folder of earlier versions", old_exports_dir(options.runs_dir).name)
    state = AppState(options)
    state.default_name, state.default_reason = models.resolve_name(options.default_model)
    if portable.is_local_model(state.default_name):  # the page names no folder of the server (ui.names)
        state.default_path, state.default_name = state.default_name, portable.model_name(state.default_name)
    if options.default_model.strip().lower() != "auto":
        state.default_reason = "it was chosen with --model"

    # Gradio's own copies of uploads and outputs: swept every 30 min, deleted after an hour (ours are kept in the
    # session's upload folder; see phi3_lora.uploads).
    with App(title="phi3_lora — fine-tune a chat model on your data", fill_width=False,
             delete_cache=(1800, 3600)) as demo:
        with gr.Row(equal_height=False):
            gr.HTML(f"<div class='p3-header'><h1>phi3_lora</h1><p>{t('app.intro')} "
                    f"<b>{html.escape(state.default_name)}</b>: {html.escape(state.default_reason)}.</p></div>")
            language = strings.language_switch()
        if options.storage_warning:
            gr.HTML(notice("warn", options.storage_warning))
        if options.login_required:  # a Space with hf_oauth: training is per signed-in Hugging Face user
            gr.LoginButton()
        with gr.Tabs():
            with gr.Tab(t("app.tab.dataset"), id="dataset"):
                ds = dataset.build(state)
            with gr.Tab(t("app.tab.settings"), id="settings"):
                st = settings.build(state)
                loader = drafts.build_loader()
            with gr.Tab(t("app.tab.train"), id="train"):
                tr = train_tab.build(state)
            with gr.Tab(t("app.tab.compare"), id="compare") as compare_page:
                cp = compare.build(state)
            with gr.Tab(t("app.tab.export"), id="export") as export_page:
                ex = export_tab.build(state)

        strings.wire_switch(language, demo)
        settings.wire(st, state, demo)
        keys = st.keys
        setting_widgets = [st.fields[k] for k in keys]
        config_inputs = setting_widgets + [st.preset, ds.source, ds.format, ds.mapping, ds.eval_fraction]
        input_names = keys + ["preset", *DATA_KEYS]  # the field each input above feeds

        def build_config(who: Requester, *values: Any):
            """The run config from the widgets (keyed by field name), after the access policy accepted its model
            and data source."""
            given = dict(zip(input_names, values, strict=True))
            table = given.pop("data.mapping")
            preset_name = given.pop("preset")
            given["data.source"] = names.server_source(state, who, given["data.source"])
            given["data.mapping"] = dataset.mapping_from_table(table)
            given["model.name"] = check_model(state, who, given["model.name"])
            check_template(state, who, given["model.chat_template"])
            check_source(state, who, given["data.source"])
            info = models.model_info(given["model.name"])
            return settings.config_from_values(given, info.linear_names, preset_name)

        @user_errors
        @guarded(state)
        def on_show_config(who: Requester, *values: Any) -> tuple[Any, Any]:
            config = build_config(who, *values)
            if who.level is not access.Level.OWNER:  # the config as another machine would use it: no server folder
                config = portable.portable_config(config, options.sample_dataset).config
            return (gr.update(value=dump_yaml(config), visible=True),
                    gr.update(value=settings.cli_text(config), visible=True))

        st.show_config.click(on_show_config, config_inputs, [st.yaml_code, st.cli_code], api_name="show_config")
        dataset.wire(ds, state, st.fields["model.name"], st.fields["train.max_length"], st.fields["train.seed"])
        train_tab.wire(tr, state, config_inputs, build_config)
        timing.wire(st.timing, state, config_inputs, build_config, ds.rows, st.preset,
                    [w.change for w in setting_widgets] + [ds.eval_fraction.change, demo.load])
        filled = drafts.wire(loader, state, keys, setting_widgets, [ds.source, ds.format, ds.mapping, ds.eval_fraction],
                             st.preset, ds.summary, demo)
        # A dataset a draft, a past run or a run.yaml puts in the form is validated, so the preview, stats and rows
        # are of that dataset (not the one validated before, nor "No data yet"); not a client's call.
        def validate_filled(request: gr.Request, *values: Any) -> Any:
            if not (values[0] or "").strip():
                return [gr.skip()] * len(ds.validate_io[1])
            return ds.on_validate(request, *values)

        for event in filled:
            event.success(validate_filled, ds.validate_io[0], ds.validate_io[1], api_visibility="private")
        compare.wire(cp, state)
        export_tab.wire(ex, state)
        compare_page.select(cp.on_refresh, cp.source, cp.source, api_name="open_compare")
        export_page.select(ex.on_refresh, ex.source, ex.source, api_name="open_export")

        @user_errors
        @guarded(state)
        def on_load(who: Requester) -> list[Any]:
            return tr.on_load(who) + [cp.on_refresh(None), ex.on_refresh(None)]

        demo.load(on_load, None, tr.outputs + [cp.source, ex.source], api_name="load_page")

        def on_unload(request: gr.Request) -> None:
            uploads.drop_session(options.runs_dir, session_key(request))  # the page closed: its uploads go

        demo.unload(on_unload)
    demo.phi3_options = options  # read by launch()
    demo.phi3_state = state
    return demo


def hide_server_token() -> None:
    """No request is the owner's here, so nothing in this process (nor the training runs it starts) may send the
    machine's Hugging Face login implicitly: each Hub call passes the visitor's own token or none at all."""
    import os

    import huggingface_hub.constants

    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"   # the training processes started from here
    huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           auth: tuple[str, str] | list[tuple[str, str]] | None = None, prevent_thread_lock: bool = False,
           quiet: bool = False) -> Any:
    """Queue limits, upload limit, theme and CSS (gradio 6 takes theme/css in launch), then serve.
    `auth`: one (user, password) or a list of them; checked by a login that slows down guessers."""
    options: AppOptions = getattr(demo, "phi3_options", AppOptions())
    state: AppState | None = getattr(demo, "phi3_state", None)
    credentials = [auth] if isinstance(auth, tuple) else list(auth or [])
    mode = access.ServerMode(host=host, shared=share or options.shared, auth=bool(credentials),
                             on_space=options.space_env.on_space, oauth=options.login_required,
                             demo=options.demo_mode)
    if state is None:  # a Blocks not made by build_app: the body limit still needs the server mode
        state = AppState(options)
    state.mode = mode
    if not mode.owner_at_the_machine:
        hide_server_token()
    # api_open=False: an event of the queue is not also callable at gradio_api/run/<name> (open by default off
    # Spaces), which skipped the queue and with it every concurrency limit (one job, one generation at a time) and
    # ui.bodies' share of it per sender. Unqueued events (the page's polls) stay callable there.
    demo.queue(default_concurrency_limit=options.concurrency_limit, max_size=options.queue_max_size,
               api_open=False)
    quiet_queue(demo)
    limit = [Middleware(bodies.BodyLimit, state=state,
                        max_file_size=gr_utils._parse_file_size(options.max_file_size))]
    # Served files: Gradio's own upload/cache folders only (downloads are handed over as copies in its cache:
    # export_tab.downloadable). The runs folder (configs, events, checkpoints, uploads, zips and their verification,
    # .active.json) is blocked outright; the blocklist wins over everything.
    return demo.launch(server_name=host, server_port=port, share=share, quiet=quiet,
                       auth=login.throttled_login(credentials) if credentials else None,
                       app_kwargs={"middleware": [Middleware(login.ClientAddress), *limit]},
                       prevent_thread_lock=prevent_thread_lock, max_file_size=options.max_file_size,
                       blocked_paths=[str(options.runs_dir)], theme=THEME, css=CSS,
                       show_error=False, footer_links=["api", "settings"], head=PAGE_HEAD,
                       i18n=strings.i18n())
