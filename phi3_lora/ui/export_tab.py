"""Tab 5, Export: the adapter as a zip, a merged 16-bit model, or a push to the Hugging Face Hub; each shows
whether a fresh process that loaded it answered the held-out prompts as the app does (phi3_lora.verify)."""

from __future__ import annotations

import html
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from phi3_lora import access
from phi3_lora.access import Action, Requester
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir, exports_dir, find_run, shown_path
from phi3_lora.ui.common import AppState, help_md, notice, run_picker, user_errors
from phi3_lora.ui.guard import check, check_runs_room, guarded, rows_refusal
from phi3_lora.ui.adapters import adapter_choices, hold_source, resolve_source
from phi3_lora.ui.strings import t

MERGED_ZIP_LIMIT = 3 * 2**30  # above this a merged model is saved to disk only (a browser download would be huge)


@dataclass(slots=True)
class ExportTab:
    source: gr.Dropdown
    refresh: gr.Button
    zip_button: gr.Button
    zip_file: gr.File
    zip_status: gr.HTML
    merge_base: gr.Radio
    merge_button: gr.Button
    merge_dir: gr.Textbox
    merge_file: gr.File
    merge_status: gr.HTML
    repo_id: gr.Textbox
    token: gr.Textbox
    what: gr.Radio
    private: gr.Checkbox
    push_button: gr.Button
    push_status: gr.HTML
    gguf_type: gr.Radio
    gguf_button: gr.Button
    gguf_status: gr.HTML
    gguf_file: gr.File
    # set by wire; app.py lists the adapters with it on page load and when the tab opens
    on_refresh: Callable[[str | None], Any] | None = None


def _export():
    try:
        from phi3_lora import export
    except ImportError as exc:  # keeps the tab wired while export.py is being written
        raise UserError(f"Export is not available in this build ({exc}).", hint="Update phi3_lora.") from None
    return export


def build(state: AppState) -> ExportTab:
    gr.Markdown(t("export.intro"))
    source, refresh = run_picker(t("compare.adapter"), t("export.adapter_info"), "p3-export-source")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown(t("export.zip"))
            gr.HTML(help_md(t("export.zip_help")))
            zip_button = gr.Button(t("export.zip_button"), variant="primary")
            zip_file = gr.File(label=t("export.download"), interactive=False, elem_id="p3-zip-file")
            zip_status = gr.HTML(elem_id="p3-zip-status")
        with gr.Column():
            gr.Markdown(t("export.merge"))
            gr.HTML(help_md(t("export.merge_help")))
            merge_base = gr.Radio([(t("export.merge_as_trained"), "auto"),
                                   (t("export.merge_original"), "16bit")], value="auto", label=t("export.merge_into"),
                                  info=t("export.merge_into_info"))
            merge_dir = gr.Textbox(label=t("export.folder"), placeholder="merged",
                                   info=t("export.folder_info"))
            merge_button = gr.Button(t("export.merge_button"), variant="secondary")
            merge_status = gr.HTML()
            merge_file = gr.File(label=t("export.download_merged"), interactive=False, visible=False)
        with gr.Column():
            gr.Markdown(t("export.push_title"))
            repo_id = gr.Textbox(label=t("export.repo"), placeholder=t("export.repo_placeholder"), info=t("export.repo_info"))
            token = gr.Textbox(label=t("export.token"), type="password", placeholder="hf_…",
                               info=t("export.token_info"))
            with gr.Row():
                what = gr.Radio([(t("export.push_adapter"), "adapter"), (t("export.push_merged"), "merged")], value="adapter",
                                label=t("export.push"))
                private = gr.Checkbox(True, label=t("export.private"))
            push_button = gr.Button(t("export.push_button"), variant="secondary")
            push_status = gr.HTML()
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown(t("export.gguf"))
            gr.HTML(help_md(t("export.gguf_help")))
            with gr.Row():
                gguf_type = gr.Radio([(t("export.gguf_f16"), "f16"), (t("export.gguf_q8"), "q8_0")], value="f16",
                                     label=t("export.gguf_type"))
                gguf_button = gr.Button(t("export.gguf_button"), variant="secondary")
            gguf_status = gr.HTML(elem_id="p3-gguf-status")
            gguf_file = gr.File(label=t("export.download_gguf"),
                                interactive=False, visible=False)
    return ExportTab(source, refresh, zip_button, zip_file, zip_status, merge_base, merge_button, merge_dir,
                     merge_file, merge_status, repo_id, token, what, private, push_button, push_status, gguf_type,
                     gguf_button, gguf_status, gguf_file)


