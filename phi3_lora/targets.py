"""Which layers of a model LoRA can adapt, checked against the model's own names, and how many parameters
that trains (pure: looks only at module names and shapes; a 4-bit model is counted from its config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from phi3_lora import families, fused
from phi3_lora.config import LoraSettings
from phi3_lora.errors import UserError


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _linear_paths(model: nn.Module) -> list[str]:
    """Full paths of Linear layers (bitsandbytes Linear4bit/8bitLt subclass nn.Linear), head excluded."""
    head = _output_head(model)
    paths = []
    for path, module in model.named_modules():
        parts = path.split(".")
        if not isinstance(module, nn.Linear) or module is head or any(p.startswith("lora_") for p in parts):
            continue
        path = ".".join(p for p in parts if p != "base_layer")  # a LoRA-wrapped layer keeps its name
        if path.rsplit(".", 1)[-1] != "lm_head":
            paths.append(path)
    return paths


def linear_module_names(model: nn.Module) -> list[str]:
    """Unique leaf names of the model's Linear layers, in model order, without the output head."""
    return list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in _linear_paths(model)))


def _embedding_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Embedding)))


def resolve_target_modules(model: nn.Module, target: str | list[str]) -> list[str]:
    """'all-linear' -> every Linear leaf name; a list is checked against the model's own names."""
    linear = linear_module_names(model)
    if target == "all-linear":
        return linear
    names = [target] if isinstance(target, str) else list(target)
    valid = linear + _embedding_names(model)
    paths = set(_linear_paths(model)) | {p for p, m in model.named_modules() if isinstance(m, nn.Embedding)}
    bad = [n for n in names if n not in valid and not any(p.endswith("." + n) or p == n for p in paths)]
    if bad:
        family = families.family_of(model)
        hints = [family.hints[b] for b in bad if b in family.hints]
        if any(b.rsplit(".", 1)[-1] == "lm_head" for b in bad):
            hints.append("The output head is not a LoRA target here; use lora.modules_to_save: [lm_head] to train it.")
        raise UserError(f"lora.target_modules has name(s) this model does not have: {', '.join(bad)}. "
                        f"Valid: {', '.join(valid)} (or 'all-linear').", hint=" ".join(dict.fromkeys(hints)) or None)
    return names


# --- which layers to split and what peft targets --------------------------------------------------

@dataclass(frozen=True)
class LoraPlan:
    targets: list[str]        # peft target_modules (slice children named q_proj, v_proj, ...)
    split: tuple[str, ...]    # fused leaf names to split before get_peft_model


def fused_names(model: nn.Module) -> list[str]:
    """Fused leaf names this model has, whole (Linear) or already split (FusedSlices)."""
    layout = families.family_of(model).fused
    found = []
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in layout and isinstance(module, (nn.Linear, fused.FusedSlices)) and leaf not in found:
            found.append(leaf)
    return found


def check_modules_to_save(model: nn.Module, names: list[str] | None) -> None:
    """Each lora.modules_to_save name must match a module of this model (peft would otherwise save nothing or
    fail late, inside the training process)."""
    paths = [p for p, _ in model.named_modules() if p]
    bad = [n for n in names or [] if not any(_matches(p, [n]) for p in paths)]
    if bad:
        heads = [n for n in ("lm_head", "embed_tokens") if any(_matches(p, [n]) for p in paths)]
        raise UserError(f"lora.modules_to_save has name(s) this model does not have: {', '.join(bad)}.",
                        hint=f"Use module names of the model{' such as ' + ', '.join(heads) if heads else ''}.")


def plan(model: nn.Module, lora: LoraSettings) -> LoraPlan:
    """peft's target names and the fused layers to split (see phi3_lora.fused) for `lora` on `model`."""
    check_modules_to_save(model, lora.modules_to_save)
    base = resolve_target_modules(model, lora.target_modules)
    if not lora.fused_slices:
        return LoraPlan(list(base), ())
    family = families.family_of(model)
    have = fused_names(model)
    wanted = {s: family.fused_group(s) for s in lora.fused_slices}
    missing = [s for s, g in wanted.items() if g is None or g not in have]
    if missing:
        kind = getattr(getattr(model, "config", None), "model_type", "this model")
        layouts = families.all_fused()
        absent = dict.fromkeys(next((g for g, sl in layouts.items() if s in sl), s) for s in missing)
        names = ", ".join(families.child_name(s) for s in lora.fused_slices)
        raise UserError(f"lora.fused_slices is for models with fused layers (Phi-3's qkv_proj and gate_up_proj); "
                        f"{kind} has no {' or '.join(absent)}.",
                        hint=f"This model keeps the projections separate: put {names} in lora.target_modules "
                             f"and leave lora.fused_slices empty.")
    groups = tuple(dict.fromkeys(g for g in wanted.values() if g))
    chosen = [families.child_name(s) for g in groups for s in family.fused[g] if s in lora.fused_slices]
    targets = [t for t in base if t not in groups] + chosen
    return LoraPlan(list(dict.fromkeys(targets)), groups)


def _matches(path: str, names: list[str]) -> bool:
    """peft's rule: a target matches a module whose full name equals it or ends with '.' + it."""
    return any(path == n or path.endswith("." + n) for n in names)


@lru_cache(maxsize=4)
def _meta_model(config_json: str) -> nn.Module:
    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return AutoModelForCausalLM.from_config(config)


def count_lora_parameters(model_or_config: nn.Module | PretrainedConfig, lora: LoraSettings) -> tuple[int, int]:
    """(trainable, total) parameters that peft would report, from module shapes alone.

    Counts LoRA A/B (and DoRA magnitudes), trained biases and modules_to_save copies; total adds
    them to the base model. A 4-bit model is counted from its config (packed weights hide shapes).
    lora.fused_slices counts each chosen slice of a fused layer as its own Linear (see `plan`).
    """
    model = model_or_config
    quantized = isinstance(model, nn.Module) and getattr(model.config, "quantization_config", None) is not None
    if not isinstance(model, nn.Module) or quantized:
        config = model.config if isinstance(model, nn.Module) else model
        cfg = config.to_dict()
        cfg.pop("quantization_config", None)
        model = _meta_model(json.dumps(cfg, sort_keys=True, default=str))
    chosen = plan(model, lora)
    targets = chosen.targets
    total = sum(p.numel() for p in model.parameters())
    added = biases = extra = 0  # new LoRA weights; base biases that train (already in total); modules_to_save copies
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in chosen.split and isinstance(module, nn.Linear):  # split before peft: each chosen slice is a Linear
            for name, rows in fused.slice_sizes(model.config, leaf).items():
                if families.child_name(name) in targets:
                    added += lora.r * (module.in_features + rows) + (rows if lora.use_dora else 0)
                    if lora.bias == "lora_only" and module.bias is not None:
                        biases += rows
            continue
        if not _matches(path, targets):
            continue
        if isinstance(module, nn.Linear):
            added += (lora.r * (module.in_features + module.out_features)
                      + (module.out_features if lora.use_dora else 0))
            if lora.bias == "lora_only" and module.bias is not None:
                biases += module.bias.numel()
        elif isinstance(module, nn.Embedding):
            added += lora.r * (module.num_embeddings + module.embedding_dim) + (
                module.embedding_dim if lora.use_dora else 0)
    if lora.bias == "all":
        biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    for path, module in model.named_modules():
        if lora.modules_to_save and _matches(path, lora.modules_to_save):
            extra += sum(p.numel() for p in module.parameters())
    return added + biases + extra, total + added + extra
