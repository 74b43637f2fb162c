"""Generation speed: ChatEngine's base and tuned answers (tokens/s, time to first token) on the GPU and on this CPU
(Compare's pair included), and plain `generate` under the ways to make decoding faster (`--gen-explore`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import release_memory, sync


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
            sync()
            t0 = time.perf_counter()
            first = None
            text = ""
            for text in engine.stream(history, adapter=adapter, settings=settings):
                if first is None and text:
                    first = time.perf_counter() - t0
            sync()
            total = time.perf_counter() - t0
            n = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            r = {"side": side, "tokens": n, "seconds": total, "ttft_s": first or total,
                 "tokens_per_s": n / total if total else float("nan")}
            best = r if best is None or r["tokens_per_s"] > best["tokens_per_s"] else best
        out.append(best)
    if adapter_dir:  # the Compare tab: base and tuned answers from one generate call
        sync()
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
    release_memory()
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
    release_memory()
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
                sync()
                t0 = time.perf_counter()
                gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     **kw)
                sync()
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
    release_memory()
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
    release_memory()
    return out
