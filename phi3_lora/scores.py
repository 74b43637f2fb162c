"""Scores of one answer against its reference, and base-vs-tuned summaries over rows (pure functions).

The text metrics come from the libraries the field reports with: ROUGE-L from Google's `rouge-score`,
chrF and BLEU from `sacrebleu` (sentence level, its default exponential smoothing). Exact match compares
normalised text (lower case, no punctuation, no articles, single spaces: the SQuAD normalisation). All
four are on a 0-100 scale so one table and one chart hold them. The reference loss is the mean negative
log-likelihood per reference token (computed in evaluate.py); perplexity is exp of the token-weighted loss.

The 95% interval of each difference is a paired bootstrap over rows (scipy.stats.bootstrap, percentile).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Metric:
    name: str               # key in the result JSON
    label: str              # how tables and charts name it
    higher_is_better: bool | None  # None: no better or worse (answer length)
    digits: int             # decimals shown
    chart: bool             # on the 0-100 bar chart


METRICS: tuple[Metric, ...] = (
    Metric("rougeL", "ROUGE-L", True, 1, True),
    Metric("chrf", "chrF", True, 1, True),
    Metric("bleu", "BLEU", True, 1, True),
    Metric("exact_match", "Exact match %", True, 1, True),
    Metric("length", "Answer length (words)", None, 1, False),
    Metric("loss", "Reference loss (per token)", False, 3, False),
    Metric("perplexity", "Reference perplexity", False, 2, False),
)
BY_NAME = {m.name: m for m in METRICS}
TEXT_METRICS = ("rougeL", "chrf", "bleu", "exact_match", "length")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, punctuation and English articles removed, whitespace collapsed (SQuAD's answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def answer_scores(answer: str, reference: str) -> dict[str, float]:
    """ROUGE-L F1, chrF, BLEU, exact match (each 0-100) and the answer's length in words."""
    import sacrebleu

    return {
        "rougeL": 100 * _rouge().score(reference, answer)["rougeL"].fmeasure,
        "chrf": sacrebleu.sentence_chrf(answer, [reference]).score,
        "bleu": sacrebleu.sentence_bleu(answer, [reference]).score,
        "exact_match": 100.0 if normalise(answer) == normalise(reference) else 0.0,
        "length": float(len(answer.split())),
    }


# --- summaries -------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _perplexity(nll_sums: Sequence[float], tokens: Sequence[float]) -> float:
    total = sum(tokens)
    return math.exp(min(sum(nll_sums) / total, 50.0)) if total else math.nan


def _loss(nll_sums: Sequence[float], tokens: Sequence[float]) -> float:
    total = sum(tokens)
    return sum(nll_sums) / total if total else math.nan


def _statistic(name: str) -> tuple[Callable[..., float], int]:
    """The summary statistic of a metric and how many per-row arrays it reads."""
    if name == "loss":
        return _loss, 2
    if name == "perplexity":
        return _perplexity, 2
    return _mean, 1