def gguf_report(result: Any) -> str:
    """The Export tab's account of a GGUF export: where, how big, the verification and the commands (HTML)."""
    check = result.check
    kind = "ok" if check is None or check.passed else "error"
    lines = [notice(kind, f"{shown_path(result.gguf)} ({result.size_bytes / 2**20:.1f} MiB). "
                          + (check.summary() if check else "Not verified."))]
    folder = str(Path(result.gguf).parent)  # the commands run in the export folder: the download's folder name
    commands = "\n".join(f"# {what}\n{cmd.replace(shlex.quote(folder), shlex.quote(Path(folder).name))}"
                          for what, cmd in result.commands.items())
    lines.append(f"<pre class='p3-commands'>{html.escape(commands)}</pre>")
    return "".join(lines)


def downloadable(component: gr.File, built: Path) -> str:
    """`built` (under the runs folder, which the web server never serves) copied into gradio's own cache for
    `component` to offer: the download's URL names that cache folder and a content hash, never a folder of this
    server, and nothing beside the copy (a zip's verification quotes the held-out rows) can be fetched by its path."""
    from gradio.utils import is_in_or_equal

    served = component.move_resource_to_block_cache(built)
    if not served or not is_in_or_equal(served, component.GRADIO_CACHE):  # gone before gradio could copy it
        raise UserError("The download could not be prepared.", hint="Press the button again.")
    return served


def _run_dir(path: Path) -> Path:
    run = find_run(path)
    return run.path if run else path


_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


VISITOR_MERGE_FOLDER = "merged"  # export.MERGED_FOLDER: where a merged push merges


def merge_destination(run_dir: Path, name: str | None, *, any_name: bool = True) -> Path:
    """A web visitor names a folder inside the run, never a path: a shared link must not write anywhere. Only the
    owner (`any_name`) keeps several merges of a run: each is a 16-bit copy of the whole model on this disk, so a
    visitor's merge replaces the run's one 'merged' folder instead of filling the disk name by name."""
    name = (name or "").strip() or VISITOR_MERGE_FOLDER
    if not any_name and name != VISITOR_MERGE_FOLDER:
        raise UserError(f"Visitors merge into the run's folder {VISITOR_MERGE_FOLDER!r} only (each merge is a "
                        "16-bit copy of the whole model on this server's disk; a new merge replaces the last).",
                        hint=f"Leave the folder name empty or type {VISITOR_MERGE_FOLDER}.")
    if not _FOLDER_NAME.match(name) or name in RunDir.reserved_names():
        raise UserError(f"{name!r} is not a usable folder name.",
                        hint="Use letters, digits, '.', '_' or '-', and not the name of one of the run's own "
                             f"files ({', '.join(sorted(RunDir.reserved_names()))}); it is saved inside the "
                             "run's folder.")
    return run_dir / name


def verification_html(export_path: Path, readable: bool = True) -> str:
    """The export's verification line (and what differed), from its verification.json. `readable`: the requester
    may read the run's rows (access.Action.READ_RUN_DATA); else what differed is said without the rows' text."""
    from phi3_lora import verify

    result = verify.load(export_path)
    if result is None:
        return notice("warn", "Not verified.")
    differences = result.differences if readable else result.differ_at
    return notice("ok" if result.ok else "warn", result.line()) + "".join(notice("info", d) for d in differences)


def download_name(source: Path, folder: Path) -> str:
    """What the download of an export folder of a run is called: '<run id>-<folder>' (<run>-merged, <run>-gguf-f16),
    like the adapter zip's <run>-adapter.zip. Two runs' downloads do not replace each other in a browser's folder."""
    return f"{_run_dir(source).name}-{folder.name}"


