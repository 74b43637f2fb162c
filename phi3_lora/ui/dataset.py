"""Tab 1, Dataset: upload (or sample, or Hub id), format + column mapping, problems, preview, stats, trained tokens."""

from __future__ import annotations

import ctypes
import gc
import html
import random
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from phi3_lora import config as cfgmod
from phi3_lora import access, data, models, portable, quotas, readers, uploads
from phi3_lora.access import Action, Requester
from phi3_lora.errors import UserError
from phi3_lora.formats import COLUMNS, MESSAGE_KEYS
from phi3_lora.ui.common import AppState, help_md, notice, user_errors
from phi3_lora.ui import names
from phi3_lora.ui.guard import check, check_model, check_source, guarded
from phi3_lora.ui.strings import field_help, t

MAPPING_HEADERS = ["field the format expects", "column in your data"]
PROBLEM_HEADERS = ["file", "where", "field", "what is wrong / what to do"]
PREVIEW_HEADERS = ["#", "turns", "system", "first user message", "first assistant answer"]
NO_DATA = "No data yet: upload a file or press \"Use the sample dataset\"."
# What a session keeps of validated data: a preview for the example renderer and the row count. The full rows
# are freed as soon as the answer is built (10 visitors validating 100 MB each must not keep 10 copies).
KEEP_ROWS = 200
NO_ROWS: dict[str, Any] = {"preview": [], "count": 0}
# The cached tokenizers are shared by every session; rendering a chat template with generation markers is not
# thread-safe in transformers ("AssistantTracker should not be reused"), so two validations take turns.
TOKENIZER_LOCK = threading.Lock()
STATS_ROWS = 5000        # token statistics from at most this many rows (a seeded sample)
MAX_PROBLEMS_SHOWN = 500  # the problems table lists this many; the summary says how many there are


@dataclass(slots=True)
class DatasetTab:
    upload: gr.File
    sample: gr.Button
    source: gr.Textbox
    format: gr.Dropdown
    mapping: gr.Dataframe
    eval_fraction: gr.Slider
    validate: gr.Button
    summary: gr.HTML
    problems: gr.Dataframe
    preview: gr.Dataframe
    stats: gr.HTML
    histogram: gr.Plot
    example: gr.Number
    tokens: gr.HTML
    rows: gr.State
    # set by wire; app.py re-validates a restored draft with them
    on_validate: Callable[..., list[Any]] | None = None
    validate_io: tuple[list[Any], list[Any]] = field(default_factory=lambda: ([], []))  # its inputs, outputs


def build(state: AppState) -> DatasetTab:
    gr.Markdown(t("data.intro"))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            upload = gr.File(label=t("data.upload"), file_types=[".jsonl", ".json", ".csv", ".parquet"],
                             elem_id="p3-upload",
                             height=120)
            with gr.Row():
                sample = gr.Button(t("data.use_sample"), variant="primary", scale=1)
                validate = gr.Button(t("data.validate"), variant="secondary", scale=1)
            gr.HTML(help_md(t("data.sample_help")))
            source = gr.Textbox(label=t("data.source"), placeholder=t("data.source_placeholder"),
                                info=t("data.source_info"),
                                elem_id="cfg-data-source")
        with gr.Column(scale=2):
            fmt = gr.Dropdown(list(cfgmod.DATA_FORMATS), value="auto", label=t("data.format"),
                              info=t("data.format_info"), elem_id="cfg-data-format")
            mapping = gr.Dataframe(headers=MAPPING_HEADERS, datatype=["str", "str"], column_count=2,
                                   row_count=1, interactive=True, label=t("data.mapping"),
                                   static_columns=[0], max_height=220, elem_id="p3-mapping",
                                   elem_classes=["cfg-data-mapping"])
            gr.HTML(help_md(t("data.mapping_help")))
            low, high = cfgmod.field_bounds(cfgmod.DataSettings, "eval_fraction")
            eval_fraction = gr.Slider(low, high, value=0.1, step=0.01, label=t("data.eval_split"), elem_id="cfg-data-eval_fraction",
                                      info=field_help("data", "eval_fraction"))
    summary = gr.HTML(notice("info", t("data.no_data")))
    problems = gr.Dataframe(headers=PROBLEM_HEADERS, label=t("data.problems"),
                            interactive=False, visible=False, wrap=True, max_height=260,
                            column_widths=["15%", "10%", "20%", "55%"])
    preview = gr.Dataframe(headers=PREVIEW_HEADERS, label=t("data.preview"), interactive=False,
                           wrap=True, max_height=320, column_widths=["5%", "8%", "17%", "35%", "35%"])
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown(t("data.token_lengths"))
            stats = gr.HTML()
            histogram = gr.Plot(label=t("data.histogram"), show_label=False)
        with gr.Column():
            gr.Markdown(t("data.trains_on"))
            example = gr.Number(1, precision=0, minimum=1, label=t("data.example_row"),
                                info=t("data.example_row_info"))
            tokens = gr.HTML()
    rows = gr.State(NO_ROWS)
    return DatasetTab(upload, sample, source, fmt, mapping, eval_fraction, validate, summary, problems, preview,
                      stats, histogram, example, tokens, rows)


