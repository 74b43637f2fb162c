"""`RunConfig`: the single source of truth for every knob of a run.

UI widgets, YAML keys and CLI flags map one-to-one onto the fields below. Field names
follow the libraries they feed: `LoraSettings` uses peft's `LoraConfig` names,
`TrainSettings` uses transformers' `TrainingArguments` / trl's `SFTConfig` names, so the
Phi-3 cookbook's `training_config` / `peft_config` dicts load unchanged (`from_recipe`).

Every field has a default and a `help` text (shown by `--help`, the UI and the YAML dump), and its range and
choices in its metadata: `fields.check_fields` enforces them (the Settings widgets take them from there too).
Only rules a field's metadata cannot say stay in `__post_init__`. All raise `UserError` saying how to fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Union

from phi3_lora.config.fields import check_fields, coerce_values, require
from phi3_lora.config.fields import setting as _f
from phi3_lora.errors import UserError
from phi3_lora.formats import FORMATS

Auto = Literal["auto"]
BoolOrAuto = Union[bool, Auto]

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LORA_BIAS = ("none", "all", "lora_only")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention")
DATA_FORMATS = ("auto", *FORMATS)  # formats.py owns the row formats; auto detects one
FUSED_SLICES = ("q", "k", "v", "gate", "up")
OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")


@dataclass
class ModelSettings:
    """Which base model to load and how."""

    SECTION: ClassVar[str] = "model"  # its key in YAML, in CLI flags and in check messages

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
        require(bool(self.name and self.name.strip()), "model.name is empty: give 'auto', a Hub id or a local folder.")


@dataclass
class LoraSettings:
    """The adapter: peft `LoraConfig` field names."""

    SECTION: ClassVar[str] = "lora"  # its key in YAML, in CLI flags and in check messages

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
        if isinstance(self.target_modules, str):
            require(bool(self.target_modules.strip()), "lora.target_modules is empty: use 'all-linear' or list names.")
            if self.target_modules != "all-linear":
                self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        else:
            require(len(self.target_modules) > 0,
                   "lora.target_modules is an empty list: pick at least one layer or use 'all-linear'.")


@dataclass
class TrainSettings:
    """The optimisation: transformers `TrainingArguments` / trl `SFTConfig` field names."""

    SECTION: ClassVar[str] = "train"  # its key in YAML, in CLI flags and in check messages

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
    compile_layers: BoolOrAuto = _f("auto", "torch.compile on each decoder layer (CUDA with Triton only): fused "
                                            "kernels, about 10% faster steps on an H200 after 15-60 s of "
                                            "compiling at the first step; under a memory budget the compiler "
                                            "recomputes the cheapest parts of each layer instead of whole layers. "
                                            "auto: on where it can run. Turn it off if compiling fails on your "
                                            "GPU or the run is only a few steps long.",
        label="Compiled decoder layers", advanced=True)
    num_processes: Union[int, Auto] = _f("auto", "Processes (GPUs) to train on; auto uses every visible GPU.",
        label="GPUs (processes)", ge=1, choices=("auto", 1, 2, 4, 8), custom=True, advanced=True)
    report_to: Union[str, list[str]] = _f([], "Experiment trackers that also log the run (transformers' report_to): any of "
                                  "tensorboard, trackio, wandb, mlflow; [] or none logs only to the run folder. "
                                  "Each needs its package installed (the error says which pip line).",
        label="Experiment trackers", widget="trackers", advanced=True)

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.num_train_epochs > 0 or self.max_steps > 0,
               "Set train.num_train_epochs > 0 or train.max_steps > 0: the run would train for zero steps.")
        from phi3_lora.trackers import normalize

        self.report_to = normalize(self.report_to)


@dataclass
class DataSettings:
    """Where the conversations come from and how they are read."""

    SECTION: ClassVar[str] = "data"  # its key in YAML, in CLI flags and in check messages

    source: str = _f("", "A .jsonl/.json/.csv/.parquet file, or a Hub dataset id (user/name).",
        label="Data source", tab="dataset")
    format: str = _f("auto", "Row format: auto (detected from the rows) or " + ", ".join(FORMATS) + ".",
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
            built[section] = cls(**coerce_values(cls, values))
        except TypeError as exc:  # wrong value types that dataclasses cannot take
            raise UserError(f"Bad value in {section!r}: {exc}.") from None
    return RunConfig(**built, preset=preset)


