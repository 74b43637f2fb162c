"""The Compare tab's scoring panel: base vs tuned on the run's held-out rows, from the saved result JSON.

Evaluate runs phi3_lora.evaluate on the loaded engine (greedy, batched, time-bounded) and saves
runs/<id>/eval/<timestamp>.json; choosing an adapter shows its newest saved result (a run scores itself
when it ends, train.eval_answers). Every number shown is read from that JSON through the same formatting
as the CLI and the model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from phi3_lora import evaluate, scores
from phi3_lora.access import Action, Requester
from phi3_lora.errors import UserError
from phi3_lora.ui.adapters import get_engine, hold_source, resolve_source
from phi3_lora.ui.common import AppState, help_md, notice, user_errors
from phi3_lora.ui.guard import check, guarded, rows_refusal
from phi3_lora.ui.strings import t

APP_EVAL_SECONDS = 300.0  # a web request is bounded in time: rows not reached by then are left out and counted
ROWS_HIDDEN = ("The prompts, reference answers and answers of the held-out rows are the run's own data: they are shown "
               "to whoever started the run. The scores are the run's; type your own prompts above to see answers.")
TEXT_COLUMNS = frozenset({"prompt", "reference", "base answer", "tuned answer"})


@dataclass(slots=True)
class EvalPanel:
    run: gr.Button
    status: gr.HTML
    summary: gr.Dataframe
    chart: gr.Plot
    rows: gr.Dataframe


# Fixed widths for the per-row table (evaluate.ROW_HEADERS): left to itself the table sized each column by its
# content, so a column of empty answers (a model that stops at once) shrank to one letter and its header stood
# on end, one letter a line.
ROW_COLUMN_WIDTHS = ["50px", "200px", "200px", "200px", "200px", "95px", "95px", "95px", "85px", "85px"]


def build() -> EvalPanel:
    with gr.Accordion(t("evaluate.title"), open=True):
        gr.HTML(help_md(t("evaluate.help")))
        run = gr.Button(t("evaluate.run"), variant="secondary", elem_id="p3-evaluate")
        status = gr.HTML(elem_id="p3-eval-status")
        summary = gr.Dataframe(headers=list(scores.SUMMARY_HEADERS), interactive=False, elem_id="p3-eval-summary",
                               label=t("evaluate.summary"), visible=False)
        chart = gr.Plot(label=t("evaluate.chart"), elem_id="p3-eval-chart", visible=False)
        rows = gr.Dataframe(headers=list(evaluate.ROW_HEADERS), interactive=False, elem_id="p3-eval-rows",
                            label=t("evaluate.rows"), wrap=True, column_widths=ROW_COLUMN_WIDTHS,
                            visible=False, max_height=480)
    return EvalPanel(run, status, summary, chart, rows)


def chart(result: dict[str, Any]) -> Any:
    """Grouped bars, base vs tuned, for the 0-100 metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in scores.METRICS if m.chart and m.name in result["summary"]]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    width = 0.38
    for offset, side, colour in ((-width / 2, "base", "#9aa5b8"), (width / 2, "tuned", "#4f7cf7")):
        values = [result["summary"][m.name][side] for m in metrics]
        bars = ax.bar([i + offset for i in range(len(metrics))], values, width, label=side, color=colour)
        ax.bar_label(bars, labels=[scores.fmt(m.name, v) for m, v in zip(metrics, values)], fontsize=8, padding=2)
    ax.set_xticks(range(len(metrics)), [m.label for m in metrics])
    ax.set_ylim(0, 110)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, loc="upper left", ncols=2)
    fig.tight_layout()
    plt.close(fig)
    return fig


def row_table(result: dict[str, Any], readable: bool) -> list[list[Any]]:
    """The per-row table; without the rows' text for whoever may not read the run's data (scores stay)."""
    table = evaluate.row_table(result)
    if readable:
        return table
    blank = [i for i, h in enumerate(evaluate.ROW_HEADERS) if h in TEXT_COLUMNS]
    return [["" if i in blank else v for i, v in enumerate(row)] for row in table]


