"""`RunConfig`: the single source of truth for every knob of a run.

UI widgets, YAML keys and CLI flags map one-to-one onto the fields below. Field names
follow the libraries they feed: `LoraSettings` uses peft's `LoraConfig` names,
`TrainSettings` uses transformers' `TrainingArguments` / trl's `SFTConfig` names, so the
Phi-3 cookbook's `training_config` / `peft_config` dicts load unchanged (`from_recipe`).

Every field has a default and a `help` text (shown by `--help`, the UI and the YAML dump).
Checks live in `__post_init__` and raise `UserError` with a message that says how to fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from phi3_lora.errors import UserError

Auto = Literal["auto"]
BoolOrAuto = Union[bool, Auto]

PRESET_NAMES = ("cookbook", "quick-cpu", "quality-gpu")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LORA_BIAS = ("none", "all", "lora_only")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
FUSED_SLICES = ("q", "k", "v", "gate", "up")
OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (our per-field docstring)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false", list: "a list",
               dict: "a mapping", type(None): "empty"}


def _matches_type(value: Any, tp: Any) -> bool:
    """Whether `value` fits the field annotation `tp` (pure; the annotations RunConfig uses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches_type(value, arg) for arg in typing.get_args(tp))
    if origin in (list, dict):
        args = typing.get_args(tp)
        if origin is list:
            return isinstance(value, list) and all(_matches_type(v, args[0]) for v in value)
        return isinstance(value, dict) and all(_matches_type(k, args[0]) and _matches_type(v, args[1])
                                               for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_words(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_words(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_words(typing.get_args(tp)[0])}"
    return _TYPE_WORDS.get(origin or tp, getattr(tp, "__name__", str(tp)))


def check_fields(section: Any) -> None:
    """The one check every field of a settings section passes, driven by the schema: the value has the field's
    type; a number is finite (NaN and infinity train garbage or crash); it lies within the bounds in the field's
    metadata (gt, ge, lt, le). Per-field rules that bounds cannot say stay in each __post_init__."""
    name = next((n for n, c in SECTIONS.items() if isinstance(section, c)), type(section).__name__)
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        value, where = getattr(section, f.name), f"{name}.{f.name}"
        if not _matches_type(value, hints[f.name]):
            raise UserError(f"{where} must be {_type_words(hints[f.name])}; got {value!r}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where} must be a finite number; got {value!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = {k: f.metadata[k] for k in ("gt", "ge", "lt", "le") if k in f.metadata}
        tests = {"gt": value > bounds.get("gt", 0), "ge": value >= bounds.get("ge", 0),
                 "lt": value < bounds.get("lt", 0), "le": value <= bounds.get("le", 0)}
        failed = [k for k in bounds if not tests[k]]
        if failed:
            words = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}
            rule = " and ".join(f"{words[k]} {bounds[k]:,}" for k in bounds)
            raise UserError(f"{where} must be {rule}; got {value!r}.")


def field_bounds(f: Any) -> tuple[float | None, float | None]:
    """(lowest, highest) a numeric field allows, from the same metadata check_fields enforces (either end may
    be exclusive: gt/lt); None where unbounded. The Settings widgets take their ranges from here."""
    m = f.metadata
    return m.get("ge", m.get("gt")), m.get("le", m.get("lt"))


def _check_auto_bool(value: Any, name: str) -> None:
    _check(value == "auto" or isinstance(value, bool), f"{name} must be true, false or \"auto\"; got {value!r}.")


@dataclass
class ModelSettings:
    """Which base model to load and how."""

    name: str = _f("auto", "Base model: 'auto' (Phi-3-mini on a GPU with Hub access, else the embedded "
                           "SmolLM2), a Hub id such as microsoft/Phi-3-mini-4k-instruct, a local folder, "
                           "or 'embedded: SmolLM2-135M-Instruct'.",
        label="Base model", widget="model")
    load_in_4bit: bool = _f(True, "QLoRA: load the frozen base weights in 4-bit NF4 (about 4x less memory, "
                                  "somewhat slower per step). False loads 16-bit weights (plain LoRA).",
        label="QLoRA: load the base in 4-bit")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type: nf4 (QLoRA paper) or fp4.",
        label="4-bit type", choices=("nf4", "fp4"), advanced=True)
    bnb_4bit_use_double_quant: bool = _f(True, "Quantise the 4-bit scales too (saves ~0.4 bit/param).",
        label="Double quantisation", advanced=True)
    dtype: str = _f("auto", "Compute dtype: auto (bfloat16 where supported, float16 on older GPUs, "
                            "bfloat16 on CPUs with native bf16 instructions, else float32), bfloat16, float16 or float32.",
        label="Compute dtype", choices=DTYPES, advanced=True)
    attn_implementation: str = _f("auto", "Attention kernel: auto (sdpa_varlen for training on CUDA when PyTorch has "
                                          "its varlen kernel, else sdpa), sdpa, sdpa_varlen (SDPA plus a varlen "
                                          "kernel for packed rows), eager, flash_attention_2, flex_attention.",
        label="Attention kernel", choices=ATTENTION, advanced=True)
    chat_template: str | None = _f(None, "Path to a Jinja chat template with {% generation %} markers; "
                                         "empty uses the model's training template.",
        label="Chat template file", advanced=True)

    def __post_init__(self) -> None:
        check_fields(self)
        _check(bool(self.name and self.name.strip()), "model.name is empty: give 'auto', a Hub id or a local folder.")
        _check(self.bnb_4bit_quant_type in ("nf4", "fp4"),
               f"model.bnb_4bit_quant_type must be nf4 or fp4; got {self.bnb_4bit_quant_type!r}.")
        _check(self.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}.")
        _check(self.attn_implementation in ATTENTION,
               f"model.attn_implementation must be one of {', '.join(ATTENTION)}; got {self.attn_implementation!r}.")


@dataclass
class LoraSettings:
    """The adapter: peft `LoraConfig` field names."""

    r: int = _f(16, "LoRA rank. Trainable parameters grow linearly with it; 8-64 is usual.",
        label="Rank r", widget="slider", ge=1, le=1024, step=1)
    lora_alpha: float = _f(32, "LoRA scaling numerator (update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA).",
                           gt=0,
        label="Alpha")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input, 0-0.5.",
        label="Dropout", widget="slider", ge=0, lt=1, step=0.01)
    target_modules: Union[str, list[str]] = _f(
        "all-linear", "Layers to adapt: 'all-linear' or a list of module names from the model "
                      "(Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj; Llama-style: q_proj, k_proj, "
                      "v_proj, o_proj, gate_proj, up_proj, down_proj; embed_tokens for the embedding).",
        label="Target modules", widget="targets")
    fused_slices: list[str] = _f([], "Adapt only these slices of Phi-3's fused layers: any of q, k, v "
                                     "(inside qkv_proj) and gate, up (inside gate_up_proj). A fused layer with "
                                     "a chosen slice is split into separate Linears and only the chosen slices "
                                     "get LoRA, replacing that layer in target_modules; other layers follow "
                                     "target_modules ([qkv_proj] + [q, v] = q and v only; all-linear + [q, v] = "
                                     "q, v, o_proj, gate_up_proj, down_proj). Empty adapts fused layers whole. "
                                     "Llama-style models: name q_proj, v_proj in target_modules instead.",
        label="Slices of fused layers (Phi-3)", widget="slices", choices=FUSED_SLICES)
    bias: str = _f("none", "Which biases train: none, all, or lora_only.",
        label="Bias", choices=LORA_BIAS, advanced=True)
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (better at low rank, ~1.5-2x slower step).",
        label="DoRA")
    use_rslora: bool = _f(False, "rsLoRA: scale by alpha/sqrt(r), which keeps high ranks stable.",
        label="rsLoRA")
    modules_to_save: list[str] | None = _f(None, "Modules trained in full and saved with the adapter "
                                                 "(e.g. lm_head). Costs memory and adapter size.",
        label="Modules trained in full", advanced=True)

    def __post_init__(self) -> None:
        check_fields(self)
        _check(self.lora_alpha > 0, f"lora.lora_alpha must be positive; got {self.lora_alpha!r}.")
        _check(self.bias in LORA_BIAS, f"lora.bias must be one of {', '.join(LORA_BIAS)}; got {self.bias!r}.")
        if isinstance(self.target_modules, str):
            _check(bool(self.target_modules.strip()), "lora.target_modules is empty: use 'all-linear' or list names.")
            if self.target_modules != "all-linear":
                self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        else:
            _check(len(self.target_modules) > 0,
                   "lora.target_modules is an empty list: pick at least one layer or use 'all-linear'.")
        bad = [s for s in self.fused_slices if s not in FUSED_SLICES]
        _check(not bad, f"lora.fused_slices has unknown slice(s) {bad}; choose from {', '.join(FUSED_SLICES)}.")


