"""How fast Compare could answer on this CPU at best, next to how fast it answers.

    python -m bench.cpu_ceiling                 # the embedded model: ceiling, measured steps
    python -m bench.cpu_ceiling --compiled      # + a torch.compile'd static-cache decode step (minutes)
    python -m bench.cpu_ceiling --compiled-pair # Compare's faithful compiled pair step against its eager pair

A greedy decoding step at a few rows reads every Linear weight once (the decoder layers' and the output
head's), so its time is at least those bytes over the memory bandwidth the process's threads get. This prints:
that bandwidth (a sum over 512 MB, best of 3), the bytes a step reads, the ceiling it gives in steps per
second (= tokens per second per side for a one-row answer and for the pair, whose two rows share one read of
the weights), and Compare's measured step at one row (base side) and at two (the pair, through
`ChatEngine.answer_pairs`, random r16 all-linear adapter). The gap between the two is the per-step work that
is not reading weights: Python, ~4,000-6,000 small aten calls, the tuned row's LoRA products.

`--compiled` times the other way to cut that gap that people reach for: transformers' StaticCache with the
decode step under `torch.compile` (inductor's C++ backend, weights frozen), at one base row, two base rows and
the pair (base + tuned rows, the tuned row's LoRA update in the graph), and reports each one's compile time, its
step, whether its greedy tokens equal eager's, and whether eager StaticCache's equal `generate`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def read_bandwidth_gbs(mb: int = 512, repeats: int = 3) -> float:
    """GB/s that this process's threads read from memory: a float32 sum over `mb` MB, best of `repeats` (a bf16
    sum is bound by its conversions, not the memory: 14.9 vs 18.1 GB/s on the 2-core Xeon)."""
    import torch

    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def bytes_per_step(model: Any) -> int:
    """Bytes of the Linear weights one decoding step reads: every nn.Linear the forward calls (LoRA's own A and
    B left out; they are the tuned row's extra), the output head included even when it shares the embedding."""
    import torch

    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and "lora_" not in name and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.nbytes
    return total


def ceiling_steps_per_s(step_bytes: int, bandwidth_gbs: float) -> float:
    return bandwidth_gbs * 1e9 / step_bytes


def products_ms(model: Any, rows: int, repeats: int = 5) -> float:
    """Median ms of one step's Linear products alone at `rows` rows, as Compare runs them (`cpu_linear`: packed
    for oneDNN, q/k/v and gate/up as one product each): every Linear called once, siblings with the same input."""
    import torch

    from phi3_lora.cpu_linear import PackedLinears
    from phi3_lora.threads import cpu_threads

    layers = [m for name, m in model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in name]
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in layers}
    times = []
    with torch.inference_mode(), cpu_threads(model.device, steady=True), PackedLinears().applied(model):
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for m in layers:
                m(inputs[m.in_features])
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def measured_step_ms(engine: Any, tokens: int, repeats: int = 3) -> dict[str, float]:
    """Median ms per generated token of Compare's base side (one row) and of the pair (two rows, one step each
    token), greedy, `tokens` new tokens with no early stop."""
    from phi3_lora.generate import GenerationSettings

    settings = GenerationSettings(temperature=0, max_new_tokens=tokens)
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    runs: dict[str, list[float]] = {"one row (base side)": [], "pair (base + tuned)": []}
    engine.answer_batch([PROMPT], False, settings)  # warm: packs the weights
    for _ in range(repeats):
        t0 = time.perf_counter()
        text = engine.answer_batch([PROMPT], False, settings)[0]
        runs["one row (base side)"].append((time.perf_counter() - t0) * 1e3 / max(count(text), 1))
        t0 = time.perf_counter()
        pair = engine.answer_pairs([PROMPT], settings)[0]
        runs["pair (base + tuned)"].append((time.perf_counter() - t0) * 1e3 / max(map(count, pair), default=1))
    return {side: statistics.median(ms) for side, ms in runs.items()}


