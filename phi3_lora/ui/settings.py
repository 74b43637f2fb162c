"""Tab 2, Model & LoRA settings: one widget per RunConfig field, presets, memory estimate, the YAML + CLI.

Widgets map one-to-one onto `section.field` names; `config_from_values` builds the RunConfig through
`config.from_dict`, so the config's own checks produce every error message.
"""

from __future__ import annotations

import json
import shlex
import typing
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr

from phi3_lora import config as cfgmod
from phi3_lora import estimate, models, options, portable, targets, trackers
from phi3_lora.errors import UserError
from phi3_lora.access import Requester
from phi3_lora.ui import names, timing
from phi3_lora.ui.common import AppState, help_md, notice, user_errors
from phi3_lora.ui.guard import check_model, guarded
from phi3_lora.ui.strings import field_help, field_label, t
from phi3_lora.ui.timing import TimingBox

AUTO_CHOICES = [(t("settings.auto"), "auto"), (t("settings.on"), True), (t("settings.off"), False)]
NO_PRESET = "custom"
DATASET_TAB = "dataset"  # fields whose widgets live in the Dataset tab (metadata tab="dataset")


@dataclass(slots=True)
class SettingsTab:
    fields: dict[str, gr.components.Component]   # "section.field" -> widget, every RunConfig field not in Dataset
    preset: gr.Radio
    preset_notes: gr.HTML
    model_note: gr.Markdown
    estimate: gr.HTML
    show_config: gr.Button
    yaml_code: gr.Code
    cli_code: gr.Code
    keys: list[str]                               # the order the widgets are passed to events in
    timing: TimingBox                             # the run-time estimate


def initial_config(state: AppState) -> cfgmod.RunConfig:
    """What the page opens with: quick-cpu without a GPU, quality-gpu with one, on the app's default model."""
    name = "quality-gpu" if models.cuda_available() else "quick-cpu"
    return cfgmod.preset(name).replace(model={"name": state.default_name}, preset=name)


def schema() -> list[tuple[str, Any, Any]]:
    """(section, dataclass field, resolved type) of every RunConfig field, in declaration order."""
    out = []
    for section, cls in cfgmod.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(section, f, hints[f.name]) for f in fields(cls)]
    return out


def elem_id(section: str, name: str) -> str:
    return f"cfg-{section}-{name}"


def _numeric(tp: Any) -> type | None:
    """int or float for a (possibly optional) number field, else None."""
    members = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
    return members[0] if len(members) == 1 and members[0] in (int, float) else None


def widget(section: str, f: Any, tp: Any, value: Any, info: models.ModelInfo | None,
           state: AppState) -> gr.components.Component:
    """The widget of one RunConfig field, from its metadata: kind, label, choices and the checks' range."""
    m = f.metadata
    common = dict(label=field_label(section, f.name), info=field_help(section, f.name), elem_id=elem_id(section, f.name))
    kind = m.get("widget")
    lo, hi = cfgmod.field_bounds(cfgmod.SECTIONS[section], f.name)
    if kind == "model":
        choices = [(e.label + (f"  ({t('settings.needs_gpu')})" if e.needs_gpu else ""), e.name) for e in models.CATALOGUE]
        return gr.Dropdown(choices, value=state.default_name, allow_custom_value=True, **{
            **common, "info": t("settings.model_info")})
    if kind == "targets":
        targets = info.targets if info else []
        # 'all-linear' checks the Linear layers only: embed_tokens is a choice, never part of 'all-linear'
        return gr.CheckboxGroup(targets, value=_targets_value(value, info.linear_names if info else []), **{
            **common, "info": t("settings.targets_info")})
    if kind == "trackers":
        return gr.CheckboxGroup([t for t in trackers.TRACKERS if t != "none"], value=value, **{
            **common, "info": t("settings.trackers_info")})
    if kind == "slices":
        return gr.CheckboxGroup(list(m["choices"]), value=value, visible=bool(info and info.fused), **common)
    if kind == "slider":
        return gr.Slider(lo, hi, value=value, step=m.get("step", 1), **common)
    if tp is bool:
        return gr.Checkbox(value, **common)
    if tp == cfgmod.BoolOrAuto:
        return gr.Radio(AUTO_CHOICES, value=value, **common)
    if "choices" in m:
        custom = m.get("custom", False)
        return gr.Dropdown([str(c) if custom else c for c in m["choices"]], value=str(value) if custom else value,
                           allow_custom_value=custom, **common)
    number = _numeric(tp)
    if number is not None:
        if type(None) in typing.get_args(tp):  # empty allowed: the browser sends an empty Number as 0, which a
            lo = hi = None                     # minimum would refuse before the handler runs (RunConfig checks it)
        return gr.Number(value, precision=0 if number is int else None, minimum=lo, maximum=hi, **common)
    if typing.get_origin(tp) is list or list in [typing.get_origin(a) for a in typing.get_args(tp)]:
        return gr.Textbox(", ".join(value or []), placeholder=t("settings.comma_names"), **common)
    return gr.Textbox("" if value is None else str(value), **common)