def views(result: dict[str, Any] | None, note: str = "", readable: bool = True) -> tuple[Any, ...]:
    """(status, summary, chart, rows) updates for a result, or an empty panel. `readable`: the requester may read
    the run's rows (access.Action.READ_RUN_DATA); else the per-row text and the skipped rows' reasons are left out."""
    if not result or not result.get("summary"):
        hidden = gr.update(visible=False)
        return note, hidden, hidden, hidden
    name = Path(result.get("file", "")).name
    text = f"{evaluate.coverage_line(result)} Saved as {evaluate.EVAL_DIR}/{name} ({result.get('created', '')})."
    if readable:
        skipped = "".join(notice("warn", f"Skipped {s['where']}: {s['reason']}") for s in result.get("skipped", []))
    else:
        skipped = notice("info", ROWS_HIDDEN)
    return (note + notice("ok", text) + skipped,
            gr.update(value=scores.summary_table(result["summary"]), visible=True),
            gr.update(value=chart(result), visible=True),
            gr.update(value=row_table(result, readable), visible=True))


def shown_rows(result: dict[str, Any] | None) -> list[Any]:
    """The conversations a saved result quotes (prompt and history, reference), for guard.rows_refusal; none when
    it has skipped rows, whose reasons quote rows that are not among its records."""
    if not result or result.get("skipped"):
        return []
    return [{"messages": [*(r.get("history") or []), {"role": "assistant", "content": r.get("reference")}]}
            for r in result.get("rows") or [] if isinstance(r, dict)]


def wire(panel: EvalPanel, state: AppState, source: gr.Dropdown, max_new_tokens: gr.Slider) -> None:
    runs_dir = state.options.runs_dir
    outputs = [panel.status, panel.summary, panel.chart, panel.rows]

    def run_folder(path: Path) -> Path:
        from phi3_lora.adapter_folder import locate_adapter

        run_dir = evaluate.run_dir_of(locate_adapter(path).adapter_dir)
        if run_dir is None:
            raise UserError("This adapter is not a run of this app, so it has no held-out rows to score.",
                            hint="Pick one of your runs, or score a file with `python -m phi3_lora evaluate --data`.")
        return run_dir

    @user_errors
    @guarded(state)
    def on_evaluate(who: Requester, value: str | None, max_new: float,
                    progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        check(state, who, Action.EVALUATE)
        path = resolve_source(runs_dir, value)
        run_dir = run_folder(path)
        with hold_source(path, "an evaluation"):  # its result is saved into the run: Delete run waits
            rows = evaluate.rows_from_run(run_dir)
            engine = get_engine(state, path, progress)
            progress(0.8, desc=f"Answering {len(rows)} held-out conversations with base and tuned…")
            result = evaluate.evaluate(engine, rows, evaluate.EvalOptions(max_new_tokens=int(max_new),
                                                                           max_seconds=APP_EVAL_SECONDS),
                                       source=f"held-out rows of run {run_dir.name} ({evaluate.EVAL_ROWS})")
            evaluate.save_result(result, run_dir)
        return views(result, readable=rows_refusal(state, who, run_dir, shown_rows(result)) is None)

    @guarded(state)
    def on_source(who: Requester, value: str | None) -> tuple[Any, ...]:
        """The newest saved result of the chosen adapter (a run scores itself when it ends)."""
        try:
            path = resolve_source(runs_dir, value)
            from phi3_lora.adapter_folder import locate_adapter

            adapter = locate_adapter(path).adapter_dir
            run_dir = evaluate.run_dir_of(adapter)
        except UserError:
            return views(None)
        result = evaluate.latest_result(run_dir, adapter) if run_dir else None
        return views(result, "" if result else notice("info", "No saved scores for this adapter yet: press Evaluate."),
                     readable=run_dir is not None and rows_refusal(state, who, run_dir, shown_rows(result)) is None)

    panel.run.click(on_evaluate, [source, max_new_tokens], outputs, api_name="evaluate",
                    concurrency_id="generate", concurrency_limit=1)
    source.change(on_source, source, outputs, api_name="eval_results", show_progress="hidden")