@dataclass
class TrainSettings:
    """The optimisation: transformers `TrainingArguments` / trl `SFTConfig` field names."""

    learning_rate: float = _f(2e-4, "Peak learning rate. LoRA usually wants 1e-4 to 3e-4.",
        label="Learning rate", gt=0, lt=1)
    num_train_epochs: float = _f(1.0, "Passes over the training split (ignored when max_steps > 0).", ge=0,
        label="Epochs")
    max_steps: int = _f(-1, "Stop after this many optimiser steps; -1 uses num_train_epochs.",
        label="Max steps", ge=-1)
    per_device_train_batch_size: int = _f(4, "Rows per device per step.",
        label="Batch size", ge=1)
    per_device_eval_batch_size: int = _f(4, "Rows per device per eval step.",
        label="Eval batch size", ge=1, advanced=True)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients add up before one optimiser update.",
        label="Gradient accumulation", ge=1)
    gradient_checkpointing: BoolOrAuto = _f("auto", "Recompute activations in the backward pass: ~30% slower, "
                                                    "much less memory. auto turns it on only when the memory "
                                                    "budget needs it.",
        label="Gradient checkpointing")
    max_length: int = _f(2048, "Tokens per conversation; longer ones are truncated (and counted).",
        label="Max length (tokens)", ge=16, le=131072)
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule: " + ", ".join(SCHEDULERS) + ".",
        label="Scheduler", choices=SCHEDULERS)
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming the learning rate up from 0.",
        label="Warmup ratio", widget="slider", ge=0, lt=1, step=0.01)
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA weights.", ge=0,
        label="Weight decay", advanced=True)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.",
        label="Max gradient norm", gt=0, advanced=True)
    optim: str = _f("auto", "Optimizer: auto (fused AdamW on GPU, AdamW on CPU) or any TrainingArguments.optim.",
        label="Optimizer", choices=OPTIMIZERS, custom=True, advanced=True)
    seed: int = _f(42, "Random seed for the split, the LoRA init and data order.", ge=0, lt=2**32,
        label="Seed")
    logging_steps: int = _f(1, "Log loss every N steps.",
        label="Log every N steps", ge=1, advanced=True)
    eval_steps: int | None = _f(None, "Evaluate every N steps; empty evaluates once at the end.",
        label="Eval every N steps", ge=1)
    eval_answers: bool = _f(True, "At the end of a run with an eval split, the base and the tuned model answer the "
                                  "held-out conversations (greedy, batched) and the answers are scored against the "
                                  "references (ROUGE-L, chrF, BLEU, exact match, reference loss); saved in "
                                  "runs/<id>/eval/, shown in Compare and in the model card of every export.",
        label="Score answers at the end", advanced=True)
    eval_answers_max_seconds: float = _f(300.0, "Time limit of that scoring, in seconds; rows not reached in time "
                                                "are left out (and counted).",
        label="Scoring time limit (s)", gt=0, advanced=True)
    eval_answers_max_new_tokens: int = _f(128, "Length limit of each answer in that scoring, in tokens.",
        label="Scoring answer length (tokens)", ge=1, le=4096, advanced=True)
    save_steps: int = _f(50, "Write a checkpoint every N steps (what Resume continues from).",
        label="Checkpoint every N steps", ge=1)
    save_total_limit: int = _f(2, "Keep at most this many checkpoints per run.",
        label="Checkpoints kept", ge=1, advanced=True)
    assistant_only_loss: bool = _f(True, "Train only on assistant tokens (system and user turns are masked).",
        label="Train on assistant tokens only", advanced=True)
    packing: BoolOrAuto = _f("auto", "Pack rows into full sequences without padding (padding-free). auto: on "
                                     "for CUDA with an attention path that keeps packed rows apart (sdpa_varlen, "
                                     "flash, flex), off on CPU.",
        label="Packing", advanced=True)
    use_liger_kernel: BoolOrAuto = _f("auto", "Liger Triton kernels (fused RMSNorm/RoPE/SwiGLU/cross-entropy). "
                                              "auto: on when installed and on CUDA.",
        label="Liger kernels", advanced=True)
    memory_budget_gb: float | None = _f(None, "GPU memory the run may use; empty means the whole GPU. Drives "
                                              "the automatic choices above.",
        label="GPU memory budget (GiB)", gt=0)
    fp32_upcast: BoolOrAuto = _f("auto", "QLoRA: cast norms and embeddings to float32 (peft's "
                                         "prepare_model_for_kbit_training). auto: off in bfloat16 (it only adds "
                                         "casts and memory there), on in float16/float32.",
        label="fp32 upcast (QLoRA)", advanced=True)
    lean_lora: BoolOrAuto = _f("auto", "LoRA update as one GEMM (base output + scaling * B(A(x)) through addmm) "
                                       "instead of peft's separate clone, scale and add passes, keeping the LoRA "
                                       "input without dropout's copy and mask (regenerated in the backward pass): "
                                       "the same function with less memory traffic and up to a third less "
                                       "activation memory, so fewer layers need checkpointing. auto: on; DoRA, "
                                       "LoRA bias and several adapters keep peft's forward.",
        label="Lean LoRA forward", advanced=True)
    num_processes: Union[int, Auto] = _f("auto", "Processes (GPUs) to train on; auto uses every visible GPU.",
        label="GPUs (processes)", ge=1, choices=("auto", 1, 2, 4, 8), custom=True, advanced=True)
    report_to: Union[str, list[str]] = _f([], "Experiment trackers that also log the run (transformers' report_to): any of "
                                  "tensorboard, trackio, wandb, mlflow; [] or none logs only to the run folder. "
                                  "Each needs its package installed (the error says which pip line).",
        label="Experiment trackers", widget="trackers", advanced=True)

    def __post_init__(self) -> None:
        check_fields(self)
        _check(self.num_train_epochs > 0 or self.max_steps > 0,
               "Set train.num_train_epochs > 0 or train.max_steps > 0: the run would train for zero steps.")
        _check(self.lr_scheduler_type in SCHEDULERS,
               f"train.lr_scheduler_type must be one of {', '.join(SCHEDULERS)}; got {self.lr_scheduler_type!r}.")
        for name in ("gradient_checkpointing", "packing", "use_liger_kernel", "fp32_upcast", "lean_lora"):
            _check_auto_bool(getattr(self, name), f"train.{name}")
        from phi3_lora.trackers import normalize

        self.report_to = normalize(self.report_to)


