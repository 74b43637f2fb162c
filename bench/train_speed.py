"""Training and generation speed: the cookbook recipe vs our engine, on the same data, in one run.

    python -m bench.train_speed                 # GPU: every row, writes docs/benchmarks.md
    python -m bench.train_speed --cpu           # this machine: the embedded model, briefly
    python -m phi3_lora bench [--cpu]           # the same, through the app's CLI

GPU rows use a Phi-3-mini-shaped model with random weights (transformers Phi3Config: hidden 3072,
32 layers, 32 heads, intermediate 8192, vocab 32064) and the real Phi-3 tokenizer, so no download
is needed. Data: full rows (every row cut at 2048 tokens) and a chat-length mix (lognormal token
counts, median 300, mean 430). "Useful tokens" are non-padding tokens. MFU counts 16.2 GFLOP per
trained token (forward + input gradients of a 3.8B model at 2048 context) against 790 TFLOP/s,
the bf16 matrix rate measured on an H200.

Recipe rows build trl's SFTTrainer as the Phi-3 model card's sample_finetune.py does (peft_config
handed to the trainer, which prepares the 4-bit model itself). Engine rows build the trainer through
`phi3_lora.train.build`, the same function `python -m phi3_lora train` uses. Rows run in order in
one process: rows with Liger kernels last, since Liger patches transformers' classes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOP_PER_TOKEN = 16.2e9
PEAK_FLOPS = 790e12
GIB = 2**30
WORDS = ("the model learns a short answer from each turn of the chat while the adapter trains only a few "
         "matrices and the frozen weights stay in four bits on the card so memory is small").split()


@dataclass
class Row:
    name: str
    kind: str            # recipe | engine
    data: str            # full | mix
    four_bit: bool = True
    packing: bool = False
    liger: bool = False
    budget_gb: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # engine: extra train/model settings
    recipe_ref: str | None = None   # the recipe row this engine row is compared with
    patch: dict[str, Any] = field(default_factory=dict)  # "module.attribute": value, set for this row only


RECIPE = [
    Row("recipe QLoRA full rows", "recipe", "full"),
    Row("recipe QLoRA mix padded", "recipe", "mix"),
    Row("recipe QLoRA mix packed", "recipe", "mix", packing=True),
    Row("recipe QLoRA mix packed + Liger", "recipe", "mix", packing=True, liger=True),
    Row("recipe QLoRA full rows + Liger", "recipe", "full", liger=True),
]
ENGINE = [
    Row("engine QLoRA mix, 24 GiB", "engine", "mix", budget_gb=24, recipe_ref="recipe QLoRA mix packed"),
    Row("engine QLoRA full rows, 24 GiB", "engine", "full", budget_gb=24, recipe_ref="recipe QLoRA full rows"),
    Row("engine LoRA-16 mix, 24 GiB", "engine", "mix", four_bit=False, budget_gb=24,
        recipe_ref="recipe QLoRA mix packed"),
    Row("engine LoRA-16 full rows, 24 GiB", "engine", "full", four_bit=False, budget_gb=24,
        recipe_ref="recipe QLoRA full rows"),
    Row("engine LoRA-16 mix, whole GPU", "engine", "mix", four_bit=False, recipe_ref="recipe QLoRA mix packed"),
    Row("engine LoRA-16 full rows, whole GPU", "engine", "full", four_bit=False,
        recipe_ref="recipe QLoRA full rows"),
]
# What each technique gives: the engine with one choice turned back (no Liger rows run before Liger ones).
ABLATIONS = [
    Row("recipe QLoRA full rows (again, not first in the process)", "recipe", "full"),
    Row("ablate: engine QLoRA mix, packed sdpa mask (no varlen), no Liger", "engine", "mix", budget_gb=24,
        overrides={"model": {"attn_implementation": "sdpa"}, "train": {"packing": True, "use_liger_kernel": False}},
        recipe_ref="recipe QLoRA mix packed"),
    Row("ablate: engine QLoRA mix, varlen, no Liger", "engine", "mix", budget_gb=24,
        overrides={"train": {"use_liger_kernel": False}}, recipe_ref="recipe QLoRA mix packed"),
    Row("ablate: engine QLoRA full, all layers checkpointed, no Liger", "engine", "full",
        overrides={"train": {"gradient_checkpointing": True, "use_liger_kernel": False}},
        recipe_ref="recipe QLoRA full rows"),
    Row("ablate: engine QLoRA full, fp32 upcast, all checkpointed, no Liger", "engine", "full",
        overrides={"train": {"gradient_checkpointing": True, "use_liger_kernel": False, "fp32_upcast": True}},
        recipe_ref="recipe QLoRA full rows"),
    Row("ablate: engine QLoRA full, no checkpointing, no Liger (calibration)", "engine", "full",
        overrides={"train": {"gradient_checkpointing": False, "use_liger_kernel": False}},
        recipe_ref="recipe QLoRA full rows"),
    Row("ablate: engine QLoRA full rows, 24 GiB, peft's LoRA forward (no lean_lora)", "engine", "full", budget_gb=24,
        overrides={"train": {"lean_lora": False}}, recipe_ref="recipe QLoRA full rows"),
    Row("ablate: engine QLoRA mix, 24 GiB, peft's LoRA forward (no lean_lora)", "engine", "mix", budget_gb=24,
        overrides={"train": {"lean_lora": False}}, recipe_ref="recipe QLoRA mix packed"),
    Row("ablate: engine QLoRA full rows, whole GPU (no checkpointing)", "engine", "full",
        recipe_ref="recipe QLoRA full rows"),
    Row("ablate: engine QLoRA full rows, 24 GiB, dropout's output and mask kept (no DropoutLoraA)", "engine", "full",
        budget_gb=24, patch={"phi3_lora.lean_lora.DROPOUT_LORA_A": False}, recipe_ref="recipe QLoRA full rows"),
    Row("ablate: engine QLoRA full rows, 24 GiB, SwiGLU output kept (no remake)", "engine", "full",
        budget_gb=24, patch={"phi3_lora.lean_lora.REMAKE_INPUTS": False}, recipe_ref="recipe QLoRA full rows"),
]


# Batch split (micro-batches with gradient accumulation, same optimizer batch) instead of recomputing layers.
_FULL24 = dict(budget_gb=24, recipe_ref="recipe QLoRA full rows")
EXPLORE = [
    Row("explore: engine QLoRA full rows, all layers checkpointed", "engine", "full",
        overrides={"train": {"gradient_checkpointing": True}}, recipe_ref="recipe QLoRA full rows"),
    Row("explore: engine QLoRA full, 24 GiB, micro 2 x 2", "engine", "full", **_FULL24,
        overrides={"train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}}),
    Row("explore: engine QLoRA full, 24 GiB, micro 1 x 4", "engine", "full", **_FULL24,
        overrides={"train": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}}),
]


def named(row: Row, name: str) -> bool:
    """"=NAME" is that row only; anything else, every row whose name contains it (any case)."""
    return row.name == name[1:] if name.startswith("=") else name.lower() in row.name.lower()


def ordered_rows(names: list[str] | None, which: str | list[str] = "main") -> list[Row]:
    """Rows of the chosen sets, in run order: everything without Liger first (Liger patches transformers'
    classes for the rest of the process), then Liger recipe rows, engine rows, and the Liger-on ablations."""
    sets = {which} if isinstance(which, str) else set(which)
    if "all" in sets:
        sets |= {"main", "ablations"}
    main = "main" in sets
    ablations = (ABLATIONS if "ablations" in sets
                 else [r for r in ABLATIONS if "lean_lora" in r.name or "whole GPU" in r.name or r.patch]
                 if "lean" in sets
                 else [])
    early = [r for r in ablations if (r.kind == "recipe" and not r.liger)
             or r.overrides.get("train", {}).get("use_liger_kernel") is False]
    late = [r for r in ablations if r not in early]
    rows = (([r for r in RECIPE if not r.liger] if main else []) + early
            + ([r for r in RECIPE if r.liger] + ENGINE if main else []) + late
            + (EXPLORE if "explore" in sets else []))
    if names:
        rows = [r for r in rows if any(named(r, n) for n in names)]
    return rows


# --- data ---------------------------------------------------------------------------------------

def chat_rows(kind: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations whose Phi-3 token counts follow the wanted distribution (about 1.3 tokens a word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = 3200 if kind == "full" else min(2000, max(24, int(rng.lognormvariate(math.log(300), 0.85))))
        words = max(4, int(tokens / 1.3))
        user, answer = max(2, words * 3 // 10), max(2, words - words * 3 // 10)
        rows.append({"messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(answer))}]})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the model ----------------------------------------------------------------------------------

def make_phi3_mini(folder: Path, tokenizer_dir: Path) -> Path:
    """Random-weight Phi-3-mini (3.8B) saved as safetensors, built on the GPU in bf16 (seconds, not minutes)."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|end|>")
    config = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                        eos_token_id=[tok.eos_token_id, end], pad_token_id=tok.pad_token_id,
                        tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


