"""A base model wrapped with a fresh LoRA adapter for training: peft's LoraConfig from our LoraSettings, the base
readied for it (Phi-3's fused layers split so peft sees q/k/v, 4-bit weights kept in bitsandbytes' trainable
layout), kbit preparation or input grads for checkpointing, and our leaner LoRA forward. The trainer and the
guide's recipe API build their adapters here."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from phi3_lora.config import LoraSettings, RunConfig
from phi3_lora.options import ResolvedOptions

if TYPE_CHECKING:  # targets imports torch, which importing this module does not
    from phi3_lora.targets import LoraPlan


def lora_config(config: RunConfig, target_modules: list[str]) -> Any:
    """peft's LoraConfig from LoraSettings, field by name (the names are peft's), with the resolved targets."""
    import dataclasses

    from peft import LoraConfig

    accepted = {f.name for f in dataclasses.fields(LoraConfig)}
    by_name = {f.name: getattr(config.lora, f.name) for f in dataclasses.fields(config.lora) if f.name in accepted}
    return LoraConfig(**{**by_name, "target_modules": target_modules, "task_type": "CAUSAL_LM"})


def ready_for_lora(model: Any, lora: LoraSettings) -> LoraPlan:
    """Ready a base model for fresh LoRA layers; the targets plan (peft's target names). lora.fused_slices splits
    Phi-3's fused layers so peft sees q/k/v, and 4-bit weights stay out of bitsandbytes' CPU inference layout,
    which has no backward. Shared by the trainer and the guide's recipe API."""
    from phi3_lora import fused, targets
    from phi3_lora.speed import bnb_codes

    plan = targets.plan(model, lora)
    fused.split_fused_layers(model, plan.split)
    bnb_codes.keep_standard_layout(model)
    return plan


def attach_lora(model: Any, config: RunConfig, opts: ResolvedOptions) -> Any:
    """Wrap the base model with a fresh LoRA adapter (peft), preparing 4-bit weights for training."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    plan = ready_for_lora(model, config.lora)
    four_bit = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
    if four_bit and opts.fp32_upcast:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=opts.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif opts.gradient_checkpointing:
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(config, plan.targets))
    # peft saves the whole base embedding matrix with every adapter whose targets name an embedding ("auto"),
    # in case the vocabulary was resized; we never resize, and LoRA on embed_tokens keeps the base matrix frozen,
    # so the adapter needs only its A/B (SmolLM2: 55.5 MB -> a few hundred kB). Trainer's checkpoints call
    # save_pretrained without the flag, hence the default set on this instance.
    peft_model.save_pretrained = functools.partial(type(peft_model).save_pretrained, peft_model,
                                                   save_embedding_layers=False)
    if opts.lean_lora:
        from phi3_lora.speed import lean_lora

        lean_lora.install(peft_model, save_dropout_memory=opts.save_dropout_memory)
    return peft_model