@dataclass
class DataSettings:
    """Where the conversations come from and how they are read."""

    source: str = _f("", "A .jsonl/.json/.csv/.parquet file, or a Hub dataset id (user/name).",
        label="Data source", tab="dataset")
    format: str = _f("auto", "Row format: auto, messages (OpenAI), sharegpt, alpaca or prompt_completion.",
        label="Format", choices=DATA_FORMATS, tab="dataset")
    mapping: dict[str, str] = _f({}, "Column mapping for non-standard names, e.g. {messages: dialog} or "
                                     "{prompt: question, completion: answer}; role names too, e.g. "
                                     "{role.human: user}.",
        label="Column mapping", tab="dataset")
    hub_split: str = _f("train", "Split to read from a Hub dataset.",
        label="Hub dataset split", advanced=True)
    eval_fraction: float = _f(0.1, "Share of rows held out for eval loss and the Compare tab's examples.",
        label="Eval split", widget="slider", ge=0, lt=0.9, step=0.01, tab="dataset")
    on_invalid: str = _f("drop", "Bad rows: drop (and report each) or refuse (stop on the first report).",
        label="Bad rows", choices=("drop", "refuse"), advanced=True)
    max_rows: int | None = _f(None, "Use at most this many rows (after validation); empty uses all.",
        label="Use at most N rows", ge=1, advanced=True)

    def __post_init__(self) -> None:
        check_fields(self)
        _check(self.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}; got {self.format!r}.")
        _check(self.on_invalid in ("drop", "refuse"), f"data.on_invalid must be drop or refuse; got {self.on_invalid!r}.")


