"""`bench --cpu`: the embedded SmolLM2-135M on this machine, the plain recipe's and the engine's training step in
the same dtype, and generation, printed and written to the JSON (and a section of docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.generation import cpu_generation, time_generation
from bench.machine import versions
from bench.report import gen_table, write_markdown
from bench.row_sets import LEARNING_RATE
from bench.row_trainers import cpu_recipe_trainer

ROOT = Path(__file__).resolve().parents[1]


def cpu_figures(steps: int = 6, generation: bool = True, bf16_recipe: bool = False) -> dict[str, Any]:
    """The embedded SmolLM2-135M on this machine: the plain recipe's and the engine's training step (same data,
    batch, length, seed and dtype: the dtype models.resolve_dtype picks for this CPU), and generation, briefly.
    `bf16_recipe`: also the recipe in the cookbook's bf16 where the engine picked fp32 (a CPU without native bf16,
    where emulated bf16 is an order of magnitude slower)."""
    from bench.timing import SettleTimer, time_trainer
    from phi3_lora import embedded, models, train
    from phi3_lora.config import preset

    out: dict[str, Any] = {}
    data = ROOT / "data" / "sample_chat.jsonl"
    dtype_name = str(models.resolve_dtype("auto", "cpu")).replace("torch.", "")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset("quick-cpu").replace(train={"max_steps": steps + 2, "save_steps": 10**6, "logging_steps": 1,
                                                 "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant",
                                                 "warmup_ratio": 0.0, "seed": 0},
                                          data={"source": str(data), "eval_fraction": 0.0})
        recipes = [dtype_name] + (["bfloat16"] if bf16_recipe and dtype_name != "bfloat16" else [])
        for name in recipes:
            timer = SettleTimer(steps, min_warmup=1, max_warmup=2)
            recipe = cpu_recipe_trainer(embedded.EMBEDDED_NAME, data, timer.max_steps(), Path(tmp) / "recipe",
                                        cfg.train.per_device_train_batch_size, cfg.train.max_length, cfg.lora, name)
            key = "recipe_step" if name == dtype_name else "recipe_step_bf16"
            out[key] = dict(time_trainer(recipe, timer), dtype=name)
            del recipe
            gc.collect()
        built = train.build(cfg, Path(tmp))
        timer = SettleTimer(steps, min_warmup=1, max_warmup=2)
        res = time_trainer(built.trainer, timer)
        res["options"] = {k: v for k, v in vars(built.opts).items()}
        res["dtype"] = built.dtype_name
        out["train_step"] = res
        out["train_vs_recipe"] = res["tokens_per_s"] / out["recipe_step"]["tokens_per_s"]
        if "recipe_step_bf16" in out:
            out["train_vs_recipe_bf16"] = res["tokens_per_s"] / out["recipe_step_bf16"]["tokens_per_s"]
        adapter = Path(tmp) / "adapter"
        built.trainer.model.save_pretrained(adapter)
        del built
        if generation:
            out["generation"] = time_generation(embedded.EMBEDDED_NAME, adapter, load_in_4bit=False, new_tokens=48,
                                                repeats=1)
    return out


def cpu_main(args: argparse.Namespace) -> int:
    if args.cpu_gen:
        gen = cpu_generation(args.cpu_gen_tokens)
        print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {versions()}")
        print(gen_table({"embedded SmolLM2-135M": gen}))
        for g in gen:
            print(g["side"], g.get("spread", ""))
        Path(args.json).write_text(json.dumps({"cpu_generation": gen}, indent=1, default=str), encoding="utf-8")
        return 0
    load_before = os.getloadavg()[0]
    report = {"date": time.strftime("%Y-%m-%d"), "versions": versions(),
              "cpu": cpu_figures(args.cpu_steps, generation=not args.cpu_no_gen, bf16_recipe=args.cpu_bf16_recipe)}
    report["load_average"] = [load_before, os.getloadavg()[0]]
    cpu = report["cpu"]
    ts, rs = cpu["train_step"], cpu["recipe_step"]
    line = (f"CPU training step ({ts['dtype']}): engine {ts['tokens_per_s']:.0f} useful tokens/s "
            f"({ts['tokens_per_step']:.0f} tokens/step), plain recipe {rs['tokens_per_s']:.0f} "
            f"({rs['tokens_per_step']:.0f} tokens/step): {cpu['train_vs_recipe']:.2f}x")
    if "recipe_step_bf16" in cpu:
        line += (f"; the recipe in bf16 {cpu['recipe_step_bf16']['tokens_per_s']:.1f}: "
                 f"{cpu['train_vs_recipe_bf16']:.1f}x")
    print(line)
    print(f"load average before/after: {report['load_average']}")
    if "generation" in cpu:
        print(gen_table({"embedded SmolLM2-135M": cpu["generation"]}))
    if args.markdown:
        v = report["versions"]
        # its own section: the hand-written CPU section (techniques, generation) is never overwritten
        title = f"CPU, latest bench --cpu run ({os.cpu_count()} cores, embedded SmolLM2-135M-Instruct)"
        body = (f"## {title}\n\n{report['date']}; "
                + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n\n"
                + f"Training step (quick-cpu preset, batch 4, max length 256, learning rate {LEARNING_RATE}, "
                  f"{ts['dtype']}, median of {ts['steps']} timed steps after the warm-up; load average "
                  f"{report['load_average'][0]:.2f} before, {report['load_average'][1]:.2f} after): engine "
                  f"**{ts['tokens_per_s']:.0f} useful tokens/s** ({ts['tokens_per_step']:.0f} tokens/step, options "
                  f"{ts['options']}); the plain trl recipe in the same run and dtype {rs['tokens_per_s']:.0f} "
                  f"({rs['tokens_per_step']:.0f} tokens/step): **{cpu['train_vs_recipe']:.2f}x**."
                + (f" The recipe in the cookbook's bf16 (emulated on this CPU): "
                   f"{cpu['recipe_step_bf16']['tokens_per_s']:.1f} tokens/s ({cpu['train_vs_recipe_bf16']:.1f}x)."
                   if "recipe_step_bf16" in cpu else "")
                + ("\n\nGeneration: the tuned side is the adapter of those few steps, so its answer may be short."
                   "\n\n" + gen_table({"embedded SmolLM2-135M": cpu["generation"]}) if "generation" in cpu else ""))
        write_markdown(Path(args.markdown), title, body)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return 0