# --- pure helpers ---------------------------------------------------------------------------------

def mapping_from_table(table: Any) -> dict[str, str]:
    """The table's edited rows -> DataSettings.mapping (identity rows are left out)."""
    if table is None:
        return {}
    records = table.values.tolist() if isinstance(table, pd.DataFrame) else (table.get("data") if isinstance(
        table, dict) else table)
    out = {}
    for row in records or []:
        if len(row) < 2:
            continue
        key, value = str(row[0] or "").strip(), str(row[1] or "").strip()
        if key and value and key != value:
            out[key] = value
    return out


def mapping_table(fmt: str, columns: list[str], mapping: dict[str, str]) -> pd.DataFrame:
    wanted = list(COLUMNS.get(fmt, ())) + (list(MESSAGE_KEYS) if fmt == "messages" else [])
    rows = [[f, mapping.get(f, f if f in columns or f in MESSAGE_KEYS else "")] for f in wanted]
    rows += [[k, v] for k, v in mapping.items() if k not in wanted]
    return pd.DataFrame(rows or [["", ""]], columns=MAPPING_HEADERS)


def display_name(source: str) -> str:
    """The name a user knows: a kept upload without its content-hash prefix (runs/.uploads/.../<hash>-name)."""
    path = Path(source)
    if uploads.UPLOADS in path.parts:
        return re.sub(r"^[0-9a-f]{10}-", "", path.name)
    return path.name if path.exists() else source


def user_names(source: str) -> Callable[[str], str]:
    """What turns the readers' texts about an upload (they name the stored file, <hash>-name) into texts that
    name the file the user uploaded; any other source's texts stay as they are."""
    stored, own = Path(source).name, display_name(source)
    if stored == own:
        return lambda text: text
    return lambda text: text.replace(stored, own)


def _short(text: str, n: int = 140) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def preview_frame(rows: list[dict[str, Any]], limit: int = 50) -> pd.DataFrame:
    out = []
    for i, row in enumerate(rows[:limit], 1):
        msgs = row["messages"]
        first = {m["role"]: m["content"] for m in reversed(msgs)}
        out.append([i, len(msgs), _short(first.get("system", ""), 60), _short(first.get("user", "")),
                    _short(first.get("assistant", ""))])
    return pd.DataFrame(out, columns=PREVIEW_HEADERS)


def tokens_html(pieces: list[tuple[str, bool]]) -> str:
    """Trained (assistant) tokens green, masked ones grey, with a legend."""
    legend = ("<div class='p3-legend'><span class='p3-trained'>trained on (assistant)</span>"
              "<span class='p3-masked'>masked (system, user, template)</span></div>")
    body = "".join(f"<span class='{'p3-trained' if t else 'p3-masked'}'>{html.escape(text)}</span>"
                   for text, t in pieces)
    return f"{legend}<div class='p3-tokens' id='p3-token-preview'>{body}</div>"


def histogram_figure(lengths: list[int], max_length: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=100)
    bins = data.histogram_bins(lengths, bins=24)
    ax.bar([b.start for b in bins], [b.count for b in bins], width=[b.end - b.start for b in bins], align="edge",
           color="#7aa2ff", edgecolor="#4f7cf7")
    ax.axvline(max_length, color="#d9534f", linestyle="--", linewidth=1.5, label=f"max length {max_length}")
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("conversations")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of conversations: no 0.5 ticks
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.close(fig)
    return fig


@lru_cache(maxsize=4)
def tokenizer_for(name: str) -> Any:
    return models.load_tokenizer(models.resolve_name(name)[0])


def _columns(source: str, token: str | bool | None = None) -> list[str]:
    try:
        raw = readers.read_records(source, token=token)
    except (UserError, OSError, ValueError):  # the validation that follows reports what is wrong with the source
        return []
    seen: dict[str, None] = {}
    for _, rec in raw.records[:50]:
        if isinstance(rec, dict):
            seen.update(dict.fromkeys(map(str, rec)))
    return list(seen)


# --- events ---------------------------------------------------------------------------------------