SECTIONS: dict[str, type] = {"model": ModelSettings, "lora": LoraSettings, "train": TrainSettings,
                             "data": DataSettings}


@dataclass
class RunConfig:
    """One fine-tuning run: model, adapter, optimisation and data."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self)

    def replace(self, **sections: dict[str, Any]) -> "RunConfig":
        """A copy with some fields changed: `cfg.replace(train={"max_steps": 10})`."""
        data = self.to_dict()
        for section, values in sections.items():
            if section == "preset":
                data["preset"] = values
                continue
            if section not in SECTIONS:
                raise UserError(f"Unknown config section {section!r}; use one of {', '.join(SECTIONS)}.")
            data[section].update(values)
        return from_dict(data)


def help_text(cls: type, name: str) -> str:
    """The per-field docstring of `cls.name`."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Build a `RunConfig` from nested dicts (YAML); unknown keys are an error that names them."""
    data = dict(data or {})
    preset = data.pop("preset", None)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UserError(f"Unknown config section(s) {unknown}; a config has {', '.join(SECTIONS)} (and preset).")
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise UserError(f"Config section {section!r} must be a mapping of field: value; got {values!r}.")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise UserError(f"Unknown field(s) {bad} in {section!r}; valid fields: {', '.join(sorted(known))}.")
        try:
            built[section] = cls(**_coerce(cls, values))
        except TypeError as exc:  # wrong value types that dataclasses cannot take
            raise UserError(f"Bad value in {section!r}: {exc}.") from None
    return RunConfig(**built, preset=preset)


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML, CLI and form values arrive as strings or floats; turn each into its field's type (from the
    resolved annotations, typing.get_type_hints). What cannot be turned is left for check_fields to refuse."""
    hints = typing.get_type_hints(cls)
    return {key: coerce_value(value, hints[key]) for key, value in values.items()}


_EMPTY = ("", "none", "null")


def coerce_value(value: Any, tp: Any) -> Any:
    """`value` as type `tp` where it can be read as one (pure): "3" -> 3 for int, 2 -> 2.0 for float,
    "true" -> True for bool, "" -> None where None is allowed; a Union tries its members in order."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _EMPTY)):
            return None
        members = [a for a in args if a is not type(None)]
        exact = next((a for a in members if _matches_type(value, a)), None)
        if exact is not None:
            return coerce_value(value, exact)
        for member in members:
            turned = coerce_value(value, member)
            if _matches_type(turned, member):
                return turned
        return value
    if tp is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if tp is int and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if tp is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
    return value