SHAPES = (("base",), ("base", "base"), ("base", "tuned"))  # the rows of each compiled step timed


def compiled_static_steps(model_dir: str, tokens: int, shapes: tuple[tuple[str, ...], ...] = SHAPES,
                          adapter: Path | None = None) -> dict[tuple[str, ...], dict[str, Any]]:
    """transformers' StaticCache + torch.compile on the decode step (weights frozen), the prompt on every row of
    each shape: a "base" row decodes the base model, a "tuned" row the adapter's (each LoRA layer adds
    `mask * (x @ A^T @ B^T * scale)`, mask 0 on base rows, so the pair is one two-row step; shapes with a tuned
    row need `adapter`). Per shape: compile seconds (the first step), median step ms after it, eager's step with
    the same cache, whether the compiled greedy tokens equal eager's, and whether eager's equal `generate`'s
    (DynamicCache, as Compare decodes; the tuned side through peft): a StaticCache attends over its whole
    preallocated length, masked, and may round a near tie the other way."""
    import torch
    import torch._inductor.config as inductor
    from transformers import AutoTokenizer, StaticCache

    from phi3_lora import models
    from phi3_lora.config import ModelSettings
    from phi3_lora.speed import forward_swap

    model = models.load_model(ModelSettings(name=model_dir, load_in_4bit=False)).eval()
    lora: list[Any] = []
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        lora = [m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    length = prompt.shape[1]
    mask = torch.zeros(1, 1, 1)

    def masked_lora(layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        out = layer.base_layer(x)
        update = (x.to(a.dtype) @ a.t()) @ b.t() * layer.scaling["default"]
        return out + (update * mask).to(out.dtype)

    def decode(step: Any, n: int) -> tuple[list[list[int]], list[float]]:
        ids = prompt.expand(n, -1)
        cache = StaticCache(config=model.config, max_cache_len=length + tokens + 1)
        logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(length),
                       use_cache=True).logits[:, -1, :]  # the prompt eagerly: only the step is compiled
        nxt = logits.argmax(-1, keepdim=True)
        out, times = [nxt[:, 0].tolist()], []
        for i in range(tokens):
            t0 = time.perf_counter()
            logits = step(nxt, torch.full((n, 1), length + i), torch.tensor([length + i]), cache)
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt[:, 0].tolist())
            times.append(time.perf_counter() - t0)
        return out, times

    def step(token: Any, position: Any, cache_position: Any, cache: Any) -> Any:
        return model(input_ids=token, position_ids=position, past_key_values=cache, cache_position=cache_position,
                     use_cache=True).logits[:, -1, :]

    def generated(side: str) -> list[int]:  # may stop early: compared as a prefix
        adapter_off = model.disable_adapter() if lora and side == "base" else contextlib.nullcontext()
        with adapter_off:
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=tokens + 1)[0, length:].tolist()

    results = {}
    with torch.inference_mode(), inductor.patch(freezing=True):
        reference = {side: generated(side) for side in {side for shape in shapes for side in shape}}
        for shape in shapes:
            mask = torch.tensor([float(side == "tuned") for side in shape]).view(-1, 1, 1)
            with forward_swap.swapped(lora, masked_lora):
                eager_tokens, eager_times = decode(step, len(shape))
                compiled_tokens, times = decode(torch.compile(step, dynamic=False), len(shape))
            torch._dynamo.reset()
            results[shape] = {"compile_s": times[0], "step_ms": statistics.median(times[2:]) * 1e3,
                              "eager_step_ms": statistics.median(eager_times) * 1e3,
                              "same_tokens": compiled_tokens == eager_tokens,
                              "rows": [list(row) for row in zip(*eager_tokens)],
                              "eager_equals_generate": all(
                                  list(row[:len(reference[side])]) == reference[side]
                                  for side, row in zip(shape, zip(*eager_tokens)))}
    return results


