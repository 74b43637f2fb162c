"""The time estimate beside the memory estimate: steps × measured seconds per step here (phi3_lora.steptime)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from phi3_lora import config as cfgmod
from phi3_lora import data, jobs, steptime
from phi3_lora.errors import UserError
from phi3_lora.access import Action, Requester
from phi3_lora.ui.common import AppState, notice, user_errors
from phi3_lora.ui.guard import check, guarded
from phi3_lora.ui.strings import t

# A handler's answer carries text to translate as the marker string (str of I18nData), never the I18nData itself:
# gradio's REST route (/gradio_api/call/<api>) encodes answers with the plain json module and drops any answer holding
# one ("I18nData is not JSON serializable"); the page translates the marker all the same.
PRESET_INFO = str(t("timing.preset_info"))


@dataclass(slots=True)
class TimingBox:
    html: gr.HTML
    measure: gr.Button


def build() -> TimingBox:
    html = gr.HTML(elem_id="p3-time")
    measure = gr.Button(t("timing.measure"), size="sm", variant="secondary")
    return TimingBox(html, measure)


def train_rows(rows: dict[str, Any] | list[dict[str, Any]] | None, fraction: Any, seed: int) -> int:
    """Rows the run will train on (the same split as the run). `rows`: the Dataset tab's state, which keeps a
    preview and the count (dataset.NO_ROWS), or a list of rows."""
    count = int(rows.get("count") or 0) if isinstance(rows, dict) else len(rows or [])
    if not count:
        return 0
    return len(data.split_rows(range(count), float(fraction or 0), seed)[0])


def preset_info(config: cfgmod.RunConfig, runs_dir: Any, n_rows: int) -> str:
    """The preset radio's text with each preset's measured duration on this machine, where known."""
    times = []
    for name in cfgmod.PRESET_NAMES:
        chosen = cfgmod.preset(name, config)  # as choosing it would set the widgets (quick-cpu names its model)
        measured = steptime.lookup(runs_dir, chosen)
        if measured and (n_rows or chosen.train.max_steps > 0):
            total = steptime.planned_steps(chosen, n_rows) * measured.seconds_per_step(chosen)
            times.append(f"{name} ≈ {steptime.duration(total)}")
    # The radio's info, translated in the page (no API client reads it); one key per string: Gradio's frontend
    # translates only the first key in a string.
    return f"{t('timing.preset_info_measured')} {', '.join(times)}." if times else PRESET_INFO


def wire(box: TimingBox, state: AppState, config_inputs: list[Any], build_config: Callable[..., cfgmod.RunConfig],
         rows: gr.State, preset: gr.Radio, triggers: list[Any]) -> None:
    runs_dir = state.options.runs_dir

    def render(config: cfgmod.RunConfig, row_list: Any) -> tuple[str, Any]:
        n = train_rows(row_list, config.data.eval_fraction, config.train.seed)
        text = steptime.describe(config, steptime.lookup(runs_dir, config), n, jobs.num_processes(config))
        return notice("info", text), gr.update(info=preset_info(config, runs_dir, n))

    @guarded(state)
    def on_change(who: Requester, *values: Any) -> tuple[str, Any]:
        *config_values, row_list = values
        try:
            config = build_config(who, *config_values)
        except UserError as exc:  # a bad setting (the memory estimate says it too) or a refused model / source
            return notice("error", exc.message + (f" {exc.hint}" if exc.hint else "")), gr.skip()
        return render(config, row_list)

    @user_errors
    @guarded(state)
    def on_measure(who: Requester, *values: Any) -> tuple[str, Any]:
        *config_values, row_list = values
        check(state, who, Action.START)  # a few real training steps on the server
        if state.options.training_refusal:
            raise UserError(state.options.training_refusal)
        config = build_config(who, *config_values)  # the policy's model and data-source gates first
        if jobs.active_run(runs_dir):
            raise UserError("A run is training: a measurement now would be slow and wrong.",
                            hint="Measure when it has ended; the running run's own step time is kept when it ends.")
        if not config.data.source:  # time on the sample until the user has data
            config = config.replace(data={"source": str(state.options.sample_dataset)})
        steptime.measure(config, runs_dir)
        return render(config, row_list)

    inputs = config_inputs + [rows]
    gr.on(triggers + [rows.change], on_change, inputs, [box.html, preset], api_name="time_estimate",
          show_progress="hidden", trigger_mode="always_last")
    box.measure.click(on_measure, inputs, [box.html, preset], api_name="measure_step_time",
                      concurrency_id="jobs", concurrency_limit=1)
