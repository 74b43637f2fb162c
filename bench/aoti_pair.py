"""Compare's compiled pair step as an AOTInductor package (speed/pair_artifact.py): compiled in a child process,
loaded here, checked bit for bit against the eager pair step, and timed.

    flock -x /tmp/phi3-cpu.lock python -m bench.aoti_pair [--cache DIR] [--tokens 64]

On the embedded model (float32) with a strong r8 all-linear adapter (the tuned row answers otherwise than the base
row): the first engine compiles the package in a child (into --cache, default a fresh folder), then a second
process loads it from there without compiling. Prints one JSON line: compile seconds (the child's export and
compile, and the whole wait), load seconds, whether every step's logits equal the eager pair's on each of
bench.cpu_ceiling.PAIR_PROMPTS, and ms per pair step (eager vs the loaded package, interleaved, median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def measure(model_dir: str, adapter: Path, tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from bench.cpu_ceiling import PAIR_PROMPTS, PROMPT
    from phi3_lora.config import ModelSettings
    from phi3_lora.generate import ChatEngine, GenerationSettings
    from phi3_lora.speed import pair_graph

    engine = ChatEngine(model_dir, adapter, model_settings=ModelSettings(name=model_dir, dtype="float32",
                                                                         load_in_4bit=False))
    pair = engine._compiled_pair
    settings = GenerationSettings(temperature=0, max_new_tokens=tokens)

    class Steps:
        def __init__(self) -> None:
            self.logits: list[Any] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            self.logits.append(scores.clone())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def answer(on: bool, history: Any, record: Any = None) -> tuple[tuple[str, str], float]:
        os.environ[pair_graph.ENV] = "1" if on else "0"
        t0 = time.perf_counter()
        out = engine.answer_pairs([history], settings, [record] if record else None)[0]
        return out, time.perf_counter() - t0

    t0 = time.perf_counter()
    answer(True, [{"role": "user", "content": "hi"}])  # starts the compile (or the load)
    ready = pair.wait()
    out: dict[str, Any] = {"ready": ready, "built": pair.built, "ready_s": time.perf_counter() - t0,
                           "failed": pair.failed, "faithful": []}
    if pair.package is not None:
        meta = json.loads((Path(pair.package).parent / "meta.json").read_text())
        out.update(export_s=meta["export_s"], compile_s=meta["compile_s"], width=meta["width"])
    if not ready:
        return out
    for history in PAIR_PROMPTS:
        eager, fast = Steps(), Steps()
        (a, _), (b, _) = answer(False, history, eager), answer(True, history, fast)
        out["faithful"].append({"steps": len(fast.logits), "same_answers": a == b, "rows_differ": a[0] != a[1],
                                "same_logits": len(eager.logits) == len(fast.logits) and all(
                                    torch.equal(x, y) for x, y in zip(eager.logits, fast.logits))})
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    runs: dict[str, list[float]] = {"eager": [], "loaded": []}
    served = pair.served
    for _ in range(repeats):
        for side, on in (("eager", False), ("loaded", True)):
            texts, seconds = answer(on, PROMPT)
            runs[side].append(round(seconds * 1e3 / max(map(count, texts), default=1), 1))
    out["served"] = pair.served - served
    out["ms_per_step"] = {side: statistics.median(ms) for side, ms in runs.items()}
    out["ms_runs"] = runs
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="phi3_lora cache folder for the package (default: a new one)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter", default=None, help=argparse.SUPPRESS)  # a measuring process's
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from phi3_lora import embedded
    from phi3_lora.threads import THREADS_ENV

    os.environ.setdefault(THREADS_ENV, "2")  # the shared machine's load must not pick the answers' thread count
    model_dir = args.model or str(embedded.embedded_model_dir())
    if args.adapter:
        print(json.dumps(measure(model_dir, Path(args.adapter), args.tokens, args.repeats)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.tiny_models import save_strong_adapter

    work = Path(tempfile.mkdtemp(prefix="aoti_pair_"))
    cache = Path(args.cache) if args.cache else work / "cache"
    adapter = save_strong_adapter(Path(model_dir), work / "adapter")
    env = {**os.environ, "PHI3_LORA_CACHE": str(cache)}
    results = {}
    for name in ("first process (compiles)", "second process (loads)"):
        done = subprocess.run([sys.executable, "-m", "bench.aoti_pair", "--adapter", str(adapter), "--model", model_dir, "--tokens",
                               str(args.tokens), "--repeats", str(args.repeats)], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, json.dumps(results[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
