"""The LoRA guide's workflow as a small Python API, on peft (no second LoRA implementation).

loralib (microsoft/LoRA)                         phi3_lora
-----------------------------------------------  ------------------------------------------------------------
swap layers for lora.Linear / MergedLinear(      add_lora(base, {"r": 16, "target_modules": ["qkv_proj"],
  enable_lora=[True, False, True])                            "fused_slices": ["q", "v"]})
lora.mark_only_lora_as_trainable(model, bias)    the same call: peft freezes the rest (bias none/all/lora_only)
the training loop                                finetune(training_config, peft_config, data=..., model=...)
torch.save(lora.lora_state_dict(model), path)    save_lora_state_dict(model, path)  (safetensors, + its config)
load_state_dict(pretrained, strict=False),       base = load_base(name)
load_state_dict(lora_ckpt, strict=False)         model = load_lora(base, path)

Saved LoRA files are safetensors whose metadata holds the peft LoraConfig, so `load_lora` rebuilds the
LoRA layers (and splits fused layers for a fused-slice adapter) before loading the weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from phi3_lora.errors import UserError
from phi3_lora.runs import default_runs_dir, temporary_of

log = logging.getLogger(__name__)
CONFIG_KEY = "peft_config"  # safetensors metadata key holding the LoraConfig as JSON


def finetune(training_config: dict[str, Any], peft_config: dict[str, Any], *, data: str | dict[str, Any],
             model: str | dict[str, Any] = "auto", run_dir: str | Path | None = None,
             max_seq_length: int | None = 2048) -> Any:
    """Train with the recipe's two dicts (config.from_recipe) and return train.run's TrainResult.

    `data` is a file / Hub id or a DataSettings dict; `model` a name or a ModelSettings dict (a name
    loads 4-bit QLoRA only when a CUDA GPU is present). Writes the run under `run_dir` (default runs/guide-<time>).
    """
    from phi3_lora import config, models, train

    model_section = ({"name": model, "load_in_4bit": models.cuda_available()} if isinstance(model, str)
                     else dict(model))
    data_section = {"source": str(data)} if isinstance(data, (str, Path)) else dict(data)
    cfg, notes = config.from_recipe(training_config, peft_config, max_seq_length=max_seq_length,
                                    model=model_section, data=data_section, hardware=models.detect_hardware())
    for note in notes:  # also in the run's train.log and events (train.run)
        warnings.warn(note, RecipeWarning, stacklevel=2)
    run_dir = Path(run_dir) if run_dir else default_runs_dir() / time.strftime("guide-%Y%m%d-%H%M%S")
    return train.run(cfg, run_dir, notes=notes)


class RecipeWarning(UserWarning):
    """A key of the cookbook's dicts that phi3_lora ignores or replaces (the message says why)."""


def load_base(name: str = "auto", *, load_in_4bit: bool | None = None, dtype: str = "auto") -> Any:
    """The pretrained model (step one of two-step loading); 4-bit by default only on a CUDA GPU."""
    from phi3_lora import models
    from phi3_lora.config import ModelSettings

    four_bit = models.cuda_available() if load_in_4bit is None else load_in_4bit
    return models.load_model(ModelSettings(name=name, load_in_4bit=four_bit, dtype=dtype))


def _lora_settings(peft_config: Any) -> Any:
    from phi3_lora.config import LoraSettings, from_recipe

    if isinstance(peft_config, LoraSettings):
        return peft_config
    return from_recipe({}, dict(peft_config), max_seq_length=None)[0].lora


def add_lora(model: Any, peft_config: Any) -> Any:
    """Put fresh LoRA layers on `model` and freeze everything else (loralib's layer swap + mark_only_lora_as_trainable).

    `peft_config` is the recipe's dict or a LoraSettings; `fused_slices` splits Phi-3's fused layers first.
    """
    from peft import get_peft_model

    from phi3_lora.config import RunConfig
    from phi3_lora.lora_attach import lora_config, ready_for_lora

    lora = _lora_settings(peft_config)
    plan = ready_for_lora(model, lora)
    return get_peft_model(model, lora_config(RunConfig(lora=lora), plan.targets))


def lora_state_dict(model: Any) -> dict[str, Any]:
    """Only the adapter's tensors (LoRA A/B, DoRA magnitudes, trained biases, modules_to_save), as peft saves them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_lora_state_dict(model: Any, path: str | Path) -> Path:
    """Write `lora_state_dict(model)` to a .safetensors file (atomically), with the LoraConfig in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    cfg = model.peft_config[model.active_adapter].to_dict()
    meta = {CONFIG_KEY: json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)),
            "format": "pt"}
    tmp = temporary_of(path)
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_lora(base: Any, path: str | Path, *, is_trainable: bool = False) -> Any:
    """Attach saved LoRA weights to a loaded base (the strict=False step): a .safetensors file from
    `save_lora_state_dict` or an adapter folder (a run's adapter/ or checkpoint). Fused layers are split first
    when the adapter was trained on slices. Keys that match nothing are a UserError, never silently dropped."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from phi3_lora import fused

    path = Path(path)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"{path} holds no adapter (adapter_config.json is missing).",
                            hint="Give a run's adapter/ folder, a checkpoint, or a file from save_lora_state_dict.")
        fused.prepare_base(base, path)
        return PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)
    if not path.is_file() or path.suffix != ".safetensors":
        raise UserError(f"{path} is not a .safetensors LoRA file or an adapter folder.",
                        hint="Save one with phi3_lora.save_lora_state_dict(model, 'lora.safetensors').")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise UserError(f"{path} has no LoRA config in its metadata, so its layers cannot be rebuilt.",
                        hint="Save it with phi3_lora.save_lora_state_dict, or load an adapter folder.")
    state = load_file(str(path))
    fused.prepare_base(base, state)
    cfg = json.loads(meta[CONFIG_KEY])
    config = LoraConfig.from_peft_type(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__})
    model = get_peft_model(base, config)
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(f"{path} does not fit this base model: {len(result.unexpected_keys)} unexpected and "
                        f"{len(missing)} missing LoRA tensors (e.g. {(result.unexpected_keys or missing)[0]}).",
                        hint="Load the base model the adapter was trained on.")
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model