PAIR_PROMPTS = [PROMPT, [{"role": "user", "content": "Why is the sky blue?"}],
                [{"role": "system", "content": "You are a helpful assistant who answers in detail."},
                 {"role": "user", "content": "Explain how a refrigerator works, step by step, for a curious ten "
                                             "year old who likes science."}]]


def compiled_pair(engine: Any, tokens: int, repeats: int = 4) -> dict[str, Any]:
    """Compare's pair (`answer_pairs`, greedy) with `pair_graph`'s compiled step against the eager pair, in this
    process: the compile's seconds (in its background thread, the engine idle), whether every step's logits are
    equal bit for bit on each of PAIR_PROMPTS (and the answers), then ms per pair step of both, interleaved
    eager / compiled `repeats` times on the first prompt (median, and each run)."""
    import torch

    from phi3_lora.speed import pair_graph
    from phi3_lora.generate import GenerationSettings

    class Steps:  # a StoppingCriteria that stops nothing and keeps each step's logits
        def __init__(self) -> None:
            self.logits: list[Any] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            self.logits.append(scores.clone())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    settings = GenerationSettings(temperature=0, max_new_tokens=tokens)
    before = os.environ.get(pair_graph.ENV)

    def answer(on: bool, history: Any, record: Any = None) -> tuple[tuple[str, str], float]:
        os.environ[pair_graph.ENV] = "1" if on else "0"
        t0 = time.perf_counter()
        pair = engine.answer_pairs([history], settings, [record] if record else None)[0]
        return pair, time.perf_counter() - t0

    try:
        answer(True, PROMPT)  # starts the compile
        ready = engine._compiled_pair.wait()
        out: dict[str, Any] = {"ready": ready, "compile_s": engine._compiled_pair.compile_s,
                               "failed": engine._compiled_pair.failed, "faithful": []}
        if not ready:
            return out
        for history in PAIR_PROMPTS:
            eager, fast = Steps(), Steps()
            (a, _), (b, _) = answer(False, history, eager), answer(True, history, fast)
            out["faithful"].append({"prompt_tokens": len(engine.prompt_ids(history)), "steps": len(fast.logits),
                                    "same_answers": a == b, "rows_differ": a[0] != a[1],
                                    "same_logits": len(eager.logits) == len(fast.logits) and all(
                                        torch.equal(x, y) for x, y in zip(eager.logits, fast.logits))})
        count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        runs: dict[str, list[float]] = {"eager": [], "compiled": []}
        served = engine._compiled_pair.served
        for _ in range(repeats):
            for side, on in (("eager", False), ("compiled", True)):
                pair, seconds = answer(on, PROMPT)
                runs[side].append(seconds * 1e3 / max(map(count, pair), default=1))
        out["served"] = engine._compiled_pair.served - served  # == repeats: every compiled run switched over
        out["ms"] = runs
        return out
    finally:
        if before is None:
            os.environ.pop(pair_graph.ENV, None)
        else:
            os.environ[pair_graph.ENV] = before


def report(model_dir: str, tokens: int, compiled: bool, pair: bool = False) -> dict[str, Any]:
    import torch

    from bench.generation import save_random_adapter
    from phi3_lora.generate import ChatEngine

    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_random_adapter(Path(model_dir), Path(tmp) / "adapter", four_bit=False)
        engine = ChatEngine(model_dir, adapter, load_in_4bit=False)
        step_bytes = bytes_per_step(engine.base)
        bandwidth = read_bandwidth_gbs()
        out: dict[str, Any] = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
                               "dtype": str(engine.base.dtype),
                               "bandwidth_gbs": bandwidth, "bytes_per_step": step_bytes,
                               "ceiling_steps_per_s": ceiling_steps_per_s(step_bytes, bandwidth),
                               "products_ms": {rows: products_ms(engine.base, rows) for rows in (1, 2)},
                               "measured_ms": measured_step_ms(engine, tokens)}
        if pair:
            out["compiled_pair"] = compiled_pair(engine, tokens)
        del engine
        if compiled:
            out["compiled"] = compiled_static_steps(model_dir, tokens, adapter=adapter)
    out["load_after"] = os.getloadavg()[0]
    return out