def dump_yaml(config: RunConfig) -> str:
    """YAML with a comment line per field saying what it does (torchtune-style)."""
    lines = ["# phi3_lora run config. Every key is documented; `python -m phi3_lora train --config FILE`."]
    if config.preset:
        lines.append(f"preset: {config.preset}")
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        obj = getattr(config, section)
        for f in fields(cls):
            value = yaml.safe_dump({f.name: getattr(obj, f.name)}, default_flow_style=True, width=10_000,
                                   sort_keys=False).strip()[1:-1]
            lines.append(f"  # {f.metadata.get('help', '')}")
            lines.append(f"  {value}")
    return "\n".join(lines) + "\n"


MAX_CONFIG_BYTES = 1 << 20  # a full config is ~6 KB
MAX_CONFIG_DEPTH = 16       # sections, then a list or mapping value, with room to spare


def _check_depth(text: str) -> None:
    """Refuse deeply nested YAML from its event stream (libyaml's when installed: milliseconds), before building
    it: composing thousands of levels takes seconds in PyYAML and then overflows the recursion limit."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise RecursionError
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_yaml(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist.", hint="Check the path, or write one with "
                        "`python -m phi3_lora train --print-config > run.yaml`.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path} is too large to be a run config ({path.stat().st_size:,} bytes).")
    try:
        text = path.read_text(encoding="utf-8")
        _check_depth(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a torn write, or not a text file
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): it may have been cut short.") from None
    except RecursionError:
        raise UserError(f"{path} nests too deeply to be a run config.") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping with model/lora/train/data sections.")
    try:
        return from_dict(data)
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type that a check tripped on
        raise UserError(f"{path} has a value of the wrong type ({exc}).") from None


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(config), encoding="utf-8")


# --- presets -----------------------------------------------------------------------------------

COOKBOOK_WARNING = ("The cookbook's learning rate 5e-6 is low for LoRA (it is a full-fine-tuning value): "
                    "expect little change in a short run; 1e-4 to 2e-4 is usual for LoRA.")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Phi-3-mini model card, sample_finetune.py (training_config / peft_config), max_seq_length 2048.
    "cookbook": {
        "model": {"load_in_4bit": True},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none", "target_modules": "all-linear",
                 "modules_to_save": None, "fused_slices": []},
        "train": {"learning_rate": 5e-6, "lr_scheduler_type": "cosine", "warmup_ratio": 0.2, "num_train_epochs": 1,
                  "max_steps": -1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                  "gradient_accumulation_steps": 1, "gradient_checkpointing": True, "max_length": 2048, "seed": 0,
                  "logging_steps": 20, "save_steps": 100, "save_total_limit": 1},
    },
    # A few minutes on a 2-core CPU with the embedded 135M model.
    "quick-cpu": {
        "model": {"name": "embedded: SmolLM2-135M-Instruct", "load_in_4bit": False},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "train": {"learning_rate": 1e-3, "lr_scheduler_type": "constant_with_warmup", "warmup_ratio": 0.05,
                  "num_train_epochs": 3, "max_steps": -1, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "max_length": 256,
                  "logging_steps": 1, "save_steps": 25, "save_total_limit": 2, "seed": 42},
    },
    # Phi-3-mini QLoRA on a 24 GB GPU: higher rank, a LoRA learning rate, packing.
    "quality-gpu": {
        "model": {"load_in_4bit": True},
        "lora": {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": "all-linear",
                 "use_rslora": False},
        "train": {"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "num_train_epochs": 2,
                  "max_steps": -1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                  "gradient_checkpointing": "auto", "max_length": 2048, "packing": "auto",
                  "use_liger_kernel": "auto", "save_steps": 100, "save_total_limit": 2, "seed": 42},
    },
}


def preset(name: str, base: RunConfig | None = None) -> RunConfig:
    """`base` (or the defaults) with the named preset's values applied."""
    if name not in PRESETS:
        raise UserError(f"Unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}.")
    cfg = (base or RunConfig()).replace(**PRESETS[name])
    cfg.preset = name
    return cfg


