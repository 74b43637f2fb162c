"""Training and generation speed: the cookbook recipe, our engine and Unsloth, on the same data and model.

    python -m bench.train_speed                 # GPU: the main rows, writes docs/benchmarks.md
    python -m bench.train_speed --cpu           # this machine: the embedded model, briefly, with a recipe row
    python -m phi3_lora bench [--cpu]           # the same, through the app's CLI

GPU rows use a Phi-3-mini-shaped model with random weights (transformers Phi3Config: hidden 3072,
32 layers, 32 heads, intermediate 8192, vocab 32064) and the real Phi-3 tokenizer, built from
tests/assets/ggml-vocab-phi-3.gguf on first use, so no download is needed. Data: full rows (every row cut
at 2048 tokens) and a chat-length mix (lognormal token counts, median 300, mean 430). "Useful tokens" are
non-padding tokens. MFU counts 16.2 GFLOP per trained token (forward + input gradients of a 3.8B model at
2048 context) against 790 TFLOP/s, the bf16 matrix rate measured on an H200.

Recipe rows build trl's SFTTrainer as the Phi-3 model card's sample_finetune.py does (peft_config handed to
the trainer, which prepares the 4-bit model itself). Engine rows build the trainer through
`phi3_lora.train.build`, the same function `python -m phi3_lora train` uses. Unsloth rows run
bench/peer_unsloth.py with `--peer-path` put first on PYTHONPATH (Unsloth and its own pins, never a
dependency of this project). Every row runs in a fresh process (so no row's patches or compiled kernels
reach another, and the order does not matter), at the same learning rate (1e-4, constant, no warm-up),
with the loss of every step kept, and is timed by bench/timing.py: warm-up until the step time settles,
then the median step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.prestart import await_go, quiet
from bench.paired import paired_table
from bench.chat_mix import bench_data
from bench.machine import host_link, versions
from bench.model_folders import ensure_tokenizer, make_llama_copy, make_phi3_mini
from bench.report import SAME_LOSS_STEP, aggregate, gen_table, table, write_gpu_markdown, write_markdown
from bench.row_sets import LEARNING_RATE, Row, all_rows, named, ordered_rows
from bench.schedule import done_runs, pending_runs, run_series

ROOT = Path(__file__).resolve().parents[1]
FLOP_PER_TOKEN = 16.2e9
PEAK_FLOPS = 790e12


# --- running one row ------------------------------------------------------------------------------

def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    from bench.timing import sync

    sync()


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


def measure(row: Row, model_dir: Path, data: dict[str, Path], steps: int,
            extra_patch: dict[str, Any] | None = None) -> dict[str, Any]:
    """One recipe or engine row in this process (`extra_patch`: --engine-patch, engine rows only)."""
    from bench.timing import SettleTimer, time_trainer

    _free()
    started = time.time()
    timer = SettleTimer(steps, min_total=SAME_LOSS_STEP, quiet=functools.partial(quiet, model_dir.parent),
                        free=row.free, logged=row.logged)
    extra = (extra_patch or {}) if row.kind == "engine" else {}
    with tempfile.TemporaryDirectory() as tmp, patched({**row.patch, **extra}):
        build = run_recipe if row.kind == "recipe" else run_engine
        trainer, opts = build(row, model_dir, data[row.data], timer.max_steps(), Path(tmp))
        opts["phases_s"] = {"build": round(time.time() - started, 2)}  # imports, load, LoRA, trainer
        if extra:
            opts["engine_patch"] = extra
        result = time_trainer(trainer, timer)
        del trainer
    _free()
    return finish(result, row, opts, started)


def finish(result: dict[str, Any], row: Row, opts: dict[str, Any], started: float) -> dict[str, Any]:
    result.update(name=row.name, kind=row.kind, data=row.data, four_bit=row.four_bit, options=opts,
                  mfu=result["tokens_per_s"] * FLOP_PER_TOKEN / PEAK_FLOPS, wall_s=time.time() - started,
                  recipe_ref=row.recipe_ref, budget_gb=row.budget_gb)
    return result


@dataclass
class RowProcess:
    """A row's process: started (`spawn`), maybe waiting for its go file, collected with `collect`."""

    row: Row
    proc: subprocess.Popen
    out: Path
    go_file: Path | None
    spawned_at: float
    go_at: float = 0.0

    def go(self) -> None:
        """Let a pre-started process begin the row's work (its time counts from here)."""
        if self.go_file is not None:
            self.go_file.touch()
        self.go_at = time.time()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def spawn(row: Row, args: argparse.Namespace, work: Path, extra: list[str] | None = None,
          prestart: bool = False) -> RowProcess:
    """Start one row in a fresh Python process (the peer's with its own packages first on the path). With
    `prestart` the process only imports, then waits for `RowProcess.go` (bench/prestart.py); else it goes now.
    `extra`: more arguments for the row's process (bench/peer_unsloth.py's --profile)."""
    stem = work / f"row-{os.getpid()}-{time.time_ns()}"
    out, go_file = stem.with_suffix(".json"), (stem.with_suffix(".go") if prestart else None)
    common = ["--workdir", str(work), "--steps", str(args.steps), "--row-json", str(out), *(extra or [])]
    common += ["--go-file", str(go_file)] if go_file else []
    patch = getattr(args, "engine_patch", None)
    common += ["--engine-patch", *patch] if row.kind == "engine" and patch else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if row.kind == "unsloth":
        cmd = [sys.executable, "-m", "bench.peer_unsloth", "--row", "=" + row.name, *common]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_path, str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", TRANSFORMERS_OFFLINE="1")
        # Unsloth writes the source of its patched modules under the working directory, which the device tool
        # refreshes between calls: kept with the bench's other files instead, as a user's stays between runs.
        env.setdefault("UNSLOTH_COMPILE_LOCATION", str(work / "unsloth_compiled_cache"))
    else:
        cmd = [sys.executable, "-m", "bench.train_speed", "--one-row", "=" + row.name, *common]
    rp = RowProcess(row, subprocess.Popen(cmd, cwd=ROOT, env=env), out, go_file, time.time())  # noqa: S603
    if not prestart:
        rp.go()
    return rp