SHAPE_NAMES = {("base",): "one row (base)", ("base", "base"): "2 rows, base on both",
               ("base", "tuned"): "pair (base + tuned, the LoRA update masked per row)"}


def markdown(r: dict[str, Any]) -> str:
    floor_ms = 1e3 / r["ceiling_steps_per_s"]
    lines = [f"{r['threads']} threads (1-minute load {r['load_before']:.2f} before, {r['load_after']:.2f} after), "
             f"{r['dtype']}: read bandwidth {r['bandwidth_gbs']:.1f} GB/s, "
             f"{r['bytes_per_step'] / 1e6:.0f} MB of Linear weights per step: at best {floor_ms:.1f} ms a step, "
             f"{r['ceiling_steps_per_s']:.1f} tokens/s per side. The step's Linear products alone (packed, as "
             f"Compare runs them): " + ", ".join(f"{ms:.1f} ms at {rows} row{'s' if rows > 1 else ''}"
                                                 for rows, ms in r["products_ms"].items()) + ".", "",
             "| step | ms per token | tokens/s per side | of the ceiling |", "| --- | ---: | ---: | ---: |"]
    for side, ms in r["measured_ms"].items():
        lines.append(f"| {side} | {ms:.1f} | {1e3 / ms:.1f} | {floor_ms / ms:.0%} |")
    for shape, c in r.get("compiled", {}).items():
        what = SHAPE_NAMES.get(shape, " + ".join(shape))
        lines.append(f"| {what}, StaticCache, eager (same tokens as generate: "
                     f"{'yes' if c['eager_equals_generate'] else 'no'}) | {c['eager_step_ms']:.1f} | "
                     f"{1e3 / c['eager_step_ms']:.1f} "
                     f"| {floor_ms / c['eager_step_ms']:.0%} |")
        lines.append(f"| {what}, StaticCache, torch.compile (compiled in {c['compile_s']:.0f} s; same tokens as "
                     f"eager: {'yes' if c['same_tokens'] else 'no'}) | {c['step_ms']:.1f} | {1e3 / c['step_ms']:.1f} "
                     f"| {floor_ms / c['step_ms']:.0%} |")
    if "compiled_pair" in r:
        lines += ["", _pair_markdown(r["compiled_pair"])]
    return "\n".join(lines)


def _pair_markdown(c: dict[str, Any]) -> str:
    if not c["ready"]:
        return f"Compiled pair step: not ready ({c['failed'] or 'not offered for this model'})."
    faithful = "; ".join(f"{f['prompt_tokens']}-token prompt, {f['steps']} steps: logits "
                         f"{'equal' if f['same_logits'] else 'DIFFER'}, answers "
                         f"{'equal' if f['same_answers'] else 'DIFFER'}" for f in c["faithful"])
    lines = [f"Compiled pair step (pair_graph): compiled in {c['compile_s']:.0f} s; {faithful}; "
             f"{c['served']} of the timed compiled runs switched over.", "",
             "| pair step | median ms | runs (ms) | tokens/s per side |", "| --- | ---: | --- | ---: |"]
    for side, ms in c["ms"].items():
        median = statistics.median(ms)
        lines.append(f"| {side} | {median:.1f} | {' '.join(f'{m:.1f}' for m in ms)} | {1e3 / median:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from phi3_lora import embedded

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--compiled", action="store_true", help="also time a torch.compile'd static-cache step")
    parser.add_argument("--compiled-pair", action="store_true",
                        help="also Compare's faithful compiled pair step (phi3_lora/speed/pair_graph.py) against eager")
    args = parser.parse_args(argv)
    model_dir = args.model or str(embedded.embedded_model_dir())
    print(markdown(report(model_dir, args.tokens, args.compiled, args.compiled_pair)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
