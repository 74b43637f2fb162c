"""The bench's chat-length mix: how many Phi-3 tokens one conversation has (lognormal, median 300, mean ~430,
24-2,000 tokens). The training rows (train_speed.chat_rows) and the attention bench's packs
(attn_kernels.mix_lengths) both draw from it, so the attention bench times the packs the training rows make."""

from __future__ import annotations

import math
import random

MEDIAN_TOKENS = 300
SIGMA = 0.85  # mean = median * exp(sigma^2 / 2) ~ 430
MIN_TOKENS, MAX_TOKENS = 24, 2000


def token_count(rng: random.Random) -> int:
    """One conversation's token count."""
    return min(MAX_TOKENS, max(MIN_TOKENS, int(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA))))