def collect(rp: RowProcess, timeout: float) -> dict[str, Any]:
    """Wait for `rp` (killed `timeout` seconds after its go); its result, with `process_s` from the go to its end
    (the imports of a pre-started process are not in it) and `spawned_at`."""
    try:
        code = rp.proc.wait(timeout=max(1.0, rp.go_at + timeout - time.time()))
        failure = None if code == 0 and rp.out.exists() else f"row process exited {code}"
    except subprocess.TimeoutExpired:  # the row is a result (an error), the rows after it still run
        rp.kill()
        failure = f"row process killed after {timeout:.0f} s (--row-timeout or the call's deadline)"
    process_s = time.time() - rp.go_at
    row = rp.row
    if failure:
        return {"name": row.name, "kind": row.kind, "data": row.data, "wall_s": process_s, "process_s": process_s,
                "error": failure}
    return {**json.loads(rp.out.read_text(encoding="utf-8")), "process_s": process_s, "spawned_at": rp.spawned_at}


def measure_in_process(row: Row, args: argparse.Namespace, work: Path, timeout: float | None = None,
                       extra: list[str] | None = None) -> dict[str, Any]:
    """One row in its own process, now (`spawn`, `collect`; default timeout --row-timeout)."""
    return collect(spawn(row, args, work, extra), timeout or args.row_timeout)