# --- timing ---------------------------------------------------------------------------------------

class StepTimer:
    """Times optimizer steps (synchronised) and counts useful tokens of each forward."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.tokens, self._t, self._tok = warmup, [], [], 0.0, 0

    def pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if module.training and ids is not None:
            self._tok += int(mask.sum()) if mask is not None else ids.numel()

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                _sync()
                timer._t, timer._tok = time.perf_counter(), 0

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                _sync()
                timer.times.append(time.perf_counter() - timer._t)
                timer.tokens.append(timer._tok)

        return _CB()

    def result(self) -> dict[str, float]:
        t, n = self.times[self.warmup:], self.tokens[self.warmup:]
        return {"steps": len(t), "seconds": sum(t), "tokens": sum(n),
                "tokens_per_s": sum(n) / sum(t) if t and sum(t) > 0 else float("nan"),
                "tokens_per_step": sum(n) / max(1, len(n))}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_trainer(trainer: Any, warmup: int) -> dict[str, float]:
    import torch

    timer = StepTimer(warmup)
    trainer.add_callback(timer.callback())
    handle = trainer.model.register_forward_pre_hook(timer.pre_hook, with_kwargs=True)
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    try:
        trainer.train()
    finally:
        handle.remove()
    out = timer.result()
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        out["leftover_gib"] = base / GIB
    return out


def run_recipe(row: Row, model_dir: Path, data: Path, steps: int, out_dir: Path) -> tuple[dict, dict]:
    """sample_finetune.py's SFTTrainer set-up, with QLoRA NF4 and SDPA."""
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
    args = SFTConfig(output_dir=str(out_dir), bf16=True, learning_rate=5e-6, lr_scheduler_type="cosine",
                     max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                     warmup_steps=0.2, logging_steps=20, save_strategy="no", report_to="none", seed=0,
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
        train={"max_steps": steps, "max_length": 2048, "per_device_train_batch_size": 4, "learning_rate": 1e-4,
               "save_steps": 10**6, "logging_steps": 10**6, "memory_budget_gb": row.budget_gb, "seed": 0,
               "warmup_ratio": 0.0, **row.overrides.get("train", {})},
        data={"source": str(data), "eval_fraction": 0.0})
    built = train.build(cfg, out_dir)
    opts = dict(vars(built.opts))
    return built.trainer, opts


