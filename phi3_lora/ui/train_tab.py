"""Tab 3, Train: start / stop / resume a background run and watch it live from its folder on disk.

The run is a child process (phi3_lora.jobs); this tab only reads `runs/<id>/events.jsonl` and
`train.log` on a ~1 s timer, so a refresh, a second browser or a restarted app shows the same run.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from phi3_lora import access, evaluate, events, jobs, runs, scores, trackers, uploads
from phi3_lora.errors import UserError
from phi3_lora.access import Action, Level, Requester
from phi3_lora.spaces import LOGIN_MESSAGE
from phi3_lora.ui.common import AppState, help_md, notice, run_picker, user_errors
from phi3_lora.ui.guard import check, check_model_fits, check_runs_room, check_source, guarded, run_time_limit
from phi3_lora.ui.strings import t, translations

LOG_HIDDEN = ("(The log of a run is shown to whoever started it: it names this server's folders and files. The "
              "status, progress and loss curve above are the run's.)")
MAX_OVERLAY_RUNS = 12  # curves one plot can tell apart by colour
STATE_KIND = {"queued": "info", "running": "info", "finished": "ok", "stopped": "warn", "failed": "error",
              "interrupted": "warn", "unreadable": "error"}


@dataclass(slots=True)
class TrainTab:
    runs: gr.Dropdown
    refresh: gr.Button
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    delete: gr.Button
    status: gr.HTML
    progress: gr.HTML
    plot: gr.Plot
    log: gr.Textbox
    timer: gr.Timer
    seen: gr.State
    overlay_box: gr.Accordion
    overlay_runs: gr.Dropdown
    overlay_plot: gr.Plot
    overlay_scores: gr.Markdown
    # set by wire; app.py fills the page on load with them
    on_load: Callable[[Requester], list[Any]] | None = None
    outputs: list[Any] = field(default_factory=list)  # what on_load returns values for


# What the Delete button sends when its confirmation is declined (never a run id: runs.valid_run_id refuses it).
DELETE_CANCELLED = "(cancelled)"


def delete_confirm_js() -> str:
    """The browser asks before a run is deleted (its checkpoints, adapter and exports go for good), in the page's
    language; declined, the button sends DELETE_CANCELLED instead of the run."""
    texts = {lang: table["train.delete_confirm"] for lang, table in translations().items()
             if "train.delete_confirm" in table}
    return (f"(run) => {{ if (!run) return run; const texts = {json.dumps(texts)}; "
            f"const lang = (document.documentElement.lang || navigator.language || 'en').slice(0, 2); "
            f"const text = (texts[lang] || texts.en).replace('{{run}}', run); "
            f"return window.confirm(text) ? run : {json.dumps(DELETE_CANCELLED)}; }}")


def build(state: AppState) -> TrainTab:
    gr.Markdown(t("train.intro"))
    if state.options.training_refusal:
        gr.HTML(notice("warn", state.options.training_refusal))
    elif state.options.login_required:
        gr.HTML(notice("info", f"{LOGIN_MESSAGE} {t('train.login_button')}"))
    with gr.Row(equal_height=True):
        start = gr.Button(t("train.start"), variant="primary", scale=2)
        stop = gr.Button(t("train.stop"), variant="stop", scale=1)
        resume = gr.Button(t("train.resume"), variant="secondary", scale=1)
        delete = gr.Button(t("train.delete"), variant="secondary", scale=1)
    runs, refresh = run_picker(t("train.run"), t("train.run_info"), "p3-runs")
    status = gr.HTML(notice("info", t("train.no_run")))
    progress = gr.HTML(_progress_html(None), elem_id="p3-progress-box")
    plot = gr.Plot(loss_figure(None), label=t("train.loss"), show_label=False, elem_id="p3-loss-plot")
    log = gr.Textbox(label=t("train.log"), lines=12, max_lines=12, interactive=False, autoscroll=True)
    gr.HTML(help_md(t("train.stop_help")))
    with gr.Accordion(t("train.overlay"), open=False) as overlay_box:
        overlay_runs = gr.Dropdown([], multiselect=True, label=t("train.overlay_runs"), elem_id="p3-overlay-runs",
                                   info=t("train.overlay_info"))
        overlay_plot = gr.Plot(overlay_figure({}), show_label=False, elem_id="p3-overlay-plot")
        overlay_scores = gr.Markdown(overlay_scores_md({}), elem_id="p3-overlay-scores")
    timer = gr.Timer(state.options.poll_seconds)
    seen = gr.State("")
    return TrainTab(runs, refresh, start, stop, resume, delete, status, progress, plot, log, timer, seen, overlay_box,
                    overlay_runs, overlay_plot, overlay_scores)


# --- rendering (pure) -------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _progress_html(st: events.RunStatus | None) -> str:
    pct = 100 * st.progress if st else 0
    if st is None:
        cells = ["step <b>0 / –</b>"]
    else:
        cells = [f"step <b>{st.step} / {st.max_steps or '–'}</b>", f"<b>{pct:.0f}%</b>",
                 f"ETA <b>{_duration(st.eta_seconds) if st.active else '–'}</b>",
                 f"tokens/s <b>{st.tokens_per_second:,.0f}</b>" if st.tokens_per_second else "tokens/s <b>–</b>",
                 f"loss <b>{st.loss:.4f}</b>" if st.loss is not None else "loss <b>–</b>",
                 f"eval loss <b>{st.eval_loss:.4f}</b>" if st.eval_loss is not None else "eval loss <b>–</b>"]
    return (f"<div class='p3-progress' id='p3-progress'><div style='width:{pct:.1f}%'></div></div>"
            f"<div class='p3-stats' id='p3-progress-stats'>{''.join(f'<span>{c}</span>' for c in cells)}</div>")


def status_html(run_id: str, st: events.RunStatus, readable: bool = True) -> str:
    """`readable`: the requester may read the run's log; a failure's reason is the training's own error message,
    which names the server's files like the log does, so others are told where to find it instead."""
    text = {"queued": "starting (loading the model and data)…", "running": "training",
            "finished": "finished — compare it in the Compare tab, export it in Export",
            "stopped": f"stopped — {st.resume_text}",
            "interrupted": "interrupted", "failed": "failed", "unreadable": "unreadable"}.get(st.state, st.state)
    body = f"<b>{html.escape(run_id)}</b>: {text}"
    if st.state == "failed" and not readable:
        body += "<br>why is in its log, which is shown to whoever started the run"
    elif st.reason and st.reason not in text:
        body += f"<br>{html.escape(st.reason)}"
    if st.last_checkpoint and st.state in ("stopped", "interrupted", "failed"):
        body += f"<br>last checkpoint: {html.escape(Path(st.last_checkpoint).name)}"  # not the server's folders
    return f"<div class='p3-note p3-{STATE_KIND.get(st.state, 'info')}' id='p3-run-status'>{body}</div>"