def preset_warnings(config: RunConfig) -> list[str]:
    """Advice about a config that is valid but probably not what the user wants."""
    notes = []
    if config.train.learning_rate <= 1e-5:
        notes.append(COOKBOOK_WARNING if math.isclose(config.train.learning_rate, 5e-6)
                     else f"learning_rate {config.train.learning_rate:g} is low for LoRA; 1e-4 to 2e-4 is usual.")
    if config.lora.lora_alpha / config.lora.r > 8 and not config.lora.use_rslora:
        notes.append("lora_alpha / r is above 8: updates are scaled up a lot; consider a lower alpha or rsLoRA.")
    return notes


# --- the Phi-3 cookbook's dicts ------------------------------------------------------------------

# Keys of the recipe's dicts that have no effect here, and why; each one is reported as a warning.
_RECIPE_IGNORED = {
    "log_level": "the run log is always written",
    "logging_strategy": "logging is by steps (train.logging_steps)",
    "output_dir": "each run writes to runs/<id>/",
    "overwrite_output_dir": "runs never overwrite each other",
    "remove_unused_columns": "handled by the trainer",
    "gradient_checkpointing_kwargs": "non-reentrant checkpointing is always used",
    "task_type": "always CAUSAL_LM",
    "save_strategy": "saving is by steps (train.save_steps)",
    "eval_strategy": "eval is by steps (train.eval_steps)",
    "evaluation_strategy": "eval is by steps (train.eval_steps)",
}
_RECIPE_RENAMED = {"max_seq_length": "max_length"}


@dataclass(frozen=True)
class Hardware:
    """What the recipe's precision flags are checked against."""

    cuda: bool
    cuda_bf16: bool = False     # the GPU computes in bfloat16
    cpu_native_bf16: bool = False  # the CPU has avx512_bf16 / amx (else bf16 is emulated, slowly)