def patched(patch: dict[str, Any]) -> contextlib.ExitStack:
    """Set module attributes ("package.module.NAME": value) for the duration, then put the old values back."""
    from unittest import mock

    stack = contextlib.ExitStack()
    for target, value in patch.items():
        stack.enter_context(mock.patch(target, value))
    return stack


def measure(row: Row, model_dir: Path, data: dict[str, Path], steps: int, warmup: int) -> dict[str, Any]:
    _free()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, patched(row.patch):
        build = run_recipe if row.kind == "recipe" else run_engine
        trainer, opts = build(row, model_dir, data[row.data], steps + warmup, Path(tmp))
        result = time_trainer(trainer, warmup)
        del trainer
    _free()
    result.update(name=row.name, kind=row.kind, data=row.data, four_bit=row.four_bit, options=opts,
                  mfu=result["tokens_per_s"] * FLOP_PER_TOKEN / PEAK_FLOPS, wall_s=time.time() - started,
                  recipe_ref=row.recipe_ref, budget_gb=row.budget_gb)
    return result


def profile_step(row: Row, model_dir: Path, data: dict[str, Path], warmup: int, out: Path) -> str:
    """One optimizer step of `row` under torch.profiler: CUDA kernels by total time, plus a grouped summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    class _Prof(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                torch.cuda.synchronize()
                prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup + 1:
                torch.cuda.synchronize()
                prof.__exit__(None, None, None)

    _free()
    with tempfile.TemporaryDirectory() as tmp:
        build = run_recipe if row.kind == "recipe" else run_engine
        trainer, _ = build(row, model_dir, data[row.data], warmup + 1, Path(tmp))
        trainer.add_callback(_Prof())
        trainer.train()
        del trainer
    _free()
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) or 1.0
    groups: dict[str, float] = {}
    for e in events:
        key = kernel_group(e.key)
        groups[key] = groups.get(key, 0.0) + e.self_device_time_total
    lines = [f"profile of one step: {row.name}; GPU kernel time {total / 1e3:.1f} ms", "", "group | ms | share"]
    lines += [f"{k} | {v / 1e3:.1f} | {v / total:.1%}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["", prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)]
    text = "\n".join(lines)
    out.write_text(text, encoding="utf-8")
    return text


def kernel_group(name: str) -> str:
    """A coarse bucket for a CUDA kernel's name (GEMM, attention, dequantise, copies, elementwise, ...)."""
    n = name.lower()
    for key, words in (("attention", ("flash", "fmha", "attention")), ("dequant 4-bit", ("dequant",)),
                       ("dropout", ("dropout", "bernoulli")), ("optimizer", ("adam", "multi_tensor")),
                       ("copy/cast", ("copy", "memcpy", "cast")),
                       ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "fill")),
                       ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul")),
                       ("liger/triton", ("liger", "triton", "rms_norm", "swiglu", "rope"))):
        if any(w in n for w in words):
            return key
    return "other"


