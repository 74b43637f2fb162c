"""Named starting points (the Phi-3 cookbook's recipe, a quick CPU run, a quality GPU run) and advice about a
config that is valid but probably not what the user wants."""

from __future__ import annotations

import math
from typing import Any

from phi3_lora.config.schema import RunConfig
from phi3_lora.errors import UserError

PRESET_NAMES = ("cookbook", "quick-cpu", "quality-gpu")

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
