"""One Unsloth row of the GPU bench, in its own process and environment (never a dependency of this project).

    PYTHONPATH=<unsloth site>:. HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \\
        python -m bench.peer_unsloth --row "=unsloth QLoRA full, 8 GiB" --workdir <bench workdir> --row-json out.json

bench/train_speed.py starts it for each Unsloth row (`--peer-path` names the folder with Unsloth and its pins:
it needs trl <= 1.15 and datasets < 5, older than this project's). Same model weights (the bench's random
Phi-3-mini; Unsloth's fast path reads the Llama layout of the same weights, as Unsloth's own Phi-3 uploads
are), same data files, the same LoRA (r16, alpha 32, dropout 0.05, every linear layer), batch 4 x 2048,
the same learning rate, and the same timer (bench/timing.py). Unsloth has no memory budget: a row names its
checkpointing ("unsloth": every layer, inputs offloaded to host memory; "none"; or N layers left
un-checkpointed, the rest as "unsloth").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(row: Any, work: Path, steps: int, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Unsloth's trainer for `row`; the options say where the set-up's time went (`phases_s`: import, load,
    LoRA, trainer), which is most of an Unsloth row's device time (~45 s of ~70 s in issue 19's fifth session)."""
    marks = [time.time()]
    import unsloth  # noqa: F401 - must come before transformers, trl and peft: it patches them
    from unsloth import FastLanguageModel

    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.row_sets import LEARNING_RATE

    llama = row.peer.get("model", "llama") == "llama"
    model_dir = work / ("llama-mini-random" if llama else "phi3-mini-random")
    ckpt = row.peer.get("checkpointing", "unsloth")
    marks.append(time.time())
    model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=2048,
                                                   dtype=torch.bfloat16, load_in_4bit=row.four_bit,
                                                   local_files_only=True)
    marks.append(time.time())
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
        target_modules=LLAMA_TARGETS if llama else "all-linear",
        use_gradient_checkpointing=False if ckpt == "none" else "unsloth", random_state=0, max_seq_length=2048)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    args = SFTConfig(output_dir=str(out_dir), bf16=True, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                     max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_steps=0,
                     logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=2048,
                     packing=True, padding_free=True, disable_tqdm=True, optim="adamw_torch_fused",
                     dataset_num_proc=1)
    data = work / f"{row.data}.jsonl"
    marks.append(time.time())
    trainer = SFTTrainer(model=model, processing_class=tok, args=args,
                         train_dataset=load_dataset("json", data_files=str(data))["train"])
    free = ckpt if isinstance(ckpt, int) else 0

    class _Partial(TrainerCallback):
        """Leave the last `free` decoder layers un-checkpointed (after Unsloth armed every one)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in layers[len(layers) - free:]:
                layer.gradient_checkpointing = False
            self.layers = len(layers)

    if free:
        trainer.add_callback(_Partial())
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("unsloth", "unsloth_zoo", "trl", "transformers", "peft", "datasets",
                                            "bitsandbytes", "torch")}
    marks.append(time.time())
    phases = dict(zip(("import", "load", "lora", "trainer"), (round(b - a, 2) for a, b in zip(marks, marks[1:]))))
    return trainer, {"checkpointing": ckpt, "model": "llama layout" if llama else "phi3 folder",
                     "versions": versions, "phases_s": phases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--row-json", required=True)
    p.add_argument("--profile", help="profile one step into this file instead of timing the row")
    p.add_argument("--profile-step", type=int, default=6, help="the step to profile (after a warm-up)")
    p.add_argument("--go-file", help="import, then wait for this file before the row's work (bench/prestart.py)")
    args = p.parse_args(argv)

    from bench.prestart import await_go, quiet
    from bench.timing import SettleTimer, time_trainer
    from bench.row_sets import all_rows, named
    from bench.row_process import finish
    from bench.step_profile import step_profiler

    row = next(r for r in all_rows() if named(r, args.row))
    if args.profile:  # the same trainer as a timed run, one step under torch.profiler (bench/step_profile.py)
        callback, summary = step_profiler(args.profile_step)
        with tempfile.TemporaryDirectory() as tmp:
            trainer, _ = build(row, Path(args.workdir), args.profile_step + 1, Path(tmp))
            trainer.add_callback(callback)
            trainer.train()
        summary(row.name, Path(args.profile))
        Path(args.row_json).write_text(json.dumps({"name": row.name, "profile": args.profile}), encoding="utf-8")
        return 0
    pre: dict[str, Any] = {}
    try:
        pre = await_go(args.go_file, row.kind, Path(args.workdir))
        started = time.time()
        timer = SettleTimer(args.steps, min_total=10, quiet=functools.partial(quiet, Path(args.workdir)),
                            free=row.free, logged=row.logged)
        with tempfile.TemporaryDirectory() as tmp:
            trainer, opts = build(row, Path(args.workdir), timer.max_steps(), Path(tmp))
            result = finish(time_trainer(trainer, timer), row, opts, started)
    except Exception as exc:  # noqa: BLE001 - a row that fails is a result too
        traceback.print_exc()
        result = {"name": row.name, "kind": row.kind, "data": row.data, "error": f"{type(exc).__name__}: {exc}"}
    Path(args.row_json).write_text(json.dumps({**result, **pre}, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # the result is written: skip tearing down the model and CUDA (seconds of device time a row)