def _targets_value(value: Any, targets: list[str]) -> list[str]:
    return (list(targets) if value == "all-linear"
            else [v for v in value if v in targets or v == "embed_tokens"])


def build(state: AppState) -> SettingsTab:
    d = initial_config(state)
    try:
        info: models.ModelInfo | None = models.model_info(names.server_model(state, d.model.name))
    except UserError:
        info = None
    f: dict[str, gr.components.Component] = {}
    own = [(s, fl, tp) for s, fl, tp in schema() if fl.metadata.get("tab") != DATASET_TAB]

    def add(items: list[tuple[str, Any, Any]]) -> None:
        for section, fl, tp in items:
            f[f"{section}.{fl.name}"] = widget(section, fl, tp, getattr(getattr(d, section), fl.name), info, state)

    basic = [x for x in own if not x[1].metadata.get("advanced")]
    gr.Markdown(t("settings.intro"))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Group():
                add([x for x in basic if x[0] == "model" and x[1].name == "name"])
                model_note = gr.Markdown(f"{t('settings.default_here')} **{state.default_name}**: {state.default_reason}.")
            preset = gr.Radio([(t("settings.custom"), NO_PRESET), *[(n, n) for n in cfgmod.PRESET_NAMES]],
                              value=d.preset or NO_PRESET, label=t("settings.preset"), info=t("timing.preset_info"))
            preset_notes = gr.HTML()
        with gr.Column(scale=2):
            gr.Markdown(t("settings.memory"))
            estimate_box = gr.HTML(estimate_html(d, info) if info else "", elem_id="p3-estimate")
            time_box = timing.build()
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown(t("settings.lora"))
            add([x for x in basic if x[0] in ("model", "lora") and x[1].name != "name"])
        with gr.Column():
            gr.Markdown(t("settings.training"))
            add([x for x in basic if x[0] in ("train", "data")])
    with gr.Accordion(t("settings.advanced"), open=False):
        for section in ("model", "lora", "train", "data"):
            items = [x for x in own if x[0] == section and x[1].metadata.get("advanced")]
            if items:
                gr.Markdown(t(f"settings.advanced.{section}"))
                with gr.Row():
                    add(items)
    gr.Markdown(t("settings.reproduce"))
    show_config = gr.Button(t("settings.show_config"), variant="secondary")
    with gr.Row():
        yaml_code = gr.Code(language="yaml", label="run.yaml", interactive=False, visible=False, max_lines=22)
        cli_code = gr.Code(language="shell", label=t("settings.cli"), interactive=False, visible=False, max_lines=22)
    gr.HTML(help_md(t("settings.reproduce_help")))
    return SettingsTab(f, preset, preset_notes, model_note, estimate_box, show_config, yaml_code, cli_code, list(f),
                       time_box)


# --- widgets <-> RunConfig ----------------------------------------------------------------------

def config_from_values(values: dict[str, Any], all_targets: list[str] | None = None,
                       preset_name: str | None = None) -> cfgmod.RunConfig:
    """The RunConfig for widget values keyed "section.field"; config.from_dict's coercion and checks raise the
    UserErrors. Only the widget forms that are not the field's own type are turned here."""
    hints = {f"{s}.{fl.name}": tp for s, fl, tp in schema()}
    data: dict[str, Any] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        tp = hints[key]
        if key == "lora.target_modules":
            value = list(value or [])
            if all_targets and value and set(value) == set(all_targets):
                value = "all-linear"
        elif isinstance(value, str) and (typing.get_origin(tp) is list
                                         or list in [typing.get_origin(a) for a in typing.get_args(tp)]):
            value = [m.strip() for m in value.split(",") if m.strip()] or None
        elif value is None and type(None) not in typing.get_args(tp):
            raise UserError(f"{key} is empty; give it a value.")
        elif value == 0 and not isinstance(value, bool) and type(None) in typing.get_args(tp) \
                and typing.get_origin(tp) is not list:
            value = None  # the browser sends an emptied Number as 0; for an optional field that means empty
        data.setdefault(section, {})[name] = value
    data["preset"] = preset_name if preset_name and preset_name != NO_PRESET else None
    return cfgmod.from_dict(data)