def download_zip(component: gr.File, runs_dir: Path, source: Path, folder: Path) -> str:
    """A web download of `folder`, an export of the run that holds `source`, without its verification.json (that
    quotes the run's held-out prompts; its README carries the verification without them): zipped under the run's
    exports folder, handed to gradio, then removed (the folder itself stays; a second copy of a merged model would
    only fill the disk). It unpacks to one folder of the download's name, '<run>-merged/' or '<run>-gguf-f16/', so
    two runs' exports unpack side by side, as the adapter zip's <run>/ (a GGUF README's commands run in whatever
    folder holds it)."""
    from phi3_lora.archive import folder_entries, write_zip

    name = download_name(source, folder)
    dest = exports_dir(runs_dir, _run_dir(source).name) / f"{name}.zip"
    entries = folder_entries(folder, top=name, leave_out=frozenset({"verification.json"}))
    try:
        return downloadable(component, write_zip(dest, entries))
    finally:
        dest.unlink(missing_ok=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def wire(tab: ExportTab, state: AppState) -> None:
    runs_dir = state.options.runs_dir

    @user_errors
    @guarded(state)
    def on_zip(who: Requester, source: str | None, progress: gr.Progress = gr.Progress()) -> tuple[str, str]:
        check(state, who, Action.EXPORT_ZIP)
        path = resolve_source(runs_dir, source)
        progress(0.2, desc="Zipping the adapter, then loading it in a fresh process to verify it…")
        with hold_source(path, "an adapter zip"):  # not deleted nor rotated away meanwhile
            zipped = _export().adapter_zip(path, exports_dir(runs_dir, _run_dir(path).name))
            return downloadable(tab.zip_file, zipped), verification_html(zipped, rows_refusal(state, who, path) is None)

    def _check_export_room(who: Requester, path: Path, out: Path, what: str, gguf_type: str | None = None, *,
                           push: bool = False) -> None:
        """Before any work: what the visitor keeps plus what this export will keep (a merge or GGUF estimated from
        the base model's config; a plain push from the adapter's files; it replaces `out`) stays within their runs
        share (guard.check_runs_room)."""
        if who.level is access.Level.OWNER:
            return
        export = _export()
        adding = export.expected_push_bytes(path) if push else export.expected_export_bytes(path, gguf_type)
        check_runs_room(state, who, what, adding, replacing=f"{out.parent.name}/{out.name}")

    @user_errors
    @guarded(state)
    def on_merge(who: Requester, source: str | None, folder: str, base: str | None = "auto",
                 progress: gr.Progress = gr.Progress()) -> tuple[str, Any]:
        check(state, who, Action.MERGE)
        path = resolve_source(runs_dir, source)
        out = merge_destination(_run_dir(path), folder, any_name=who.level is access.Level.OWNER)
        _check_export_room(who, path, out, "a merge")
        progress(0.1, desc="Loading the base and merging, then verifying in a fresh process (this takes a while)…")
        # whose disk the merged folder counts on, from the start: its temporary lies beside it while it works
        state.starters.record(f"{_run_dir(path).name}/{out.name}", who.identity)
        with hold_source(path, "a merge"):  # until its download is zipped: Delete run waits
            merged = _export().merge_adapter(path, out, base=base or "auto")
            return _merged_answer(who, path, merged, progress)

    def _merged_answer(who: Requester, path: Path, merged: Path, progress: gr.Progress) -> tuple[str, Any]:
        size = _folder_size(merged)
        message = notice("ok", f"Merged model saved to {shown_path(merged)} ({size / 2**30:.2f} GiB, safetensors).") + \
            verification_html(merged, rows_refusal(state, who, path) is None)
        if size > MERGED_ZIP_LIMIT:
            return message + help_md("Too large to download through the browser; copy the folder instead."), \
                gr.update(visible=False)
        progress(0.8, desc="Zipping for download…")
        archive = download_zip(tab.merge_file, runs_dir, path, merged)
        return message, gr.update(value=archive, visible=True)

    @user_errors
    @guarded(state)
    def on_push(who: Requester, source: str | None, repo_id: str, token: str, what: str, private: bool,
                progress: gr.Progress = gr.Progress()) -> str:
        check(state, who, Action.PUSH)
        if what == "merged":
            check(state, who, Action.MERGE)
        hub_token = access.hub_token(who, token)
        if hub_token is False:  # a visitor never pushes with the server's token
            raise UserError("Pushing needs your own Hugging Face token with write access.",
                            hint="Paste it in the token box (it is used for this push only, never stored), or "
                                 "sign in with Hugging Face.")
        path = resolve_source(runs_dir, source)
        if what == "merged":  # merged into the run's one 'merged' folder, which stays: counted like a merge
            out = merge_destination(_run_dir(path), VISITOR_MERGE_FOLDER)
            _check_export_room(who, path, out, "a merged push")
            state.starters.record(f"{_run_dir(path).name}/{out.name}", who.identity)
        else:  # the verified adapter zip and its contents stay in the run's push folder: they count for the pusher
            out = _run_dir(path) / _export().PUSH_FOLDER
            _check_export_room(who, path, out, "a push", push=True)
            state.starters.record(f"{_run_dir(path).name}/{out.name}", who.identity)
        progress(0.1, desc="Pushing to the Hub…")
        with hold_source(path, "a Hub push"):
            url = _export().push_to_hub(path, repo_id, hub_token or None, merged=what == "merged",
                                        private=bool(private), use_saved_login=hub_token is None)
        return notice("ok", f"Pushed: {url}")

    @user_errors
    @guarded(state)
    def on_gguf(who: Requester, source: str | None, gguf_type: str, base: str,
                progress: gr.Progress = gr.Progress()) -> tuple[str, Any]:
        check(state, who, Action.MERGE)  # like a merge: the base in memory and a large file on this machine
        from phi3_lora import gguf_bundle

        if gguf_type not in gguf_bundle.GGUF_TYPES:
            raise UserError(f"Unknown GGUF type {gguf_type!r}.", hint="Pick f16 or q8_0.")
        path = resolve_source(runs_dir, source)
        out = merge_destination(_run_dir(path), f"gguf-{gguf_type}")
        _check_export_room(who, path, out, "a GGUF export", gguf_type)
        progress(0.1, desc="Merging, writing the GGUF and verifying it in a fresh process (this takes a while)…")
        # whose disk the export folder counts on, from the start: its temporary merge lies in it while it works
        state.starters.record(f"{_run_dir(path).name}/{out.name}", who.identity)
        with hold_source(path, "a GGUF export"):  # until its download is zipped: Delete run waits
            result = gguf_bundle.export_gguf(path, out, gguf_type, merge_base=base or "auto")
            return _gguf_answer(path, out, result, progress)

    def _gguf_answer(path: Path, out: Path, result: Any, progress: gr.Progress) -> tuple[str, Any]:
        report = gguf_report(result)
        if _folder_size(result.folder) > MERGED_ZIP_LIMIT:
            return report + help_md("Too large to download through the browser; copy the folder instead."), \
                gr.update(visible=False)
        progress(0.9, desc="Zipping for download…")
        archive = download_zip(tab.gguf_file, runs_dir, path, out)
        return report, gr.update(value=archive, visible=True)

    @user_errors
    def on_refresh(current: str | None) -> Any:
        choices = adapter_choices(runs_dir)
        values = [c[1] for c in choices]
        return gr.update(choices=choices, value=current if current in values else (values[0] if values else None))

    # Verifying a zip loads the base model (here and in a fresh process): one model-heavy request at a time
    tab.zip_button.click(on_zip, tab.source, [tab.zip_file, tab.zip_status], api_name="export_zip",
                         concurrency_id="generate", concurrency_limit=1)
    tab.merge_button.click(on_merge, [tab.source, tab.merge_dir, tab.merge_base], [tab.merge_status, tab.merge_file],
                           api_name="export_merged", concurrency_id="generate", concurrency_limit=1)
    # A push verifies an adapter zip (the base loaded here and in a fresh process) or merges: model-heavy like the rest
    tab.push_button.click(on_push, [tab.source, tab.repo_id, tab.token, tab.what, tab.private], tab.push_status,
                          api_name="push_to_hub", concurrency_id="generate", concurrency_limit=1)
    tab.gguf_button.click(on_gguf, [tab.source, tab.gguf_type, tab.merge_base], [tab.gguf_status, tab.gguf_file],
                          api_name="export_gguf", concurrency_id="generate", concurrency_limit=1)
    tab.refresh.click(on_refresh, tab.source, tab.source, api_name="list_export_adapters")
    tab.on_refresh = on_refresh