def validate(source: str, fmt: str, table: Any, eval_fraction: float, model_name: str, max_length: Any,
             seed: Any, token: str | bool | None = None) -> tuple[Any, ...]:
    """Load + validate; every output of the tab. Errors go into the summary box (and a toast)."""
    source = (source or "").strip()
    if not source:
        raise UserError("No data source yet.", hint="Upload a file, press \"Use the sample dataset\", or type a "
                                                   "Hub dataset id and press Validate.")
    mapping = mapping_from_table(table)
    settings = cfgmod.DataSettings(source=source, format=fmt, mapping=mapping, eval_fraction=float(eval_fraction))
    named = user_names(source)
    try:
        try:
            loaded = data.load_data(settings, token=token)
        except UserError as exc:
            raise UserError(named(exc.message), hint=named(exc.hint) if exc.hint else None) from None
        count = len(loaded.rows)
        columns = loaded.columns
        max_length = int(max_length or cfgmod.TrainSettings.max_length)
        n_train, n_eval = split_sizes(count, settings.eval_fraction, int(seed or 0))
        parts = [notice("ok", f"{named(loaded.source)}: format {loaded.format} "
                              f"({'detected' if fmt == 'auto' else 'as chosen'}), {count:,} usable of "
                              f"{loaded.total_rows:,} rows → {n_train:,} train / {n_eval:,} eval.")]
        parts += [notice("warn", named(w)) for w in loaded.warnings]
        shown = loaded.problems[:MAX_PROBLEMS_SHOWN]
        problems = pd.DataFrame([[named(p.source), p.location, p.field, named(p.message)] for p in shown],
                                columns=PROBLEM_HEADERS)
        if len(loaded.problems) > len(shown):
            parts.append(notice("warn", f"The first {len(shown):,} of {len(loaded.problems):,} problems are listed."))
        stats_html, fig, tokens, slider = _stats(stats_sample(loaded.rows), model_name, max_length, count,
                                                 loaded.rows[0])
        kept = {"preview": loaded.rows[:KEEP_ROWS], "count": count}  # all a session keeps of the data
        return ("\n".join(parts), gr.update(value=problems, visible=bool(shown)), preview_frame(loaded.rows),
                stats_html, fig, slider, tokens, kept, mapping_table(loaded.format, columns, mapping))
    finally:
        loaded = None  # the full rows go now, not when the session ends
        release_memory()


def split_sizes(count: int, eval_fraction: float, seed: int) -> tuple[int, int]:
    """(train, eval) row counts of data.split_rows for `count` rows, without the rows."""
    train, held = data.split_rows(range(count), eval_fraction, seed)
    return len(train), len(held)


def stats_sample(rows: list[dict[str, Any]], limit: int = STATS_ROWS) -> list[dict[str, Any]]:
    """At most `limit` rows (a seeded random sample) for the token statistics: tokenising a million rows in a
    web request would hold a core for minutes."""
    return rows if len(rows) <= limit else random.Random(0).sample(rows, limit)