def values_from_config(config: cfgmod.RunConfig, keys: list[str], all_targets: list[str]) -> list[Any]:
    """Widget values for `keys`, in that order (the inverse of config_from_values)."""
    hints = {f"{s}.{fl.name}": (fl, tp) for s, fl, tp in schema()}
    out = []
    for key in keys:
        section, name = key.split(".", 1)
        value = getattr(getattr(config, section), name)
        fl, tp = hints[key]
        if key == "lora.target_modules":
            value = _targets_value(value, all_targets)
        elif fl.metadata.get("custom"):
            value = str(value)
        elif isinstance(value, list) and not fl.metadata.get("widget") and "choices" not in fl.metadata:
            value = ", ".join(value)
        elif value is None and _numeric(tp) is None:  # an empty text field
            value = ""
        out.append(value)
    return out


def preset_matches(config: cfgmod.RunConfig, name: str) -> bool:
    """Whether `config` still has every value the preset sets (the base model aside: a preset runs on any)."""
    if name not in cfgmod.PRESETS:
        return False
    applied, current = cfgmod.preset(name, config).to_dict(), config.to_dict()
    applied["model"]["name"] = current["model"]["name"]
    applied.pop("preset"), current.pop("preset")
    return applied == current


def cli_text(config: cfgmod.RunConfig) -> str:
    """The run as `train --config run.yaml`, and as flags (only those differing from the defaults)."""
    default = cfgmod.RunConfig()
    flags = []
    for section, cls in cfgmod.SECTIONS.items():
        for fld in fields(cls):
            value = getattr(getattr(config, section), fld.name)
            if value != getattr(getattr(default, section), fld.name):
                text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
                flags.append(f"--{section}.{fld.name} {shlex.quote(text)}")
    return ("# with the YAML saved as run.yaml\npython -m phi3_lora train --config run.yaml\n\n"
            "# the same run as flags\npython -m phi3_lora train \\\n    " + " \\\n    ".join(flags or ["--print-config"]))


def batch_line(config: cfgmod.RunConfig) -> str:
    """GPUs used and the global batch they add up to (what the learning rate actually sees)."""
    from phi3_lora import jobs

    n = jobs.num_processes(config)
    t = config.train
    where = f"{n} GPU{'s' if n > 1 else ''} ({'DDP through accelerate' if n > 1 else 'one process'})" \
        if models.cuda_available() else "CPU, one process"
    return (f"Training on {where}: global batch = {t.per_device_train_batch_size} per device × "
            f"{t.gradient_accumulation_steps} accumulation × {max(n, 1) if models.cuda_available() else 1} = "
            f"<b>{options.effective_batch(config, n if models.cuda_available() else 1)}</b> rows per optimizer step.")


def estimate_html(config: cfgmod.RunConfig, info: models.ModelInfo) -> str:
    try:
        trainable, total = targets.count_lora_parameters(
            __import__("transformers").AutoConfig.for_model(**info.config), config.lora)
    except UserError as exc:
        return notice("error", exc.message + (f" {exc.hint}" if exc.hint else ""))
    except Exception:  # an architecture peft's count cannot read: fall back to our arithmetic
        trainable = total = None
    from phi3_lora.speed.sdpa_backend import cudnn_available  # torch: only once an estimate is asked for

    cuda = models.cuda_available()
    liger = options.liger_installed()
    # The trainer's own plan (checkpointed layers for the budget, Liger) counted by the one memory model.
    gpu = options.planned_memory(info.config, config, "cuda", liger_installed=liger, trainable_params=trainable,
                                 gpu_memory_gb=models.gpu_memory_gb() if cuda else None,
                                 cudnn_ok=cudnn_available() if cuda else True)  # an unknown GPU: the larger figure
    total = total or gpu.total_params
    trainable = trainable if trainable is not None else gpu.trainable_params
    budget = (f"a {config.train.memory_budget_gb:g} GiB budget" if config.train.memory_budget_gb
              else "this GPU's memory" if cuda else "an unknown GPU size (set train.memory_budget_gb to plan for yours)")
    lines = [f"<div class='p3-stats'><span>Trainable parameters <b>{trainable:,}</b></span>"
             f"<span>of <b>{total:,}</b></span><span><b>{100 * trainable / max(total, 1):.3f}%</b></span></div>",
             notice("info", f"On a GPU, planned for {budget}: " + estimate.describe(gpu) + "."),
             f"<span class='p3-help'>{batch_line(config)}</span>"]  # batch_line's own <b>: not escaped
    if not cuda:
        cpu = options.planned_memory(info.config, config, "cpu", liger_installed=liger, trainable_params=trainable)
        lines.append(notice("info", "On this machine (no GPU): " + estimate.describe(cpu) + "."))
        notes = cpu.notes
    else:
        notes = gpu.notes
    lines += [notice("warn", n) for n in notes]
    lines.append(help_md(f"Layer sizes from {info.source} of {portable.model_name(info.name)}."))  # no server folder
    return "\n".join(lines)


