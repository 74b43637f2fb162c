"""Tab 2, Model & LoRA settings: one widget per RunConfig field, presets, memory estimate, the YAML + CLI.

Widgets map one-to-one onto `section.field` names; `config_from_values` builds the RunConfig through
`config.from_dict`, so the config's own checks produce every error message.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr

from phi3_lora import config as cfgmod
from phi3_lora import estimate, models, options, targets, trackers
from phi3_lora.errors import UserError
from phi3_lora.access import Requester
from phi3_lora.ui import timing
from phi3_lora.ui.common import AppState, help_md, notice, user_errors
from phi3_lora.ui.guard import check_model, guarded

GC_CHOICES = [("auto (on for GPU)", "auto"), ("on", True), ("off", False)]
NO_PRESET = "custom"


@dataclass
class SettingsTab:
    fields: dict[str, gr.components.Component]   # "section.field" -> widget
    preset: gr.Radio
    preset_notes: gr.HTML
    model_note: gr.Markdown
    estimate: gr.HTML
    show_config: gr.Button
    yaml_code: gr.Code
    cli_code: gr.Code


def _help(cls: type, name: str) -> str:
    return cfgmod.help_text(cls, name)


def initial_config(state: AppState) -> cfgmod.RunConfig:
    """What the page opens with: quick-cpu without a GPU, quality-gpu with one, on the app's default model."""
    name = "quality-gpu" if models.cuda_available() else "quick-cpu"
    return cfgmod.preset(name).replace(model={"name": state.default_name}, preset=name)