def one_row_main(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    row = next(r for r in all_rows() if named(r, args.one_row))
    model_dir = work / "phi3-mini-random"
    data = {"full": work / "full.jsonl", "mix": work / "mix.jsonl"}
    pre: dict[str, Any] = {}
    try:
        pre = await_go(args.go_file, row.kind, work)
        result = measure(row, model_dir, data, args.steps, engine_patch(args.engine_patch))
    except Exception as exc:  # noqa: BLE001 - a row that fails is a result too
        import traceback

        traceback.print_exc()
        result = {"name": row.name, "kind": row.kind, "data": row.data, "error": f"{type(exc).__name__}: {exc}"}
    Path(args.row_json).write_text(json.dumps({**result, **pre}, default=str), encoding="utf-8")
    return 0


# Host calls whose Python stacks a profile lists: each waits for the GPU (a sync) or copies on it.
TRACED_HOST_CALLS = ("cudaStreamSynchronize", "cudaMemcpyAsync")


def host_call_sites(events: list[Any], names: tuple[str, ...] = TRACED_HOST_CALLS, frames: int = 6) -> list[str]:
    """`count x name <- the innermost Python frames outside torch's own files` for the profiler's host events
    named in `names`, most frequent first (pure over objects with `.name` and `.stack`)."""
    sites: dict[tuple[str, tuple[str, ...]], int] = {}
    for e in events:
        if e.name not in names:
            continue
        stack = tuple(f for f in (e.stack or []) if "/torch/" not in f and "<built-in" not in f)[:frames]
        sites[(e.name, stack)] = sites.get((e.name, stack), 0) + 1
    return [f"{n} x {name} <- " + " <- ".join(stack or ("(no Python frame)",))
            for (name, stack), n in sorted(sites.items(), key=lambda kv: -kv[1])]


def step_profiler(step: int) -> tuple[Any, Any]:
    """A Trainer callback that runs optimizer step `step` (0-based, after the warm-up) under torch.profiler, and a
    function that summarises it: CUDA kernels by total time, grouped (`kernel_group`), host time, and where in
    Python the step waits for the GPU or copies (`host_call_sites`). Used for the engine's rows here and for
    Unsloth's in its own process (bench/peer_unsloth.py)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
    wall: list[float] = []

    class _Prof(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == step:
                torch.cuda.synchronize()
                prof.__enter__()
                wall.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == step + 1:
                torch.cuda.synchronize()
                wall.append(time.perf_counter())
                prof.__exit__(None, None, None)

    def summary(title: str, out: Path) -> str:
        from torch.autograd import DeviceType

        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) or 1.0
        groups: dict[str, float] = {}
        for e in events:
            key = kernel_group(e.key)
            groups[key] = groups.get(key, 0.0) + e.self_device_time_total
        step_ms = (wall[-1] - wall[0]) * 1e3 if len(wall) == 2 else float("nan")
        lines = [f"profile of one step: {title}; GPU kernel time {total / 1e3:.1f} ms in {step_ms:.1f} ms of wall "
                 "time (under the profiler)", "", "group | ms | share"]
        lines += [f"{k} | {v / 1e3:.1f} | {v / total:.1%}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
        lines += ["", prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)]
        lines += ["", "by host (CPU) time:",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90)]
        lines += ["", "where the step waits for the GPU or copies (host call <- Python frames):",
                  *host_call_sites(list(prof.events()))]
        text = "\n".join(lines)
        out.write_text(text, encoding="utf-8")
        return text

    return _Prof(), summary


def profile_step(row: Row, model_dir: Path, data: dict[str, Path], warmup: int, out: Path) -> str:
    """One optimizer step of an engine or recipe `row` under torch.profiler (`step_profiler`), after `warmup`."""
    callback, summary = step_profiler(warmup)
    _free()
    with tempfile.TemporaryDirectory() as tmp, patched(row.patch):
        build = run_recipe if row.kind == "recipe" else run_engine
        trainer, _ = build(row, model_dir, data[row.data], warmup + 1, Path(tmp))
        trainer.add_callback(callback)
        trainer.train()
        del trainer
    _free()
    return summary(row.name, out)


def kernel_group(name: str) -> str:
    """A coarse bucket for a CUDA kernel's name (GEMM, attention, dequantise, copies, elementwise, ...)."""
    n = name.lower()
    for key, words in (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")), ("dequant 4-bit", ("dequant",)),
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

    from phi3_lora.speed import packed_attention

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

    from phi3_lora.speed.lean_lora import DropoutLoraA

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

        from phi3_lora.speed.lean_lora import remake_source
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


def gpu_main(args: argparse.Namespace) -> int:
    began = time.time()  # --time-budget counts from here: the set-up (model, data, checks) spends it too
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = ensure_tokenizer(Path(args.tokenizer))
    model_dir = make_phi3_mini(work / "phi3-mini-random", tok_dir)
    rows = ordered_rows(args.rows, args.set)
    if any(r.kind == "unsloth" and r.peer.get("model") == "llama" for r in rows):
        make_llama_copy(model_dir, work / "llama-mini-random")
    bench_data(work)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "runs": [], "gen": {},
                              "host_link": host_link(), "order": []}
    print("host link:", report["host_link"], flush=True)
    log = Path(args.json)

    def dump() -> None:
        report["rows"] = aggregate(report["runs"])
        log.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")

    if not args.no_check:
        for key, check in (("packed_check", lambda: check_packed_gpu(model_dir)),
                           ("dropout_lora_check", check_dropout_lora_gpu)):
            try:
                report[key] = check()
            except Exception as exc:  # noqa: BLE001
                report[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(key, report[key], flush=True)
        _free()
    deadline = began + args.time_budget if args.time_budget else None
    done, history = done_runs(args.done_dir or [])
    pending = pending_runs(rows, args.first_repeat, args.repeats, done, args.last)
    if done:
        print(f"{len(done)} runs done in earlier calls; {len(pending)} to go", flush=True)

    def seconds_left() -> float | None:
        return args.deadline_epoch - time.time() if args.deadline_epoch else None

    def on_result(r: dict[str, Any]) -> None:
        report["order"].append(r["name"])
        print(json.dumps({k: v for k, v in r.items() if k in (
            "name", "tokens_per_s", "peak_gib", "tokens_per_step", "warmup_steps", "settled", "step_s_median",
            "step_tok_s_min", "step_tok_s_max", "error", "wall_s", "process_s", "import_overlap_s")},
            default=str), flush=True)
        dump()

    run_series(pending, history, report["runs"], lambda row, pre: spawn(row, args, work, prestart=pre), collect,
               prestart=args.prestart, row_timeout=args.row_timeout, seconds_left=seconds_left,
               stopped=lambda: bool(deadline and time.time() > deadline), on_result=on_result)
    if pending:
        print("time budget spent: left for a later call:", [f"{r.name} #{rep}" for r, rep in pending], flush=True)
    dump()
    measures = ([("gen", lambda d, a, b: time_generation(str(d), a, b))] if args.gen else []) + (
        [("gen_explore", explore_generation)] if args.gen_explore else [])
    for key, measure_gen in measures:
        for four_bit in (True, False):
            label = f"Phi-3-mini shape, {'QLoRA 4-bit' if four_bit else '16-bit'}"
            try:
                adapter = save_random_adapter(model_dir, work / f"adapter-{int(four_bit)}", four_bit)
                report.setdefault(key, {})[label] = measure_gen(model_dir, adapter, four_bit)
            except Exception as exc:  # noqa: BLE001
                report.setdefault(key, {})[label] = [{"error": f"{type(exc).__name__}: {exc}"}]
            print(key, label, report[key][label], flush=True)
            dump()
    print(table(report["rows"]))
    for i, name in enumerate(args.profile or []):
        prow = [r for r in all_rows() if named(r, name)]
        if not prow:
            continue
        out = Path(args.json).with_suffix(f".profile{i}.txt")
        if prow[0].kind == "unsloth":  # in Unsloth's own process and packages, as its timed rows
            measure_in_process(prow[0], args, work, extra=["--profile", str(out), "--profile-step", "6"])
            print(out.read_text(encoding="utf-8") if out.exists() else f"no profile: {prow[0].name}", flush=True)
        else:
            data = {"full": work / "full.jsonl", "mix": work / "mix.jsonl"}
            print(profile_step(prow[0], model_dir, data, 6, out), flush=True)
    if args.markdown and report["runs"]:  # a call of profiles only has no table
        write_gpu_markdown(report, args)
    return 0


def merge_main(args: argparse.Namespace) -> int:
    """Several GPU runs' JSON (the same session's calls) as one table: every run of a row is a repeat."""
    reports = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
    report = dict(reports[0], runs=[r for rep in reports for r in rep["runs"]])
    report["rows"] = aggregate(report["runs"])
    Path(args.json).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(table(report["rows"]))
    print(paired_table(report["runs"]))
    if args.markdown and report["runs"]:  # a call of profiles only has no table
        write_gpu_markdown(report, args)
    return 0


# --- CPU figures ----------------------------------------------------------------------------------

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


def cpu_generation(new_tokens: int = 64, repeats: int = 3) -> list[dict[str, Any]]:
    """Compare's answers on this CPU, embedded model, greedy: the base side, the tuned side (one row, merged
    weights kept per adapter) and the pair (base + tuned rows of one batch, as Compare runs them), each the median
    of `repeats` runs. The adapter is random (r16 all-linear, B ~ N(0, 1e-3)) so that both sides answer at full
    length; a pair side's rate is its tokens over the time until its own last token."""
    from phi3_lora import embedded
    from phi3_lora.generate import ChatEngine, GenerationSettings

    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_random_adapter(embedded.embedded_model_dir(), Path(tmp) / "adapter", four_bit=False)
        engine = ChatEngine(embedded.EMBEDDED_NAME, adapter, load_in_4bit=False)
    settings = GenerationSettings(temperature=0, max_new_tokens=new_tokens)
    history = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
    tokenizer = engine.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    t0 = time.perf_counter()
    engine.answer(history, adapter=True, settings=GenerationSettings(temperature=0, max_new_tokens=2))
    first_tuned = time.perf_counter() - t0  # the first tuned call makes the merged weights
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "tuned": [], "pair: base side": [], "pair: tuned side": []}
    for _ in range(repeats):
        for side, adapter_on in (("base", False), ("tuned", True)):
            t0, first, text = time.perf_counter(), None, ""
            for text in engine.stream(history, adapter=adapter_on, settings=settings):
                first = first or (time.perf_counter() - t0 if text else None)
            total = time.perf_counter() - t0
            runs[side].append({"tokens": count(text), "seconds": total, "ttft_s": first or total})
        t0, first, last, texts = time.perf_counter(), None, [0.0, 0.0], ("", "")
        for new in engine.stream_pair(history, history, settings):
            now = time.perf_counter() - t0
            first = first or (now if any(new) else None)
            last = [now if a != b else t for a, b, t in zip(new, texts, last)]
            texts = new
        for i, side in enumerate(("pair: base side", "pair: tuned side")):
            runs[side].append({"tokens": count(texts[i]), "seconds": last[i], "ttft_s": first or last[i]})
    out = []
    for side, rs in runs.items():
        rates = [r["tokens"] / r["seconds"] for r in rs]
        mid = sorted(range(len(rs)), key=rates.__getitem__)[len(rs) // 2]
        out.append({"side": side, **rs[mid], "tokens_per_s": rates[mid], "spread": f"{min(rates):.1f}-{max(rates):.1f}"})
    out.append({"side": "first tuned call (makes the merged weights), 2 tokens", "tokens": 2, "seconds": first_tuned,
                "ttft_s": first_tuned, "tokens_per_s": 2 / first_tuned})
    del engine
    _free()
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="Measure the embedded model on this machine's CPU.")
    p.add_argument("--rows", nargs="*", help="Only rows whose name contains one of these words ('=NAME': that row).")
    p.add_argument("--set", default=["main"], nargs="+", choices=("main", "ablations", "all", "explore", "free"),
                   help="main: recipe, engine, Unsloth and 16-bit rows at each memory budget; ablations: the "
                        "engine with one technique turned back; explore: tuning rows.")
    p.add_argument("--steps", type=int, default=6, help="Timed steps per row (after the warm-up settles).")
    p.add_argument("--repeats", type=int, default=2, help="Runs of the row list (odd ones in reverse order).")
    p.add_argument("--first-repeat", type=int, default=0, help="Number the repeats from here (a later call).")
    p.add_argument("--merge", nargs="+", help="Merge these GPU result files into one table (no GPU needed).")
    p.add_argument("--time-budget", type=float, default=0,
                   help="Start no row once this many seconds have passed since the bench began.")
    p.add_argument("--row-timeout", type=float, default=900)
    p.add_argument("--done-dir", nargs="*",
                   help="Folders of earlier calls' result JSON (this device session): their runs are not run again "
                        "and their process times decide which rows fit this call.")
    p.add_argument("--deadline-epoch", type=float, default=0,
                   help="Unix time the call must end by: a row starts only if its expected time fits, and is "
                        "killed at the deadline.")
    p.add_argument("--last", nargs="*", help="Rows (names as in --rows) to run after every other run.")
    p.add_argument("--engine-patch", nargs="*", metavar="NAME=VALUE",
                   help="Set these module attributes in every engine row's process (VALUE as JSON), e.g. "
                        "phi3_lora.options.CUDNN_RAGGED=true: the whole table with a switch an explore row won.")
    p.add_argument("--no-prestart", dest="prestart", action="store_false",
                   help="Start each row's process only when the one before has ended (by default the next one "
                        "does its imports meanwhile, bench/prestart.py).")
    p.add_argument("--peer-path", default=os.environ.get("PEER_PYTHONPATH", ""),
                   help="Folder with Unsloth and its pins, put first on PYTHONPATH for the Unsloth rows.")
    p.add_argument("--cpu-steps", type=int, default=6)
    p.add_argument("--cpu-no-gen", action="store_true", help="With --cpu: training rows only.")
    p.add_argument("--cpu-bf16-recipe", action="store_true",
                   help="With --cpu: also the recipe in bf16 where the engine picked fp32 (slow without native bf16).")
    p.add_argument("--cpu-gen", action="store_true",
                   help="With --cpu: only Compare's generation (base, tuned, the pair; random adapter), 3 runs each.")
    p.add_argument("--cpu-gen-tokens", type=int, default=64)
    p.add_argument("--profile", nargs="*", help="Profile one step of the first row whose name contains each word.")
    p.add_argument("--gen", action="store_true", help="Also time generation (GPU).")
    p.add_argument("--gen-explore", action="store_true",
                   help="Also try faster decoding (static cache, torch.compile, merged adapter) with plain generate.")
    p.add_argument("--no-check", action="store_true", help="Skip the packed-attention check on the GPU.")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "phi3_lora_bench"))
    p.add_argument("--tokenizer", default=str(ROOT / ".bench" / "phi3_tokenizer"),
                   help="Folder with the Phi-3 tokenizer (made from tests/assets/ggml-vocab-phi-3.gguf if missing).")
    p.add_argument("--json", default="bench_results.json")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="Write the table into this file ('' to skip).")
    p.add_argument("--one-row", help=argparse.SUPPRESS)  # internal: run this row here, write --row-json
    p.add_argument("--row-json", help=argparse.SUPPRESS)
    p.add_argument("--go-file", help=argparse.SUPPRESS)  # internal: import, then wait for this file (prestart.py)


def run(args: argparse.Namespace) -> int:
    if args.one_row:
        return one_row_main(args)
    if args.merge:
        return merge_main(args)
    return cpu_main(args) if args.cpu else gpu_main(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    code = main()
    if "--one-row" in sys.argv:  # a row's process: its result is written; skip tearing down the model and CUDA
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
