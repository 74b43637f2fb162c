"""The Phi-3 cookbook's `training_config` / `peft_config` dicts (sample_finetune.py), loaded unchanged into a
RunConfig: the keys that mean nothing here are reported with why, bf16 / fp16 are checked against the hardware."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from phi3_lora.config.schema import LoraSettings, RunConfig, TrainSettings, from_dict
from phi3_lora.errors import UserError

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