def release_memory() -> None:
    """Hand freed memory back to the system (glibc keeps freed small blocks otherwise, so a big validation
    would leave the process that much larger for good)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _stats(rows: list[dict[str, Any]], model_name: str, max_length: int, count: int | None = None,
           first: dict[str, Any] | None = None) -> tuple[str, Any, str, Any]:
    count = len(rows) if count is None else count
    try:
        tok = tokenizer_for(model_name)
    except UserError as exc:
        msg = notice("warn", f"Token stats need the model's tokenizer: {exc.message}")
        return msg, None, msg, gr.update(maximum=max(1, min(count, KEEP_ROWS)), value=1)
    with TOKENIZER_LOCK:
        st = data.compute_stats(rows, tok, max_length)
        mask = data.trained_token_mask(tok, (first or rows[0])["messages"], max_length)
    lengths = st.token_lengths
    trained = f"{st.trained_tokens:,}" if st.trained_tokens is not None else "all"
    sampled = f" (token figures from a sample of {len(rows):,} of {count:,} rows)" if count > len(rows) else ""
    html_parts = [f"<div class='p3-stats'><span>rows <b>{count:,}</b></span><span>turns/row "
                  f"<b>{st.mean_turns:.1f}</b></span><span>tokens <b>{st.total_tokens:,}</b></span>"
                  f"<span>trained tokens <b>{trained}</b></span>"
                  f"<span>median length <b>{sorted(lengths)[len(lengths) // 2]:,}</b></span>"
                  f"<span>longest <b>{max(lengths):,}</b></span><span>over max length <b>{st.truncated:,}</b></span>"
                  "</div>"]
    html_parts += [notice("warn", w) for w in st.warnings]
    if sampled:
        html_parts.append(help_md(sampled.strip(" ()").capitalize() + "."))
    tokens = tokens_html(mask)
    return ("\n".join(html_parts), histogram_figure(lengths, max_length), tokens,
            gr.update(maximum=max(1, min(count, KEEP_ROWS)), value=1))


def wire(tab: DatasetTab, state: AppState, model_name: gr.Dropdown, max_length: gr.Number, seed: gr.Number) -> None:
    outputs = [tab.summary, tab.problems, tab.preview, tab.stats, tab.histogram, tab.example, tab.tokens, tab.rows,
               tab.mapping]
    inputs = [tab.source, tab.format, tab.mapping, tab.eval_fraction, model_name, max_length, seed]

    @user_errors
    @guarded(state)
    def on_validate(who: Requester, *args: Any) -> tuple[Any, ...]:
        source, model = names.server_source(state, who, args[0]), check_model(state, who, args[4])
        check_source(state, who, source)
        args = (source, *args[1:4], model, *args[5:])
        token = access.hub_token(who, None)
        try:
            return validate(*args, token=token)
        except UserError as exc:
            gr.Warning(exc.message)
            fmt = args[1] if args[1] != "auto" else "messages"
            return (notice("error", exc.message + (f" {exc.hint}" if exc.hint else "")), gr.update(visible=False),
                    None, "", None, gr.update(), "", NO_ROWS, mapping_table(fmt, _columns(args[0] or "", token),
                                                                             mapping_from_table(args[2])))

    @user_errors
    @guarded(state)
    def on_upload(who: Requester, file: str | None) -> str:
        if not file:
            return gr.skip()
        check(state, who, Action.UPLOAD)
        if not who.session:
            raise UserError("This upload came without a browser session.", hint="Reload the page and try again.")
        uploads.sweep(state.options.runs_dir)
        options = state.options
        stored = uploads.store(file, options.runs_dir, who.session, session_quota=options.upload_session_quota,
                               total_quota=options.upload_total_quota, holder=quotas.holder_of(who),
                               limits=options.limits)
        return names.web_source(state, str(stored))  # the form names no folder of the server

    @user_errors
    def on_sample() -> tuple[str, pd.DataFrame]:
        return portable.SAMPLE_IN_CHECKOUT, pd.DataFrame([["", ""]], columns=MAPPING_HEADERS)

    @user_errors
    @guarded(state)
    def on_example(who: Requester, kept: dict[str, Any] | None, index: float, name: str, max_len: Any) -> str:
        name = check_model(state, who, name)
        rows = (kept or NO_ROWS).get("preview") or []
        if not rows:
            return ""
        i = min(max(int(index or 1), 1), len(rows)) - 1
        tok = tokenizer_for(name)
        with TOKENIZER_LOCK:
            mask = data.trained_token_mask(tok, rows[i]["messages"], int(max_len or cfgmod.TrainSettings.max_length))
        return tokens_html(mask)

    @user_errors
    def on_eval_fraction(kept: dict[str, Any] | None, fraction: float, seed_value: Any, summary: str) -> str:
        count = int((kept or NO_ROWS).get("count") or 0)
        if not count:
            return gr.skip()
        n_train, n_eval = split_sizes(count, float(fraction), int(seed_value or 0))
        return notice("ok", f"{count:,} usable rows → {n_train:,} train / {n_eval:,} eval (eval split "
                            f"{float(fraction):.0%}).")

    def on_clear_upload(source: str) -> tuple[Any, ...]:
        """The upload's × : a kept upload stops being the source (Start must not train on a file no longer shown);
        a Hub id or the sample chosen since stays."""
        if not names.is_upload(source) and uploads.UPLOADS not in Path(source or "").parts:
            return (gr.skip(),) * 8
        # everything shown of the file goes with it: its problems, token stats, histogram and trained tokens too
        return ("", notice("info", NO_DATA), NO_ROWS, gr.update(value=None), gr.update(value=None, visible=False),
                "", None, "")

    tab.upload.clear(on_clear_upload, tab.source, [tab.source, tab.summary, tab.rows, tab.preview, tab.problems,
                                                   tab.stats, tab.histogram, tab.tokens], api_name="clear_upload")
    tab.upload.upload(on_upload, tab.upload, tab.source, api_name="upload_dataset").success(
        on_validate, inputs, outputs, api_name="validate_after_upload")
    tab.sample.click(on_sample, None, [tab.source, tab.mapping], api_name="use_sample").success(
        on_validate, inputs, outputs, api_name="validate_sample")
    tab.validate.click(on_validate, inputs, outputs, api_name="validate")
    tab.on_validate, tab.validate_io = on_validate, (inputs, outputs)
    tab.source.submit(on_validate, inputs, outputs, api_name="validate_source")
    tab.example.submit(on_example, [tab.rows, tab.example, model_name, max_length], tab.tokens,
                        api_name="render_example")
    tab.eval_fraction.release(on_eval_fraction, [tab.rows, tab.eval_fraction, seed, tab.summary], tab.summary,
                              api_name="eval_split")
