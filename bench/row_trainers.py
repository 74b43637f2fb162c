"""The trainer a recipe or engine row times: the cookbook's recipe (trl's SFTTrainer handed peft_config, as the
Phi-3 model card's sample_finetune.py; on the GPU and on the CPU) and the engine (`phi3_lora.train.build`); and a
row's patches of module attributes. Unsloth's trainer is built in its own process (bench/peer_unsloth.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from bench.row_sets import LEARNING_RATE, Row


def run_recipe(row: Row, model_dir: Path, data: Path, steps: int, out_dir: Path) -> tuple[dict, dict]:
    """sample_finetune.py's SFTTrainer set-up, with QLoRA NF4 and SDPA (learning rate: LEARNING_RATE)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if row.four_bit else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 quantization_config=quant, device_map={"": 0})
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.unk_token
    tok.padding_side = "right"
    args = SFTConfig(output_dir=str(out_dir), bf16=True, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                     max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                     warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     max_length=2048, packing=row.packing, use_liger_kernel=row.liger, disable_tqdm=True)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear", modules_to_save=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data))["train"],
                         processing_class=tok, peft_config=peft)
    return trainer, {"packing": row.packing, "liger": row.liger, "gradient_checkpointing": "all"}


def run_engine(row: Row, model_dir: Path, data: Path, steps: int, out_dir: Path) -> tuple[Any, dict]:
    from phi3_lora import train
    from phi3_lora.config import RunConfig

    cfg = RunConfig().replace(
        model={"name": str(model_dir), "load_in_4bit": row.four_bit, **row.overrides.get("model", {})},
        lora={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
              **row.overrides.get("lora", {})},
        train={"max_steps": steps, "max_length": 2048, "per_device_train_batch_size": 4,
               "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant", "save_steps": 10**6,
               "logging_steps": 1, "memory_budget_gb": row.budget_gb, "seed": 0, "warmup_ratio": 0.0,
               "assistant_only_loss": False,  # the recipe trains on every token: the same loss on both sides
               **row.overrides.get("train", {})},
        data={"source": str(data), "eval_fraction": 0.0})
    built = train.build(cfg, out_dir)
    opts = dict(vars(built.opts))
    import torch

    if torch.cuda.is_available():  # which SDPA kernels this process may use, in order (cuDNN first or not)
        opts["sdpa_order"] = [int(b) for b in torch._C._get_sdp_priority_order()]
    return built.trainer, opts


def patched(patch: dict[str, Any]) -> contextlib.ExitStack:
    """Set module attributes ("package.module.NAME": value) for the duration, then put the old values back."""
    from unittest import mock

    stack = contextlib.ExitStack()
    for target, value in patch.items():
        stack.enter_context(mock.patch(target, value))
    return stack


def engine_patch(pairs: list[str] | None) -> dict[str, Any]:
    """--engine-patch's NAME=VALUE pairs (VALUE as JSON: true, 0.5, "x"; else the string) as a patch (pure)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def cpu_recipe_trainer(model_name: str, data: Path, steps: int, out_dir: Path, batch: int, length: int,
                       lora: Any, dtype_name: str = "bfloat16") -> Any:
    """The plain trl recipe on the CPU: the model in `dtype_name` (the cookbook's bf16, or the dtype the engine
    picked for this CPU, so the ratio measures the engine's techniques and not the dtype), peft_config handed to
    SFTTrainer, gradient checkpointing as the cookbook sets it, and the quick-cpu preset's batch, length and LoRA."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from phi3_lora import models

    path = models.local_path(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name))
    tok = models.load_tokenizer(model_name)
    args = SFTConfig(output_dir=str(out_dir), bf16=dtype_name == "bfloat16", use_cpu=True, learning_rate=LEARNING_RATE,
                     lr_scheduler_type="constant", max_steps=steps, per_device_train_batch_size=batch,
                     gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                     logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=length,
                     packing=False, disable_tqdm=True)
    peft = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules="all-linear")
    return SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data))["train"],
                      processing_class=tok, peft_config=peft)
