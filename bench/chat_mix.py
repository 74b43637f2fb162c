"""The bench's chat-length mix: how many Phi-3 tokens one conversation has (lognormal, median 300, mean ~430,
24-2,000 tokens). The training rows (`chat_rows`, here) and the attention bench's packs
(attn_kernels.mix_lengths) both draw from it, so the attention bench times the packs the training rows make."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

MEDIAN_TOKENS = 300
SIGMA = 0.85  # mean = median * exp(sigma^2 / 2) ~ 430
MIN_TOKENS, MAX_TOKENS = 24, 2000
WORDS = ("the model learns a short answer from each turn of the chat while the adapter trains only a few "
         "matrices and the frozen weights stay in four bits on the card so memory is small").split()


def token_count(rng: random.Random) -> int:
    """One conversation's token count."""
    return min(MAX_TOKENS, max(MIN_TOKENS, int(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA))))


def chat_rows(kind: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations whose Phi-3 token counts follow the wanted distribution (about 1.3 tokens a word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = 3200 if kind == "full" else token_count(rng)
        words = max(4, int(tokens / 1.3))
        user, answer = max(2, words * 3 // 10), max(2, words - words * 3 // 10)
        rows.append({"messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(answer))}]})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bench_data(work: Path) -> dict[str, Path]:
    """Enough rows for the longest warm-up plus the timed steps (4 rows of 2048 tokens a step)."""
    return {"full": write_jsonl(chat_rows("full", 128), work / "full.jsonl"),
            "mix": write_jsonl(chat_rows("mix", 1024), work / "mix.jsonl")}