def integer_steps(ax: Any, steps: list[int]) -> None:
    """Whole-number step ticks; a curve of one or two steps gets a step of room each side (else 0.96-1.04)."""
    from matplotlib.ticker import MaxNLocator

    if steps and max(steps) - min(steps) < 2:
        ax.set_xlim(max(0, min(steps) - 1), max(steps) + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def loss_figure(st: events.RunStatus | None) -> Any:
    """Train loss as a line, eval loss as markers (matplotlib: it renders the same in every browser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.0), dpi=100)
    if st is not None and st.losses:
        ax.plot(*zip(*st.losses), color="#4f7cf7", linewidth=1.8, marker="o" if len(st.losses) < 30 else None,
                markersize=3, label="train loss")
    if st is not None and st.eval_losses:
        ax.plot(*zip(*st.eval_losses), color="#e8590c", linewidth=1.5, marker="s", markersize=5, label="eval loss")
    for number, step in enumerate(st.attempts if st is not None else [], start=2):  # never join attempts silently
        ax.axvline(step, color="#999", linestyle="--", linewidth=1, label=f"attempt {number} from step {step}")
    if st is None or not (st.losses or st.eval_losses):
        ax.text(0.5, 0.5, "the loss curve appears here after the first logged step", ha="center", va="center",
                transform=ax.transAxes, color="#888")
    else:
        ax.legend(frameon=False, loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    integer_steps(ax, [x for x, _ in (st.losses + st.eval_losses)] if st else [])
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def overlay_figure(curves: dict[str, events.RunStatus]) -> Any:
    """Several runs' loss curves on one axis: a colour per run, train solid, eval dashed with markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100)
    colours = plt.get_cmap("tab10").colors
    steps: list[int] = []
    for i, (run_id, st) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        if st.losses:
            ax.plot(*zip(*st.losses), color=colour, linewidth=1.6, label=f"{run_id} train")
        if st.eval_losses:
            ax.plot(*zip(*st.eval_losses), color=colour, linewidth=1.2, linestyle="--", marker="s", markersize=4,
                    label=f"{run_id} eval")
        steps += [x for x, _ in st.losses + st.eval_losses]
    if not steps:
        ax.text(0.5, 0.5, "pick runs above to see their curves together", ha="center", va="center",
                transform=ax.transAxes, color="#888")
    else:
        ax.legend(frameon=False, loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    integer_steps(ax, steps)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def overlay_scores_md(results: dict[str, dict[str, Any] | None]) -> str:
    """The chosen runs' newest evaluation scores side by side (Compare → Evaluate writes them)."""
    if not results:
        return ""
    if not any(results.values()):
        return help_md("None of these runs has been evaluated yet: Compare → Evaluate scores a run's held-out rows.")
    return "**Held-out scores** (newest evaluation of each run)\n\n" + scores.markdown_table(
        scores.RUNS_HEADERS, scores.runs_table(results))


def run_choices(runs_dir: Any) -> list[tuple[str, str]]:
    out = []
    for info in jobs.list_runs(runs_dir):
        st = info.status
        # A live run's step is left to the progress bar: the list is refreshed on state changes only, so a step
        # count here would lag behind the bar.
        where = "" if st.active else f" · step {st.step:,}/{st.max_steps:,}" if st.max_steps else ""
        what = st.reason[:120] if st.state == "unreadable" else f"{st.state}{where}"
        out.append((f"{info.run_id} · {what}", info.run_id))
    return out


def initial_run(runs_dir: Any) -> str | None:
    """The active run, else the newest one, else None."""
    active = jobs.active_run(runs_dir)
    if active:
        return active
    runs = jobs.list_runs(runs_dir)
    return runs[0].run_id if runs else None


# --- events -----------------------------------------------------------------------------------------

def dashboards_html(run_dir: Any) -> str:
    """How to open the dashboards of the trackers this run logs to (train.report_to), or nothing."""
    from phi3_lora.config import load_yaml

    try:
        chosen = load_yaml(runs.RunDir(run_dir).config).train.report_to
    except (OSError, UserError):
        return ""
    if not chosen:
        return ""
    rows = "".join(f"<div><b>{html.escape(t)}</b>: <code>{html.escape(cmd)}</code></div>"
                   for t, cmd in trackers.dashboards(chosen, Path(run_dir)))
    return f"<div class='p3-help' id='p3-dashboards'>Dashboards (run on this machine):{rows}</div>"


def wire(tab: TrainTab, state: AppState, config_inputs: list[gr.components.Component], build_config: Any) -> None:
    runs_dir = state.options.runs_dir
    view = [tab.status, tab.progress, tab.plot, tab.log, tab.seen]

    def may_read_log(who: Requester, run_id: str) -> bool:
        """The log and the trackers' commands name the server's folders, model and data files: whoever may read
        them sees them, anyone else the run's progress without them."""
        return access.refusal(Action.READ_RUN_LOG, who, state.mode, started_by=state.starters.get(run_id)) is None

    def render(who: Requester, run_id: str | None, seen: str) -> list[Any]:
        if not run_id:
            return [gr.skip()] * 4 + [seen]
        st = jobs.run_info(runs.run_in(runs_dir, run_id)).status
        n_events = len(st.losses) + len(st.eval_losses)
        key = f"{run_id}|{st.state}|{st.step}|{n_events}|{st.last_checkpoint}"
        if key == seen and not st.active:
            return [gr.skip()] * 5
        readable = may_read_log(who, run_id)
        try:
            log = jobs.log_tail(run_id, runs_dir, lines=12) if readable else LOG_HIDDEN
        except UserError:
            log = ""
        if key == seen:
            return [gr.skip(), gr.skip(), gr.skip(), log, key]
        plot = loss_figure(st)
        dashboards = dashboards_html(runs.run_in(runs_dir, run_id).path) if readable else ""
        return [status_html(run_id, st, readable) + dashboards, _progress_html(st), plot, log, key]

    def runs_update(selected: str | None) -> Any:
        choices = run_choices(runs_dir)
        ids = [c[1] for c in choices]
        return gr.update(choices=choices, value=selected if selected in ids else (ids[0] if ids else None))

    @user_errors
    def on_load(who: Requester) -> list[Any]:
        run_id = initial_run(runs_dir)
        return [runs_update(run_id)] + render(who, run_id, "")

    @user_errors
    @guarded(state)
    def on_start(who: Requester, *values: Any) -> list[Any]:
        if state.options.training_refusal:
            raise UserError(state.options.training_refusal)
        check(state, who, Action.START)
        config = build_config(who, *values)
        outward = sorted(set(config.train.report_to) & {"wandb", "mlflow"})
        if outward and who.level is not Level.OWNER:  # they log with this machine's accounts and settings
            raise UserError(f"Only the owner at this machine may log runs to {', '.join(outward)}.",
                            hint="Pick tensorboard or trackio (local files), or none.")
        if not config.data.source:
            raise UserError("No dataset chosen.", hint="Go to the Dataset tab: upload a file or press "
                                                       "\"Use the sample dataset\".")
        check_model_fits(state, who, config.model.name)  # the run downloads it to this machine's disk
        upload = Path(config.data.source) if check_source(state, who, config.data.source) is Action.READ_UPLOAD \
            else None
        need = jobs.disk_needed(jobs.trainable_params_for(config), config.train.save_total_limit)
        check_runs_room(state, who, "starting a run", need, upload=upload)
        kept = None
        if upload is not None:  # outlives the session: a lasting copy, counted in the runs share (guard)
            fresh = not uploads.kept_path(runs_dir, upload).exists()
            kept = uploads.keep_for_run(upload, runs_dir)
            config = config.replace(data={"source": str(kept)})
        try:
            run_id = jobs.start_run(config, runs_dir, need_bytes=need, time_limit_s=run_time_limit(state, who))
        except BaseException:
            if kept is not None and fresh:  # a refused start (busy, bad data, full disk) keeps no copy
                uploads.drop_kept_unless_used(runs_dir, kept)
            raise
        state.starters.record(run_id, who.identity)
        gr.Info(f"Started {run_id}.")
        return [runs_update(run_id)] + render(who, run_id, "")

    def own_run(who: Requester, action: Action, run_id: str | None) -> None:
        """The gate for actions on one run: before anything is read about the run."""
        check(state, who, action, started_by=state.starters.get(run_id) if run_id else None)

    @user_errors
    @guarded(state)
    def on_stop(who: Requester, run_id: str | None) -> list[Any]:
        own_run(who, Action.STOP, run_id)
        if not run_id:
            raise UserError("No run selected.", hint="Pick the run to stop from the list.")
        if not events.run_status(runs.run_in(runs_dir, run_id).path).active:
            raise UserError(f"{run_id} is not running.", hint="Only a running run can be stopped.")
        st = jobs.stop_run(run_id, runs_dir)
        (gr.Warning if "killed" in st.reason else gr.Info)(f"Stopped {run_id} at step {st.step}. {st.resume_text}.")
        return [runs_update(run_id)] + render(who, run_id, "")

    @user_errors
    @guarded(state)
    def on_resume(who: Requester, run_id: str | None) -> list[Any]:
        if state.options.training_refusal:
            raise UserError(state.options.training_refusal)
        own_run(who, Action.RESUME, run_id)
        if not run_id:
            raise UserError("No run selected.", hint="Pick a stopped or interrupted run from the list.")
        runs.run_in(runs_dir, run_id)
        check_runs_room(state, who, f"resuming {run_id}")
        from_step, checkpoint = jobs.resume_point(run_id, runs_dir)
        jobs.resume_run(run_id, runs_dir, time_limit_s=run_time_limit(state, who))
        time.sleep(0.2)
        gr.Info(f"Resumed {run_id} from step {from_step} ({checkpoint.name})." if checkpoint else
                f"Resumed {run_id} from step 0: it never saved a checkpoint, so training starts again.")
        return [runs_update(run_id)] + render(who, run_id, "")

    @user_errors
    @guarded(state)
    def on_delete(who: Requester, run_id: str | None) -> list[Any]:
        if run_id == DELETE_CANCELLED:  # the page's confirmation was declined: nothing happens
            return [gr.skip()] * len(outputs)
        own_run(who, Action.DELETE, run_id)
        if not run_id:
            raise UserError("No run selected.", hint="Pick the run to delete from the list.")
        freed = jobs.delete_run(run_id, runs_dir)
        gr.Info(f"Deleted {run_id} ({freed / 2**30:.2f} GiB freed).")
        remaining = initial_run(runs_dir)
        return [runs_update(remaining)] + render(who, remaining, "")

    @user_errors
    @guarded(state)
    def on_select(who: Requester, run_id: str | None) -> list[Any]:
        return render(who, run_id, "")

    @user_errors
    @guarded(state)
    def on_tick(who: Requester, run_id: str | None, seen: str) -> list[Any]:
        out = render(who, run_id, seen)
        new_key = out[-1] if isinstance(out[-1], str) else seen
        changed = new_key.split("|")[:2] != (seen or "").split("|")[:2]  # another run or another state
        return [runs_update(run_id) if changed and run_id else gr.skip()] + out

    outputs = [tab.runs] + view
    tab.start.click(on_start, config_inputs, outputs, api_name="start_training", concurrency_id="jobs",
                    concurrency_limit=1)
    tab.stop.click(on_stop, tab.runs, outputs, api_name="stop_training", concurrency_id="jobs")
    tab.resume.click(on_resume, tab.runs, outputs, api_name="resume_training", concurrency_id="jobs")
    tab.delete.click(on_delete, tab.runs, outputs, api_name="delete_run", concurrency_id="jobs", js=delete_confirm_js())
    @user_errors
    @guarded(state)
    def on_refresh(who: Requester, run_id: str | None) -> list[Any]:
        return [runs_update(run_id)] + render(who, run_id, "")

    tab.refresh.click(on_refresh, tab.runs, outputs, api_name="list_runs")
    tab.runs.input(on_select, tab.runs, view, api_name="select_run")
    tab.timer.tick(on_tick, [tab.runs, tab.seen], [tab.runs] + view, api_name="poll_run", show_progress="hidden",
                   queue=False)
    def overlay_choices(chosen: list[str] | None) -> Any:
        ids = [c[1] for c in run_choices(runs_dir)]
        return gr.update(choices=ids, value=[r for r in (chosen or []) if r in ids])

    @user_errors
    def on_overlay(chosen: list[str] | None) -> Any:
        # A client sends any list: each run named reads its events and scores and draws a curve, so one request
        # naming a run ten thousand times read it ten thousand times. Few runs, each once (enough to tell apart).
        if len(chosen or []) > MAX_OVERLAY_RUNS:
            raise UserError(f"{len(chosen or [])} runs are too many to overlay in one plot.",
                            hint=f"Pick at most {MAX_OVERLAY_RUNS}.")
        chosen = list(dict.fromkeys(chosen or []))
        ids = {c[1] for c in run_choices(runs_dir)}
        bad = [r for r in chosen if r not in ids]
        if bad:
            raise UserError(f"There is no run called {bad[0]!r}.", hint="Pick runs from the list.")
        return [overlay_figure({r: events.run_status(runs_dir / r) for r in chosen}),
                overlay_scores_md({r: evaluate.latest_result(runs_dir / r) for r in chosen})]

    tab.overlay_box.expand(overlay_choices, tab.overlay_runs, tab.overlay_runs, api_name="overlay_choices")
    tab.overlay_runs.change(on_overlay, tab.overlay_runs, [tab.overlay_plot, tab.overlay_scores],
                            api_name="overlay_runs")
    tab.on_load = on_load
    tab.outputs = outputs