def paired_interval(base: Sequence[Sequence[float]], tuned: Sequence[Sequence[float]],
                    statistic: Callable[..., float], resamples: int = 2000,
                    seed: int = 0) -> tuple[float | None, float | None]:
    """95% percentile-bootstrap interval of statistic(tuned) - statistic(base), resampling rows in pairs.

    `base` and `tuned` are lists of per-row arrays (one array for a mean; nll sums and token counts for a loss).
    None, None with fewer than 2 rows, where resampling says nothing."""
    import numpy as np
    from scipy.stats import bootstrap

    n = len(base[0])
    if n < 2:
        return None, None
    k = len(base)

    def diff(*arrays: Any, axis: int = -1) -> Any:
        b, t = arrays[:k], arrays[k:]
        return _vector(statistic, t, axis) - _vector(statistic, b, axis)

    data = tuple(np.asarray(a, dtype=float) for a in (*base, *tuned))
    if all(np.allclose(data[i], data[i + k]) for i in range(k)):
        return 0.0, 0.0  # identical answers: no difference to resample (and scipy warns on a degenerate sample)
    res = bootstrap(data, diff, paired=True, vectorized=True, n_resamples=resamples, confidence_level=0.95,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _vector(statistic: Callable[..., float], arrays: Sequence[Any], axis: int) -> Any:
    """statistic over the last axis of numpy arrays (the bootstrap passes a batch of resamples at once)."""
    import numpy as np

    if statistic is _mean:
        return np.mean(arrays[0], axis=axis)
    loss = np.sum(arrays[0], axis=axis) / np.sum(arrays[1], axis=axis)
    return np.exp(np.minimum(loss, 50.0)) if statistic is _perplexity else loss


def per_row_values(rows: Sequence[dict[str, Any]], side: str, name: str) -> list[list[float]]:
    """The per-row arrays a metric's statistic reads, for side 'base' or 'tuned'."""
    if name in ("loss", "perplexity"):
        return [[r["loss"][side]["nll_sum"] for r in rows], [r["loss"]["tokens"] for r in rows]]
    return [[r["scores"][side][name] for r in rows]]


def summarise(rows: Sequence[dict[str, Any]], resamples: int = 2000) -> dict[str, dict[str, float | None]]:
    """metric -> {base, tuned, diff, ci_low, ci_high} over the scored rows (rows with a loss for the loss rows)."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        used = [r for r in rows if r.get("loss")] if metric.name in ("loss", "perplexity") else list(rows)
        if not used:
            continue
        statistic, _ = _statistic(metric.name)
        base, tuned = per_row_values(used, "base", metric.name), per_row_values(used, "tuned", metric.name)
        b, t = statistic(*base), statistic(*tuned)
        low, high = paired_interval(base, tuned, statistic, resamples)
        out[metric.name] = {"base": b, "tuned": t, "diff": t - b, "ci_low": low, "ci_high": high}
    return out


def better(name: str, diff: float | None, low: float | None, high: float | None) -> str:
    """'better' / 'worse' when the whole interval is on one side of 0, else 'unclear' ('-' for a length)."""
    if BY_NAME[name].higher_is_better is None:
        return "-"
    if diff is None or low is None or high is None:
        return "unclear"
    good = BY_NAME[name].higher_is_better
    if (low > 0 and good) or (high < 0 and not good):
        return "better"
    if (high < 0 and good) or (low > 0 and not good):
        return "worse"
    return "unclear"


# --- how numbers are written (one place, so the CLI, the app and the model card agree) -------------

def fmt(name: str, value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    digits = BY_NAME[name].digits
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


SUMMARY_HEADERS = ("metric", "base", "tuned", "difference", "95% interval", "verdict")


def summary_table(summary: dict[str, dict[str, float | None]]) -> list[list[str]]:
    """The summary as rows of strings, in METRICS order (the same strings everywhere they are shown)."""
    table = []
    for metric in METRICS:
        s = summary.get(metric.name)
        if s is None:
            continue
        interval = ("-" if s["ci_low"] is None else
                    f"[{fmt(metric.name, s['ci_low'], True)}, {fmt(metric.name, s['ci_high'], True)}]")
        table.append([metric.label, fmt(metric.name, s["base"]), fmt(metric.name, s["tuned"]),
                      fmt(metric.name, s["diff"], True), interval,
                      better(metric.name, s["diff"], s["ci_low"], s["ci_high"])])
    return table


RUNS_METRICS = ("rougeL", "chrf", "bleu", "loss")
RUNS_HEADERS = ("run", "rows", *(BY_NAME[m].label + " (base → tuned)" for m in RUNS_METRICS), "evaluated")


def runs_table(results: dict[str, dict[str, Any] | None]) -> list[list[str]]:
    """One row per run from its newest evaluation (run id -> result, None when it has none), to compare runs."""
    table = []
    for run_id, result in results.items():
        if result is None:
            table.append([run_id, "-", *("not evaluated" for _ in RUNS_METRICS), "-"])
            continue
        summary = result.get("summary", {})
        cells = []
        for name in RUNS_METRICS:
            s = summary.get(name)
            cells.append("-" if s is None else f"{fmt(name, s['base'])} → {fmt(name, s['tuned'])}")
        created = str(result.get("created") or "-")[:16].replace("T", " ")
        table.append([run_id, f"{len(result.get('rows', [])):,}", *cells, created])
    return table


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