def recipe_dtype(bf16: Any, fp16: Any, hw: Hardware) -> tuple[str, list[str]]:
    """model.dtype for the recipe's bf16 / fp16 flags on this hardware, and a warning for each flag that cannot be
    honoured as written (pure). Neither flag given: auto. Both false: float32 (as TrainingArguments would)."""
    if bf16 is None and fp16 is None:
        return "auto", []
    if bf16 and fp16:
        raise UserError("training_config sets both bf16 and fp16 to true; pick one.")
    if bf16:
        if hw.cuda and not hw.cuda_bf16:
            return "float16", ["training_config['bf16'] replaced: this GPU has no bfloat16, so the run trains in "
                               "float16 (model.dtype=float16)."]
        if not hw.cuda and not hw.cpu_native_bf16:
            return "bfloat16", ["training_config['bf16'] honoured, but this CPU has no native bfloat16 "
                                "(avx512_bf16/amx): it is emulated and about 3x slower than float32; drop bf16 for "
                                "speed."]
        return "bfloat16", []
    if fp16:
        if not hw.cuda:
            return "float32", ["training_config['fp16'] replaced: float16 mixed precision needs a CUDA GPU and this "
                               "machine has none, so the run trains in float32 (model.dtype=float32)."]
        return "float16", []
    return "float32", []


def from_recipe(training_config: dict[str, Any], peft_config: dict[str, Any], *,
                max_seq_length: int | None = 2048, model: str | dict[str, Any] = "auto",
                data: dict[str, Any] | None = None, hardware: Hardware | None = None) -> tuple[RunConfig, list[str]]:
    """Load the cookbook's `training_config` and `peft_config` dicts unchanged.

    Returns the config and one warning per recipe key that is ignored or replaced here (with why).
    `bf16` / `fp16` set model.dtype where `hardware` (`models.detect_hardware()`: this machine) can, and need it; `do_eval: False` means no held-out
    split unless `data` sets eval_fraction. `max_seq_length` is the SFTTrainer argument of the recipe (2048 in
    sample_finetune.py).
    """
    train_names = {f.name for f in fields(TrainSettings)}
    lora_names = {f.name for f in fields(LoraSettings)}
    train: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    notes: list[str] = []
    precision: dict[str, Any] = {}
    do_eval: Any = None
    for key, value in training_config.items():
        key = _RECIPE_RENAMED.get(key, key)
        if key in train_names:
            train[key] = value
        elif key in ("bf16", "fp16"):
            precision[key] = bool(value)
        elif key == "do_eval":
            do_eval = bool(value)
        elif key in _RECIPE_IGNORED:
            notes.append(f"training_config[{key!r}] ignored: {_RECIPE_IGNORED[key]}.")
        else:
            raise UserError(f"training_config key {key!r} is not supported; supported keys: "
                            f"{', '.join(sorted(train_names | set(_RECIPE_IGNORED) | {'bf16', 'fp16', 'do_eval'}))}.")
    for key, value in peft_config.items():
        if key in lora_names:
            lora[key] = value
        elif key in _RECIPE_IGNORED:
            notes.append(f"peft_config[{key!r}] ignored: {_RECIPE_IGNORED[key]}.")
        else:
            raise UserError(f"peft_config key {key!r} is not supported; supported keys: "
                            f"{', '.join(sorted(lora_names | {'task_type'}))}.")
    if max_seq_length is not None and "max_length" not in train:
        train["max_length"] = max_seq_length
    if "gradient_checkpointing" not in train:
        train["gradient_checkpointing"] = False
    model_section = {"name": model} if isinstance(model, str) else dict(model)
    if precision:
        if hardware is None:  # config stays free of torch: the caller probes the machine (models.detect_hardware)
            raise TypeError("from_recipe needs hardware= when the recipe sets bf16 or fp16")
        dtype, dtype_notes = recipe_dtype(precision.get("bf16"), precision.get("fp16"), hardware)
        if "dtype" in model_section:
            notes.append(f"training_config[{', '.join(map(repr, precision))}] ignored: model.dtype="
                         f"{model_section['dtype']} is given.")
        else:
            model_section["dtype"] = dtype
            notes.extend(dtype_notes)
    data_section = dict(data or {})
    if do_eval is False:
        if "eval_fraction" in data_section:
            notes.append(f"training_config['do_eval'] = False ignored: data.eval_fraction="
                         f"{data_section['eval_fraction']} is given, so that share is held out and evaluated.")
        else:
            data_section["eval_fraction"] = 0.0
    cfg = from_dict({"model": model_section, "lora": lora, "train": train, "data": data_section})
    return cfg, notes