# --- events ---------------------------------------------------------------------------------------

def wire(tab: SettingsTab, state: AppState, demo: gr.Blocks) -> None:
    keys = tab.keys
    widgets = [tab.fields[k] for k in keys]

    def named(values: Any) -> dict[str, Any]:
        """The widgets' values (passed in `keys` order) keyed by field name."""
        return dict(zip(keys, values, strict=True))

    targets = tab.fields["lora.target_modules"]
    slices = tab.fields["lora.fused_slices"]

    @user_errors
    @guarded(state)
    def on_model(who: Requester, name: str, current: list[str], chosen: list[str]) -> tuple[Any, Any, str]:
        info = models.model_info(check_model(state, who, name))
        keep = [c for c in (current or []) if c in info.targets]
        return (gr.update(choices=info.targets, value=keep if keep and len(keep) < len(current or [1, 1])
                          else info.linear_names),
                gr.update(visible=info.fused, value=(chosen or []) if info.fused else []),
                f"Default here: **{state.default_name}**, because {state.default_reason}. "
                f"Selected: **{names.web_model(state, info.name)}** ({len(info.linear_names)} kinds of Linear layer: "
                f"{', '.join(info.linear_names)}).")

    @user_errors
    @guarded(state)
    def on_change(who: Requester, *values: Any) -> tuple[str, Any]:
        *vals, preset_name = values
        given = named(vals)
        try:
            given["model.name"] = check_model(state, who, given["model.name"])
            info = models.model_info(given["model.name"])
            config = config_from_values(given, info.linear_names, preset_name)
        except UserError as exc:
            return notice("error", exc.message + (f" {exc.hint}" if exc.hint else "")), gr.skip()
        # An edit that leaves the preset's values makes the run custom: the radio must not claim the preset.
        still = preset_name == NO_PRESET or preset_matches(config, preset_name)
        return estimate_html(config, info), gr.skip() if still else gr.update(value=NO_PRESET)

    @user_errors
    @guarded(state)
    def on_preset(who: Requester, name: str, *values: Any) -> list[Any]:
        given = named(values)
        given["model.name"] = check_model(state, who, given["model.name"])
        if name == NO_PRESET:
            return [gr.skip()] * len(keys) + [""]
        info = models.model_info(given["model.name"])
        try:
            base = config_from_values(given, info.linear_names)
        except UserError:
            base = cfgmod.RunConfig()
        config = cfgmod.preset(name, base)
        if config.model.name != base.model.name:
            info = models.model_info(config.model.name)
        notes = [notice("warn", n) for n in cfgmod.preset_warnings(config)]
        if config.model.load_in_4bit and not models.cuda_available():
            notes.append(notice("info", "This preset uses QLoRA (4-bit). Without a GPU it still runs, "
                                        "but slower than 16-bit; untick QLoRA for speed on this machine."))
        vals = values_from_config(config, keys, info.linear_names)
        vals[keys.index("model.name")] = names.web_model(state, config.model.name)
        vals[keys.index("lora.fused_slices")] = gr.update(value=vals[keys.index("lora.fused_slices")] if info.fused
                                                          else [], visible=info.fused)
        vals[keys.index("lora.target_modules")] = gr.update(choices=info.targets,
                                                             value=vals[keys.index("lora.target_modules")])
        return vals + ["\n".join(notes) or notice("ok", f"Preset {name} applied.")]

    tab.fields["model.name"].change(on_model, [tab.fields["model.name"], targets, slices], [targets, slices, tab.model_note],
                                    api_name="model_layers")
    gr.on([w.change for w in widgets], on_change, widgets + [tab.preset], [tab.estimate, tab.preset],
          api_name="estimate",
          show_progress="hidden", trigger_mode="always_last")
    tab.preset.select(on_preset, [tab.preset] + widgets, widgets + [tab.preset_notes], api_name="apply_preset")
