"""Compare's whole answers, eager against the compiled pair package (speed/pair_artifact.py), as the app streams them.

    # the compile as a first app start pays it: answers meanwhile, and the memory of the app and its compiler
    flock -x /tmp/phi3-cpu.lock python -m bench.pair_answers --adapter RUN/adapter --cache DIR --phase compile
    # whole answers from the cached package, eager and package interleaved
    flock -x /tmp/phi3-cpu.lock python -m bench.pair_answers --adapter RUN/adapter --cache DIR --phase answers

On the embedded model (float32) with a run's adapter, through `ChatEngine.stream_pair` (Compare's path: its
worker thread, the streamer, the prompt's eager prefill). Tokens per second per side: the longer answer's tokens
(the side that streams to the end) over the pair answer's wall seconds; both sides share each step, so that is the
rate each side's text grows at while both stream. Prints one JSON line per answer and a summary (median, min, max).

`compile`: an empty package cache (--cache, a fresh folder); a greedy answer at a time is timed with the compile
off (no package: eager), then one answer starts the compile in a child process and answers go on, --pause
seconds apart, while it compiles (back to back, the nice-19 compiler got ~3% of a core and made no progress);
the app's and the child's resident memory (RSS) are sampled every half second throughout.
`answers`: the package is loaded from --cache (compiled by the `compile` phase), then each prompt is answered
--repeats times per mode, eager and package interleaved, greedy and with the app's sampling sliders moved
(temperature 0.7, top-p 0.9, seed 0: `generate`'s path, which the package does not serve), and the answers of both
modes are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "You are a helpful assistant who answers in detail."},
     {"role": "user", "content": "Explain how a refrigerator works, step by step, for a curious ten year old who "
                                 "likes science."}],
    [{"role": "user", "content": "What is your name?"}],
    [{"role": "user", "content": "Give me three tips for learning a new language."}],
]


class Memory:
    """Peak and last resident memory (MiB) of this process and of its children (the compiler), sampled."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = {"app": 0.0, "child": 0.0, "both": 0.0}
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def sample(self) -> tuple[float, float]:
        import psutil

        app = self.me.memory_info().rss / 2**20
        child = 0.0
        for c in self.me.children(recursive=True):
            try:
                child += c.memory_info().rss / 2**20
            except psutil.Error:
                pass
        return app, child

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            app, child = self.sample()
            self.samples.append((round(time.monotonic() - self._t0, 1), round(app), round(child)))
            for k, v in (("app", app), ("child", child), ("both", app + child)):
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> "Memory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def answer(engine: Any, history: Any, settings: Any, on: bool) -> dict[str, Any]:
    """One Compare answer (both sides), as the app streams it: wall seconds, tokens per side, the texts."""
    from phi3_lora.speed import pair_graph

    os.environ[pair_graph.ENV] = "1" if on else "0"
    pair = engine._compiled_pair
    steps = pair.steps
    t0 = time.perf_counter()
    base = tuned = ""
    for base, tuned in engine.stream_pair(history, history, settings):
        pass
    wall = time.perf_counter() - t0
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    tokens = [count(base), count(tuned)]
    return {"on": on, "wall_s": round(wall, 3), "tokens": tokens, "tok_s_per_side": round(max(tokens) / wall, 2),
            "package_steps": pair.steps - steps, "texts": [base, tuned]}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["tok_s_per_side"] for r in rows]
    return {"n": len(rates), "median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "wall_median_s": statistics.median(r["wall_s"] for r in rows)} if rates else {}


def compile_phase(engine: Any, settings: Any, eager_answers: int, pause: float) -> dict[str, Any]:
    pair = engine._compiled_pair
    out: dict[str, Any] = {"eager_before": [], "during": []}
    with Memory() as mem:
        out["rss_loaded_mib"] = round(mem.sample()[0])
        for i in range(eager_answers):
            out["eager_before"].append(answer(engine, PROMPTS[i % len(PROMPTS)], settings, on=False))
        t0 = time.monotonic()
        answer(engine, PROMPTS[0], settings.__class__(max_new_tokens=2), on=True)  # starts the compile
        i = 0
        while pair._thread is not None and pair._thread.is_alive():
            row = answer(engine, PROMPTS[i % len(PROMPTS)], settings, on=True)
            row["at_s"] = round(time.monotonic() - t0, 1)
            out["during"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
            i += 1
            time.sleep(pause)  # a user reading the answers: back to back, the nice-19 compiler gets no CPU
        pair.wait()
        out["ready_s"] = round(time.monotonic() - t0, 1)
        time.sleep(1.0)
        out["rss_after_load_mib"] = round(mem.sample()[0])
    out.update(built=pair.built, failed=pair.failed, peak_rss_mib={k: round(v) for k, v in mem.peak.items()},
               rss_samples=mem.samples[::10])
    if pair.package is not None:
        meta = json.loads((Path(pair.package).parent / "meta.json").read_text())
        out.update(export_s=meta["export_s"], compile_s=meta["compile_s"],
                   package_mib=round(meta["size"] / 2**20))
    out["eager_before_summary"], out["during_summary"] = summary(out["eager_before"]), summary(out["during"])
    return out


def answers_phase(engine: Any, settings: Any, repeats: int, sampling_repeats: int) -> dict[str, Any]:
    from phi3_lora.generate import GenerationSettings

    pair = engine._compiled_pair
    t0 = time.monotonic()
    answer(engine, PROMPTS[0], GenerationSettings(max_new_tokens=2), on=True)  # loads the package
    out: dict[str, Any] = {"ready": pair.wait(), "built": pair.built, "load_s": round(time.monotonic() - t0, 1)}
    sampled = GenerationSettings(temperature=0.7, top_p=0.9, seed=0, max_new_tokens=settings.max_new_tokens)
    for name, how, times in (("greedy", settings, repeats), ("sampling", sampled, sampling_repeats)):
        rows: dict[str, list[dict[str, Any]]] = {"eager": [], "package": []}
        same = True
        for history in PROMPTS:
            first = None
            for _ in range(times):
                for mode, on in (("eager", False), ("package", True)):
                    row = answer(engine, history, how, on)
                    rows[mode].append(row)
                    first = first or row["texts"]
                    same &= row["texts"] == first
                    print(json.dumps({"settings": name, "mode": mode, "prompt": history[-1]["content"][:30],
                                      **{k: v for k, v in row.items() if k != "texts"}}), flush=True)
        out[name] = {mode: summary(r) for mode, r in rows.items()}
        out[name]["answers_equal"] = same
        out[name]["package_steps"] = sum(r["package_steps"] for r in rows["package"])
        out[name]["tokens"] = [r["tokens"] for r in rows["eager"][::times]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a run's adapter folder (its base: the embedded model)")
    parser.add_argument("--cache", required=True, help="the phi3_lora cache folder the package goes to / comes from")
    parser.add_argument("--phase", choices=("compile", "answers"), required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="answers phase: greedy answers per prompt and mode")
    parser.add_argument("--sampling-repeats", type=int, default=1)
    parser.add_argument("--eager-answers", type=int, default=5, help="compile phase: eager answers before it")
    parser.add_argument("--pause", type=float, default=10.0, help="compile phase: seconds between answers")
    args = parser.parse_args(argv)
    os.environ["PHI3_LORA_CACHE"] = str(Path(args.cache).resolve())
    from phi3_lora.threads import THREADS_ENV

    os.environ.setdefault(THREADS_ENV, "2")  # the shared machine's load must not pick the answers' thread count
    from phi3_lora import embedded
    from phi3_lora.config import ModelSettings
    from phi3_lora.generate import ChatEngine, GenerationSettings

    model_dir = str(embedded.embedded_model_dir())
    engine = ChatEngine(model_dir, args.adapter, model_settings=ModelSettings(name=model_dir, dtype="float32",
                                                                              load_in_4bit=False))
    settings = GenerationSettings(max_new_tokens=args.tokens)  # the app's defaults: greedy
    if args.phase == "compile":
        result = compile_phase(engine, settings, args.eager_answers, args.pause)
    else:
        result = answers_phase(engine, settings, args.repeats, args.sampling_repeats)
    print(json.dumps({k: v for k, v in result.items() if k not in ("eager_before", "during")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