def build(state: AppState) -> SettingsTab:
    d = initial_config(state)
    try:
        info: models.ModelInfo | None = models.model_info(d.model.name)
    except UserError:
        info = None
    names = info.linear_names if info else []
    choices_t = info.targets if info else []
    M, L, T = cfgmod.ModelSettings, cfgmod.LoraSettings, cfgmod.TrainSettings
    f: dict[str, gr.components.Component] = {}
    choices = [(f"{e.label}{'  (needs a GPU)' if e.needs_gpu else ''}", e.name) for e in models.CATALOGUE]
    gr.Markdown("## Model & LoRA settings\nPick a base model and a preset, then adjust any knob. The memory "
                "estimate and the trainable-parameter count follow your choices.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Group():
                f["model.name"] = gr.Dropdown(choices, value=state.default_name, label="Base model",
                                              allow_custom_value=True, info="From the list, or type a Hub id "
                                              "(owner/name) or a local folder with config.json.")
                model_note = gr.Markdown(f"Default here: **{state.default_name}**, because {state.default_reason}.")
            preset = gr.Radio([NO_PRESET, *cfgmod.PRESET_NAMES], value=d.preset or NO_PRESET, label="Preset",
                              info=timing.PRESET_INFO)
            preset_notes = gr.HTML()
        with gr.Column(scale=2):
            gr.Markdown("### Memory and size")
            estimate_box = gr.HTML(estimate_html(d, info) if info else "", elem_id="p3-estimate")
            time_box = timing.build()
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### LoRA adapter")
            f["model.load_in_4bit"] = gr.Checkbox(d.model.load_in_4bit, label="QLoRA: load the base in 4-bit",
                                                  info=_help(M, "load_in_4bit") + " Works on CPU too, but 4-bit pays off on a GPU.")
            f["lora.r"] = gr.Slider(1, 256, value=d.lora.r, step=1, label="Rank r", info=_help(L, "r"))
            f["lora.lora_alpha"] = gr.Number(d.lora.lora_alpha, label="Alpha", info=_help(L, "lora_alpha"))
            f["lora.lora_dropout"] = gr.Slider(0, 0.5, value=d.lora.lora_dropout, step=0.01, label="Dropout",
                                               info=_help(L, "lora_dropout"))
            f["lora.target_modules"] = gr.CheckboxGroup(choices_t, value=values_from_config(d, ["lora.target_modules"], names)[0],
                                                        label="Target modules",
                                                        info="The chosen model's own Linear layers (all checked = "
                                                             "'all-linear') and embed_tokens for LoRA on the embedding.")
            f["lora.fused_slices"] = gr.CheckboxGroup(list(cfgmod.FUSED_SLICES), value=d.lora.fused_slices,
                                                      label="Slices of fused layers (Phi-3)", info=_help(L, "fused_slices"),
                                                      visible=bool(info and info.fused))
            with gr.Row():
                f["lora.use_dora"] = gr.Checkbox(d.lora.use_dora, label="DoRA", info=_help(L, "use_dora"))
                f["lora.use_rslora"] = gr.Checkbox(d.lora.use_rslora, label="rsLoRA", info=_help(L, "use_rslora"))
        with gr.Column():
            gr.Markdown("### Training")
            with gr.Row():
                f["train.learning_rate"] = gr.Number(d.train.learning_rate, label="Learning rate",
                                                     info=_help(T, "learning_rate"))
                f["train.lr_scheduler_type"] = gr.Dropdown(list(cfgmod.SCHEDULERS), value=d.train.lr_scheduler_type,
                                                           label="Scheduler", info="How the learning rate moves.")
            with gr.Row():
                f["train.num_train_epochs"] = gr.Number(d.train.num_train_epochs, label="Epochs",
                                                        info=_help(T, "num_train_epochs"))
                f["train.max_steps"] = gr.Number(d.train.max_steps, label="Max steps", precision=0,
                                                 info=_help(T, "max_steps"))
            with gr.Row():
                f["train.per_device_train_batch_size"] = gr.Number(d.train.per_device_train_batch_size, precision=0,
                                                                   label="Batch size",
                                                                   info=_help(T, "per_device_train_batch_size"))
                f["train.gradient_accumulation_steps"] = gr.Number(d.train.gradient_accumulation_steps, precision=0,
                                                                   label="Gradient accumulation",
                                                                   info=_help(T, "gradient_accumulation_steps"))
            with gr.Row():
                f["train.max_length"] = gr.Number(d.train.max_length, precision=0, label="Max length (tokens)",
                                                  info=_help(T, "max_length"))
                f["train.warmup_ratio"] = gr.Slider(0, 0.5, value=d.train.warmup_ratio, step=0.01,
                                                    label="Warmup ratio", info=_help(T, "warmup_ratio"))
            with gr.Row():
                f["train.eval_steps"] = gr.Number(d.train.eval_steps or 0, precision=0, label="Eval every N steps",
                                                  info="0 evaluates once at the end.")
                f["train.save_steps"] = gr.Number(d.train.save_steps, precision=0, label="Checkpoint every N steps",
                                                  info=_help(T, "save_steps"))
            with gr.Row():
                f["train.seed"] = gr.Number(d.train.seed, precision=0, label="Seed", info=_help(T, "seed"))
                f["train.gradient_checkpointing"] = gr.Radio(GC_CHOICES, value=d.train.gradient_checkpointing, label="Gradient checkpointing",
                                                             info="~30% slower steps, far less activation memory.")
            with gr.Accordion("More", open=False):
                with gr.Row():
                    f["model.dtype"] = gr.Dropdown(list(cfgmod.DTYPES), value=d.model.dtype, label="Compute dtype",
                                                   info=_help(M, "dtype"))
                    f["lora.bias"] = gr.Dropdown(list(cfgmod.LORA_BIAS), value=d.lora.bias, label="Bias",
                                                 info=_help(L, "bias"))
                    f["lora.modules_to_save"] = gr.Textbox(", ".join(d.lora.modules_to_save or []),
                                                           label="Modules trained in full", placeholder="e.g. lm_head",
                                                           info=_help(L, "modules_to_save"))
                with gr.Row():
                    f["train.weight_decay"] = gr.Number(d.train.weight_decay, label="Weight decay",
                                                        info=_help(T, "weight_decay"))
                    f["train.logging_steps"] = gr.Number(d.train.logging_steps, precision=0, label="Log every N steps",
                                                         info=_help(T, "logging_steps"))
                    f["train.save_total_limit"] = gr.Number(d.train.save_total_limit, precision=0,
                                                            label="Checkpoints kept", info=_help(T, "save_total_limit"))
                with gr.Row():
                    f["train.report_to"] = gr.CheckboxGroup(
                        [t for t in trackers.TRACKERS if t != "none"], value=d.train.report_to,
                        label="Experiment trackers", info=_help(T, "report_to") + " The Train tab shows the command "
                        "that opens each dashboard. wandb and mlflow log with this machine's own settings, so only "
                        "the owner at the machine may pick them.")
    gr.Markdown("### Reproduce from the command line")
    show_config = gr.Button("Show config (YAML + CLI)", variant="secondary")
    with gr.Row():
        yaml_code = gr.Code(language="yaml", label="run.yaml", interactive=False, visible=False, max_lines=22)
        cli_code = gr.Code(language="shell", label="Equivalent CLI", interactive=False, visible=False, max_lines=22)
    gr.HTML(help_md("Save the YAML as run.yaml and run the first command, or use the flags form directly."))
    tab = SettingsTab(f, preset, preset_notes, model_note, estimate_box, show_config, yaml_code, cli_code)
    tab.timing = time_box
    return tab


# --- widgets <-> RunConfig ----------------------------------------------------------------------

def config_from_values(keys: list[str], values: list[Any], all_targets: list[str] | None = None,
                       preset_name: str | None = None) -> cfgmod.RunConfig:
    """The RunConfig for these widget values; config.from_dict's checks raise the UserErrors."""
    data: dict[str, Any] = {}
    for key, value in zip(keys, values):
        section, name = key.split(".", 1)
        if key == "lora.target_modules":
            value = list(value or [])
            if all_targets and value and set(value) == set(all_targets):
                value = "all-linear"
        elif key == "train.eval_steps":
            value = None if not value else value
        elif key == "lora.modules_to_save":
            value = [m.strip() for m in (value or "").split(",") if m.strip()] or None
        elif key == "data.mapping":
            value = dict(value or {})
        elif value is None and key not in ("train.eval_steps",):
            raise UserError(f"{key} is empty; give it a value.")
        data.setdefault(section, {})[name] = value
    data["preset"] = preset_name if preset_name and preset_name != NO_PRESET else None
    return cfgmod.from_dict(data)


def values_from_config(config: cfgmod.RunConfig, keys: list[str], all_targets: list[str]) -> list[Any]:
    out = []
    for key in keys:
        section, name = key.split(".", 1)
        value = getattr(getattr(config, section), name)
        if key == "lora.target_modules":
            value = (list(all_targets) if value == "all-linear"
                     else [v for v in value if v in all_targets or v == "embed_tokens"])
        elif key == "train.eval_steps":
            value = value or 0
        elif key == "lora.modules_to_save":
            value = ", ".join(value or [])
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
    cuda = models.cuda_available()
    liger = options.liger_installed()
    # The trainer's own plan (checkpointed layers for the budget, Liger) counted by the one memory model.
    gpu = options.planned_memory(info.config, config, "cuda", liger_installed=liger, trainable_params=trainable,
                                 gpu_memory_gb=models.gpu_memory_gb() if cuda else None)
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
    lines.append(help_md(f"Layer sizes from {info.source} of {info.name}."))
    return "\n".join(lines)


# --- events ---------------------------------------------------------------------------------------

def wire(tab: SettingsTab, state: AppState, demo: gr.Blocks) -> None:
    keys = list(tab.fields)
    widgets = [tab.fields[k] for k in keys]
    targets = tab.fields["lora.target_modules"]
    slices = tab.fields["lora.fused_slices"]

    @user_errors
    @guarded(state)
    def on_model(who: Requester, name: str, current: list[str], chosen: list[str]) -> tuple[Any, Any, str]:
        check_model(state, who, name)
        info = models.model_info(name)
        keep = [c for c in (current or []) if c in info.targets]
        return (gr.update(choices=info.targets, value=keep if keep and len(keep) < len(current or [1, 1])
                          else info.linear_names),
                gr.update(visible=info.fused, value=(chosen or []) if info.fused else []),
                f"Default here: **{state.default_name}**, because {state.default_reason}. "
                f"Selected: **{info.name}** ({len(info.linear_names)} kinds of Linear layer: "
                f"{', '.join(info.linear_names)}).")

    @guarded(state)
    def on_change(who: Requester, *values: Any) -> tuple[str, Any]:
        *vals, preset_name = values
        try:
            check_model(state, who, vals[keys.index("model.name")])
            info = models.model_info(vals[keys.index("model.name")])
            config = config_from_values(keys, vals, info.linear_names, preset_name)
        except UserError as exc:
            return notice("error", exc.message + (f" {exc.hint}" if exc.hint else "")), gr.skip()
        # An edit that leaves the preset's values makes the run custom: the radio must not claim the preset.
        still = preset_name == NO_PRESET or preset_matches(config, preset_name)
        return estimate_html(config, info), gr.skip() if still else gr.update(value=NO_PRESET)

    @user_errors
    @guarded(state)
    def on_preset(who: Requester, name: str, *values: Any) -> list[Any]:
        check_model(state, who, values[keys.index("model.name")])
        if name == NO_PRESET:
            return [gr.skip()] * len(keys) + [""]
        info = models.model_info(values[keys.index("model.name")])
        try:
            base = config_from_values(keys, list(values), info.linear_names)
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
        vals[keys.index("lora.fused_slices")] = gr.update(value=vals[keys.index("lora.fused_slices")] if info.fused
                                                          else [], visible=info.fused)
        vals[keys.index("lora.target_modules")] = gr.update(choices=info.targets,
                                                             value=vals[keys.index("lora.target_modules")])
        return vals + ["\n".join(notes) or notice("ok", f"Preset {name} applied.")]

    tab.on_change = on_change
    tab.keys = keys
    tab.fields["model.name"].change(on_model, [tab.fields["model.name"], targets, slices], [targets, slices, tab.model_note],
                                    api_name="model_layers")
    gr.on([w.change for w in widgets], on_change, widgets + [tab.preset], [tab.estimate, tab.preset],
          api_name="estimate",
          show_progress="hidden", trigger_mode="always_last")
    tab.preset.select(on_preset, [tab.preset] + widgets, widgets + [tab.preset_notes], api_name="apply_preset")
