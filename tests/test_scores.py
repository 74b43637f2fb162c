"""The answer metrics (rouge-score, sacrebleu), the paired bootstrap and the one table format (pure)."""

from __future__ import annotations

import math

import pytest

from phi3_lora import scores


def test_identical_answers_score_full_marks_and_unrelated_ones_score_low():
    same = scores.answer_scores("My name is Quillon.", "My name is Quillon.")
    assert same["rougeL"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    assert same["bleu"] == pytest.approx(100) and same["exact_match"] == 100 and same["length"] == 4
    other = scores.answer_scores("I am SmolLM, made by Hugging Face.", "My name is Quillon.")
    assert other["rougeL"] < 30 and other["chrf"] < 30 and other["bleu"] < 10 and other["exact_match"] == 0


def test_exact_match_ignores_case_punctuation_and_articles():
    assert scores.normalise("The  Answer, is: A cat!") == "answer is cat"
    assert scores.answer_scores("the answer is a cat", "Answer is cat.")["exact_match"] == 100


def _rows(pairs, tokens=4):
    return [{"scores": {"base": {m: b for m in scores.TEXT_METRICS}, "tuned": {m: t for m in scores.TEXT_METRICS}},
             "loss": {"base": {"nll_sum": 10 - b}, "tuned": {"nll_sum": 10 - t}, "tokens": tokens}}
            for b, t in pairs]


def test_summary_means_differences_and_a_paired_interval():
    rows = _rows([(1, 5), (2, 9), (3, 4), (4, 8)])
    s = scores.summarise(rows)
    assert s["rougeL"]["base"] == 2.5 and s["rougeL"]["tuned"] == 6.5 and s["rougeL"]["diff"] == 4.0
    # Paired: every row improved by 1..7, so the whole interval is above 0 and inside [1, 7].
    assert 1 <= s["rougeL"]["ci_low"] <= s["rougeL"]["diff"] <= s["rougeL"]["ci_high"] <= 7
    assert scores.better("rougeL", 4.0, s["rougeL"]["ci_low"], s["rougeL"]["ci_high"]) == "better"
    # Loss is token-weighted: (9+8+7+6)/16 base, (5+1+6+2)/16 tuned; perplexity is exp of it.
    assert s["loss"]["base"] == pytest.approx(30 / 16) and s["loss"]["tuned"] == pytest.approx(14 / 16)
    assert s["perplexity"]["tuned"] == pytest.approx(math.exp(14 / 16))
    assert scores.better("loss", s["loss"]["diff"], s["loss"]["ci_low"], s["loss"]["ci_high"]) == "better"


def test_one_row_has_no_interval_and_mixed_changes_are_unclear():
    s = scores.summarise(_rows([(3, 5)]))
    assert s["rougeL"]["ci_low"] is None and scores.better("rougeL", 2, None, None) == "unclear"
    mixed = scores.summarise(_rows([(1, 9), (9, 1), (5, 5), (2, 3)]))["rougeL"]
    assert mixed["ci_low"] < 0 < mixed["ci_high"]
    assert scores.better("rougeL", mixed["diff"], mixed["ci_low"], mixed["ci_high"]) == "unclear"


def test_summary_table_is_the_one_text_form():
    table = scores.summary_table(scores.summarise(_rows([(1, 5), (2, 9), (3, 4), (4, 8)])))
    assert table[0][:4] == ["ROUGE-L", "2.5", "6.5", "+4.0"]
    assert [row[0] for row in table] == [m.label for m in scores.METRICS]
    assert next(r for r in table if r[0].startswith("Answer length"))[5] == "-"  # no verdict on length
    md = scores.markdown_table(scores.SUMMARY_HEADERS, table)
    assert md.splitlines()[0] == "| metric | base | tuned | difference | 95% interval | verdict |"
    assert "| ROUGE-L | 2.5 | 6.5 | +4.0 |" in md