# --- correctness on the GPU: the packed path keeps sequences apart --------------------------------

def check_packed_gpu(model_dir: Path) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from phi3_lora import packed_attention

    packed_attention.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation=packed_attention.NAME).eval()
    torch.manual_seed(1)
    lens = [700, 1300, 48]
    seqs = [torch.randint(100, 30000, (n,), device="cuda") for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(lens), max_length_k=max(lens)).logits[0].float()
        alone = torch.cat([model(input_ids=s[None]).logits[0].float() for s in seqs])
    rel = float((packed - alone).norm() / alone.norm())
    del model
    _free()
    return {"packed_vs_alone_rel_err": rel, "max_abs": float((packed - alone).abs().max())}


def check_dropout_lora_gpu() -> dict[str, float]:
    """DropoutLoraA on CUDA in bf16 against nn.Dropout + the product it replaces, from the same RNG state:
    the forward must be equal and the gradients equal up to bf16 rounding of the dropout scale."""
    import torch

    from phi3_lora.lean_lora import DropoutLoraA

    torch.manual_seed(0)
    x = torch.randn(4, 2048, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 3072, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(4, 2048, 16, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn in (("lean", lambda a, b: DropoutLoraA.apply(a, b, 0.05, None)),
                     ("plain", lambda a, b: torch.nn.functional.dropout(a, 0.05) @ b.t())):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.manual_seed(7)
        h = fn(a, b)
        h.backward(g)
        out[name] = (h.detach(), a.grad, b.grad, torch.randn(3, device="cuda"))  # and the RNG stream after
    (h1, gx1, gw1, r1), (h2, gx2, gw2, r2) = out["lean"], out["plain"]
    rel = lambda u, v: float((u.float() - v.float()).norm() / v.float().norm())  # noqa: E731
    result = {"forward_equal": bool(torch.equal(h1, h2)), "grad_x_rel": rel(gx1, gx2), "grad_w_rel": rel(gw1, gw2),
              "rng_after_equal": bool(torch.equal(r1, r2))}
    try:  # the SwiGLU output remade from Liger's saved inputs: the same gradients, bit for bit
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        from phi3_lora.lean_lora import remake_source
    except ImportError:
        return result
    gate_up = torch.randn(1, 8192, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
    grads = {}
    for remake in (True, False):
        gu, b = gate_up.clone().requires_grad_(), wd.clone().requires_grad_()
        torch.manual_seed(7)
        c = LigerSiLUMulFunction.apply(*gu.chunk(2, dim=-1))
        source = remake_source(c) if remake else None
        if remake and source is None:
            return {**result, "remake": "not found"}
        DropoutLoraA.apply(c, b, 0.05, source).sum().backward()
        grads[remake] = (gu.grad, b.grad)
    result["remake_grads_equal"] = all(torch.equal(u, v) for u, v in zip(grads[True], grads[False]))
    return result


# --- generation -----------------------------------------------------------------------------------

def time_generation(model_name: str, adapter_dir: Path | None, load_in_4bit: bool, new_tokens: int = 128,
                    repeats: int = 2) -> list[dict[str, Any]]:
    """Tokens/s and time to first token of ChatEngine, base and tuned (adapter off/on)."""
    from phi3_lora.generate import ChatEngine, GenerationSettings

    engine = ChatEngine(model_name, adapter_dir, load_in_4bit=load_in_4bit)
    settings = GenerationSettings(temperature=0, max_new_tokens=new_tokens)
    history = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
    out = []
    sides = [("base", False)] + ([("tuned", True)] if adapter_dir else [])
    engine.answer(history, adapter=False, settings=GenerationSettings(temperature=0, max_new_tokens=4))  # warm-up
    for side, adapter in sides:
        best = None
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            first = None
            text = ""
            for text in engine.stream(history, adapter=adapter, settings=settings):
                if first is None and text:
                    first = time.perf_counter() - t0
            _sync()
            total = time.perf_counter() - t0
            n = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            r = {"side": side, "tokens": n, "seconds": total, "ttft_s": first or total,
                 "tokens_per_s": n / total if total else float("nan")}
            best = r if best is None or r["tokens_per_s"] > best["tokens_per_s"] else best
        out.append(best)
    if adapter_dir:  # the Compare tab: base and tuned answers from one generate call
        _sync()
        t0 = time.perf_counter()
        first, texts = None, ("", "")
        for texts in engine.stream_pair(history, history, settings):
            if first is None and any(texts):
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        n = sum(len(engine.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out.append({"side": "pair (base + tuned, one batch)", "tokens": n, "seconds": total,
                    "ttft_s": first or total, "tokens_per_s": n / total if total else float("nan")})
    del engine
    _free()
    return out


def save_random_adapter(model_dir: Path, out: Path, four_bit: bool) -> Path:
    """A LoRA adapter with non-zero B (as after training) for timing the tuned side."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phi3_lora import models
    from phi3_lora.config import ModelSettings

    model = models.load_model(ModelSettings(name=str(model_dir), load_in_4bit=four_bit))
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    peft.save_pretrained(out)
    del peft, model
    _free()
    return out


class _InThread:
    """`generate` run in a worker thread while the caller waits, as a streaming UI runs it."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        import threading

        result: list[Any] = []
        worker = threading.Thread(target=lambda: result.append(self.model.generate(*args, **kwargs)))
        worker.start()
        worker.join()
        return result[0]


def explore_generation(model_dir: Path, adapter_dir: Path, four_bit: bool, new_tokens: int = 128,
                       budget_s: float = 150.0) -> list[dict[str, Any]]:
    """Plain `generate` (greedy, batch 1) under the ways to make decoding faster: the default dynamic cache,
    a static cache (transformers compiles the forward by itself where it can), an explicit
    torch.compile(mode="reduce-overhead"), the adapter on (peft) and merged into 16-bit weights.
    Each variant: first call (with any compilation) and the best of two later calls."""
    import torch
    from peft import PeftModel

    from phi3_lora import models
    from phi3_lora.config import ModelSettings

    started = time.time()
    tok = models.load_tokenizer(str(model_dir))
    ids = tok("Write a short story about a lighthouse keeper and a storm.", return_tensors="pt").input_ids.cuda()
    out: list[dict[str, Any]] = []

    def timed(label: str, model: Any, **kw: Any) -> None:
        if time.time() - started > budget_s:
            out.append({"variant": label, "error": "skipped: time budget"})
            return
        try:
            times = []
            for _ in range(3):
                _sync()
                t0 = time.perf_counter()
                gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     **kw)
                _sync()
                times.append(time.perf_counter() - t0)
            n = gen.shape[1] - ids.shape[1]
            out.append({"variant": label, "tokens": n, "first_call_s": times[0],
                        "tokens_per_s": n / min(times[1:])})
        except Exception as exc:  # noqa: BLE001 - a variant that does not run is a result too
            out.append({"variant": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print("gen explore:", out[-1], flush=True)

    model = models.load_model(ModelSettings(name=str(model_dir), load_in_4bit=four_bit)).eval()
    timed("base, dynamic cache", model)
    timed("base, dynamic cache, in a worker thread (as ChatEngine streams)", _InThread(model))
    timed("base, static cache", model, cache_implementation="static")
    tuned = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    timed("tuned (peft), dynamic cache", tuned)
    timed("tuned (peft), static cache", tuned, cache_implementation="static")
    if not four_bit:
        merged = tuned.merge_and_unload()
        timed("tuned merged, dynamic cache", merged)
        model = merged
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    timed("base/merged, torch.compile reduce-overhead + static cache", model, cache_implementation="static")
    del model, tuned
    _free()
    return out


# --- CPU figures ----------------------------------------------------------------------------------

def cpu_figures(steps: int = 3) -> dict[str, Any]:
    """The embedded SmolLM2-135M on this machine: a training step and generation, briefly."""
    from phi3_lora import embedded, train
    from phi3_lora.config import preset

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset("quick-cpu").replace(train={"max_steps": steps + 1, "save_steps": 10**6,
                                                 "logging_steps": 10**6},
                                          data={"source": str(ROOT / "data" / "sample_chat.jsonl"),
                                                "eval_fraction": 0.0})
        built = train.build(cfg, Path(tmp))
        res = time_trainer(built.trainer, warmup=1)
        res["options"] = {k: v for k, v in vars(built.opts).items()}
        out["train_step"] = res
        adapter = Path(tmp) / "adapter"
        built.trainer.model.save_pretrained(adapter)
        del built
        out["generation"] = time_generation(embedded.EMBEDDED_NAME, adapter, load_in_4bit=False, new_tokens=48,
                                            repeats=1)
    return out


# --- the report -----------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    v = {"python": platform.python_version()}
    for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = "-"
    v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return v


def table(results: list[dict[str, Any]]) -> str:
    by_name = {r["name"]: r for r in results if "tokens_per_s" in r}
    lines = ["| row | useful tok/s | MFU | peak GiB (alloc / reserved) | tokens/step | vs recipe | options |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | |")
            continue
        ratios = []
        for ref in ([r["recipe_ref"]] if r.get("recipe_ref") else []) + (
                ["recipe QLoRA mix packed + Liger"] if r["data"] == "mix" and r["kind"] == "engine" else []):
            if ref in by_name:
                ratios.append(f"{r['tokens_per_s'] / by_name[ref]['tokens_per_s']:.2f}x {ref.replace('recipe ', '')}")
        o = r.get("options", {})
        opt = ", ".join(f"{k}={v}" for k, v in o.items() if k in (
            "attn_implementation", "packing", "use_liger_kernel", "gradient_checkpointing", "checkpointed_layers",
            "fp32_upcast", "liger"))
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | "
                     f"{r.get('peak_gib', 0):.1f} / {r.get('reserved_gib', 0):.1f} | {r['tokens_per_step']:,.0f} | "
                     f"{'; '.join(ratios) or '-'} | {opt} |")
    return "\n".join(lines)


def gen_table(gen: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| model | side | tokens/s | time to first token (s) | tokens |", "| --- | --- | ---: | ---: | ---: |"]
    for label, rows in gen.items():
        for g in rows:
            if "error" in g:
                lines.append(f"| {label} | failed: {g['error'][:100]} | | | |")
                continue
            lines.append(f"| {label} | {g['side']} | {g['tokens_per_s']:.1f} | {g['ttft_s']:.3f} | {g['tokens']} |")
    return "\n".join(lines)


def write_markdown(path: Path, section: str, body: str) -> None:
    """Replace (or append) one `## section` of docs/benchmarks.md."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\nWritten by `python -m bench.train_speed`.\n"
    head = f"## {section}"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body.rstrip() + "\n" + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    path.write_text(text, encoding="utf-8")


def gpu_main(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer)
    model_dir = make_phi3_mini(work / "phi3-mini-random", tok_dir)
    data = {"full": write_jsonl(chat_rows("full", 256), work / "full.jsonl"),
            "mix": write_jsonl(chat_rows("mix", 4096), work / "mix.jsonl")}
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "rows": [], "gen": {}}
    log = Path(args.json)

    def dump() -> None:
        log.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    if not args.no_check:
        try:
            report["packed_check"] = check_packed_gpu(model_dir)
        except Exception as exc:
            report["packed_check"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("packed check:", report["packed_check"], flush=True)
        try:
            report["dropout_lora_check"] = check_dropout_lora_gpu()
        except Exception as exc:
            report["dropout_lora_check"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("DropoutLoraA check:", report["dropout_lora_check"], flush=True)
    for row in ordered_rows(args.rows, args.set):
        try:
            r = measure(row, model_dir, data, args.steps, args.warmup)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            r = {"name": row.name, "kind": row.kind, "data": row.data, "error": f"{type(exc).__name__}: {exc}"}
            _free()
        report["rows"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "options"}, default=str), flush=True)
        dump()
    measures = ([("gen", lambda d, a, b: time_generation(str(d), a, b))] if args.gen else []) + (
        [("gen_explore", explore_generation)] if args.gen_explore else [])
    for key, measure_gen in measures:
        for four_bit in (True, False):
            label = f"Phi-3-mini shape, {'QLoRA 4-bit' if four_bit else '16-bit'}"
            try:
                adapter = save_random_adapter(model_dir, work / f"adapter-{int(four_bit)}", four_bit)
                report.setdefault(key, {})[label] = measure_gen(model_dir, adapter, four_bit)
            except Exception as exc:
                report.setdefault(key, {})[label] = [{"error": f"{type(exc).__name__}: {exc}"}]
            print(key, label, report[key][label], flush=True)
            dump()
    print(table(report["rows"]))
    for i, name in enumerate(args.profile or []):
        rows = [r for r in ordered_rows(None, ["all", "explore"]) if named(r, name)]
        if rows:
            print(profile_step(rows[0], model_dir, data, args.warmup, Path(args.json).with_suffix(f".profile{i}.txt")),
                  flush=True)
    if args.markdown:
        v = report["versions"]
        body = (f"## GPU training speed ({v['gpu']})\n\n{report['date']}; "
                + ", ".join(f"{k} {val}" for k, val in v.items() if k != "gpu")
                + f". {args.steps} timed steps after {args.warmup} warm-up steps; batch 4, max length 2048, "
                "LoRA r16 all-linear, dropout 0.05. Packed-path check (logits of a packed row vs each sequence "
                f"alone): {report.get('packed_check')}. DropoutLoraA vs nn.Dropout + product on CUDA, same RNG state: "
                f"{report.get('dropout_lora_check')}.\n\n" + table(report["rows"])
                + ("\n\n### Generation (ChatEngine, greedy, 128 new tokens)\n\n" + gen_table(report["gen"])
                   if report["gen"] else ""))
        title = f"GPU training speed ({v['gpu']}){', ablations' if args.set == ['ablations'] else ''}"
        write_markdown(Path(args.markdown), title, body.replace(f"## GPU training speed ({v['gpu']})", f"## {title}", 1))
    return 0


def cpu_main(args: argparse.Namespace) -> int:
    report = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "cpu": cpu_figures(args.cpu_steps)}
    ts = report["cpu"]["train_step"]
    print(f"CPU training step: {ts['tokens_per_s']:.0f} useful tokens/s ({ts['tokens_per_step']:.0f} tokens/step)")
    print(gen_table({"embedded SmolLM2-135M": report["cpu"]["generation"]}))
    if args.markdown:
        v = report["versions"]
        body = (f"## CPU ({os.cpu_count()} cores, embedded SmolLM2-135M-Instruct)\n\n{report['date']}; "
                + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n\n"
                + f"Training step (quick-cpu preset, batch 4, max length 256, options {ts['options']}): "
                  f"**{ts['tokens_per_s']:.0f} useful tokens/s**, {ts['tokens_per_step']:.0f} tokens/step "
                  f"({ts['steps']} timed steps after 1 warm-up). Generation: the tuned side is the adapter of "
                  "those few steps, so its answer may be short.\n\n"
                + gen_table({"embedded SmolLM2-135M": report["cpu"]["generation"]}))
        write_markdown(Path(args.markdown), f"CPU ({os.cpu_count()} cores, embedded SmolLM2-135M-Instruct)", body)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="Measure the embedded model on this machine's CPU.")
    p.add_argument("--rows", nargs="*", help="Only rows whose name contains one of these words ('=NAME': that row).")
    p.add_argument("--set", default=["main"], nargs="+", choices=("main", "ablations", "lean", "all", "explore"),
                   help="main: recipe and engine rows (one run, so ratios compare like with like); "
                        "ablations: the engine with one technique turned back at a time.")
    p.add_argument("--steps", type=int, default=5, help="Timed steps per row.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    p.add_argument("--cpu-steps", type=int, default=3)
    p.add_argument("--profile", nargs="*", help="Profile one step of the first row whose name contains each word.")
    p.add_argument("--gen", action="store_true", help="Also time generation (GPU).")
    p.add_argument("--gen-explore", action="store_true",
                   help="Also try faster decoding (static cache, torch.compile, merged adapter) with plain generate.")
    p.add_argument("--no-check", action="store_true", help="Skip the packed-attention check on the GPU.")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "phi3_lora_bench"))
    p.add_argument("--tokenizer", default=str(ROOT / ".bench" / "phi3_tokenizer"),
                   help="Folder with the Phi-3 tokenizer (made from tests/assets/ggml-vocab-phi-3.gguf).")
    p.add_argument("--json", default="bench_results.json")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="Write the table into this file ('' to skip).")


def run(args: argparse.Namespace) -> int:
    return cpu_main(args) if args.cpu else gpu_main(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
