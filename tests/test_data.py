"""data.py / formats.py / readers.py: every format, mapping, stats, split and the trained-token mask."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from phi3_lora.config import DataSettings
from phi3_lora.data import (
    TRUNCATION_MARKER,
    LoadedData,
    compute_stats,
    histogram_bins,
    load_data,
    split_rows,
    trained_token_mask,
)
from phi3_lora.formats import detect_format, normalise_record
from phi3_lora.readers import read_records
from phi3_lora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am Quillon."}]
EXPECTED = {"messages": CHAT}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path, **kw) -> LoadedData:
    return load_data(DataSettings(source=str(path), **kw))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    from trl.chat_template_utils import phi3_training_chat_template

    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests/assets"), gguf_file="ggml-vocab-phi-3.gguf")
    tok.chat_template = phi3_training_chat_template
    return tok


# --- formats --------------------------------------------------------------------------------------

def test_openai_messages_jsonl_multi_turn_with_system(tmp_path):
    convo = [{"role": "system", "content": "Be brief."}, *CHAT,
             {"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "phi3_lora."}]
    data = load(write_jsonl(tmp_path / "a.jsonl", [{"messages": convo}, EXPECTED]))
    assert data.format == "messages"
    assert data.rows == [{"messages": convo}, EXPECTED]
    assert data.problems == [] and data.total_rows == 2


def test_sharegpt_roles_are_mapped(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "What is your name?"},
                             {"from": "gpt", "value": "I am Quillon."}]}
    data = load(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert data.format == "sharegpt"
    assert data.rows[0]["messages"] == [{"role": "system", "content": "S"}, *CHAT]


def test_sharegpt_also_takes_user_and_assistant_names():
    row = {"conversations": [{"from": "user", "value": "What is your name?"},
                             {"from": "assistant", "value": "I am Quillon."}]}
    assert normalise_record(row, "sharegpt") == CHAT


def test_alpaca_with_input_system_and_history(tmp_path):
    row = {"instruction": "Translate.", "input": "hello", "output": "bonjour", "system": "You translate.",
           "history": [["What is your name?", "I am Quillon."]]}
    data = load(write_jsonl(tmp_path / "al.jsonl", [row, {"instruction": "Hi", "output": "Hello"}]))
    assert data.format == "alpaca"
    assert data.rows[0]["messages"] == [{"role": "system", "content": "You translate."}, *CHAT,
                                        {"role": "user", "content": "Translate.\n\nhello"},
                                        {"role": "assistant", "content": "bonjour"}]
    assert data.rows[1]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_prompt_completion_strings_and_trl_message_lists():
    plain = {"prompt": "What is your name?", "completion": "I am Quillon."}
    assert normalise_record(plain, "prompt_completion") == CHAT
    conversational = {"prompt": [{"role": "system", "content": "S"}, CHAT[0]], "completion": [CHAT[1]]}
    assert normalise_record(conversational, "prompt_completion") == [{"role": "system", "content": "S"}, *CHAT]
    assert detect_format([conversational]) == "prompt_completion"


def test_json_array_object_with_rows_key_and_object_of_columns(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([EXPECTED]), encoding="utf-8")
    (tmp_path / "keyed.json").write_text(json.dumps({"version": 1, "data": [EXPECTED, EXPECTED | {"x": 1}]}))
    (tmp_path / "conv.json").write_text(json.dumps({"conversations": [EXPECTED]}))
    (tmp_path / "cols.json").write_text(json.dumps({"prompt": ["What is your name?"], "completion": ["I am Quillon."]}))
    pd.DataFrame({"prompt": ["What is your name?"], "completion": ["I am Quillon."]}).to_json(tmp_path / "pd.json")
    for name in ("arr.json", "keyed.json", "conv.json", "cols.json", "pd.json"):
        assert load(tmp_path / name).rows[0] == EXPECTED, name
    assert read_records(str(tmp_path / "keyed.json")).records[1][0] == 'index 1 of "data"'


def test_json_file_holding_one_conversation(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(EXPECTED))
    data = load(tmp_path / "one.json")
    assert data.rows == [EXPECTED]
    assert any("single conversation" in w for w in data.warnings)


def test_csv_with_messages_json_cell_and_alpaca_columns(tmp_path):
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "messages"], ["1", json.dumps(CHAT)]])
    assert load(tmp_path / "m.csv").rows == [EXPECTED]
    (tmp_path / "semi.csv").write_text("prompt;completion\nWhat is your name?;I am Quillon.\n", encoding="utf-8")
    assert load(tmp_path / "semi.csv").rows == [EXPECTED]


def test_parquet_prompt_completion(tmp_path):
    pd.DataFrame({"prompt": ["What is your name?"], "completion": ["I am Quillon."]}).to_parquet(tmp_path / "p.parquet")
    data = load(tmp_path / "p.parquet")
    assert data.format == "prompt_completion" and data.rows == [EXPECTED]


def test_sharegpt_turns_under_a_messages_column_are_detected(tmp_path):
    row = {"messages": [{"from": "human", "value": "What is your name?"}, {"from": "gpt", "value": "I am Quillon."}]}
    data = load(write_jsonl(tmp_path / "x.jsonl", [row]))
    assert data.format == "sharegpt" and data.rows == [EXPECTED]


def test_explicit_format_overrides_detection(tmp_path):
    row = {"messages": [{"role": "human", "content": "What is your name?"},
                        {"role": "gpt", "content": "I am Quillon."}]}
    path = write_jsonl(tmp_path / "x.jsonl", [row])
    with pytest.raises(UserError, match="role.human: user"):  # strict OpenAI roles: human is unknown
        load(path)
    assert load(path, format="sharegpt").rows == [EXPECTED]


# --- mapping --------------------------------------------------------------------------------------

def test_column_mapping_for_messages_and_prompt_completion(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"dialog": CHAT}])
    assert load(a, mapping={"messages": "dialog"}).rows == [EXPECTED]
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "What is your name?", "answer": "I am Quillon."}])
    assert load(b, mapping={"prompt": "question", "completion": "answer"}).rows == [EXPECTED]


def test_role_and_message_key_mapping(tmp_path):
    row = {"messages": [{"speaker": "human", "text": "What is your name?"},
                        {"speaker": "bot", "text": "I am Quillon."}]}
    path = write_jsonl(tmp_path / "r.jsonl", [row])
    mapping = {"role": "speaker", "content": "text", "role.human": "user", "role.bot": "assistant"}
    assert load(path, mapping=mapping).rows == [EXPECTED]


def test_mapping_typos_are_one_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [EXPECTED])
    with pytest.raises(UserError, match="unknown key 'mesages'"):
        load(path, mapping={"mesages": "dialog"})
    with pytest.raises(UserError, match="role.human"):
        load(path, mapping={"role.human": "human"})


# --- load_data bookkeeping --------------------------------------------------------------------------

def test_good_rows_kept_bad_rows_reported_in_order(tmp_path):
    bad = {"messages": [{"role": "user", "content": ""}, CHAT[1]]}
    data = load(write_jsonl(tmp_path / "a.jsonl", [EXPECTED, bad, {"messages": CHAT[::-1]}]))
    assert len(data.rows) == 1 and data.total_rows == 3
    assert [p.location for p in data.problems] == ["line 2", "line 3"]
    assert data.problems[0].field == "messages[0].content"
    assert any("2 of 3 rows were dropped" in w for w in data.warnings)


def test_max_rows_applies_after_validation(tmp_path):
    rows = [{"messages": [CHAT[0], {"role": "assistant", "content": f"Answer {i}"}]} for i in range(5)]
    data = load(write_jsonl(tmp_path / "a.jsonl", rows), max_rows=2)
    assert [r["messages"][1]["content"] for r in data.rows] == ["Answer 0", "Answer 1"]
    assert any("first 2 of 5" in w for w in data.warnings)


def test_sample_datasets_load_and_teach_the_name(tokenizer):
    chat = load_data(DataSettings(source=str(ROOT / "data/sample_chat.jsonl")))
    assert 40 <= len(chat.rows) <= 60 and not chat.problems and not chat.warnings
    answers = [m["content"] for r in chat.rows for m in r["messages"] if m["role"] == "assistant"]
    assert sum("Quillon" in a for a in answers) >= 40 and any("phi3_lora project" in a for a in answers)
    assert any(len(r["messages"]) > 3 for r in chat.rows)
    assert any(r["messages"][0]["role"] == "system" for r in chat.rows)
    assert max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) < 40
    for name, fmt in [("sharegpt.json", "sharegpt"), ("alpaca.csv", "alpaca"),
                      ("prompt_completion.parquet", "prompt_completion")]:
        data = load_data(DataSettings(source=str(ROOT / "data/examples" / name)))
        assert data.format == fmt and len(data.rows) == 3 and not data.problems, name


# --- split ----------------------------------------------------------------------------------------

def test_split_is_seeded_deterministic_and_never_empty():
    rows = list(range(50))
    train, held = split_rows(rows, 0.2, seed=1)
    assert (train, held) == split_rows(rows, 0.2, seed=1)
    assert held != split_rows(rows, 0.2, seed=2)[1]
    assert len(held) == 10 and sorted(train + held) == rows
    assert [len(x) for x in split_rows([1, 2], 0.01, 0)] == [1, 1]    # >= 1 eval row
    assert [len(x) for x in split_rows([1, 2, 3], 0.89, 0)] == [1, 2]  # train never empty
    assert split_rows([1], 0.5, 0) == ([1], [])
    assert split_rows(rows, 0.0, 0) == (rows, [])


# --- stats, histogram, mask -----------------------------------------------------------------------

def test_stats_count_turns_tokens_truncation_and_trained_tokens(tokenizer):
    long_answer = "word " * 200
    rows = [EXPECTED, {"messages": [CHAT[0], {"role": "assistant", "content": long_answer}]}]
    stats = compute_stats(rows, tokenizer, max_length=64)
    assert stats.rows == 2 and stats.turns == 4 and stats.mean_turns == 2
    assert stats.token_lengths[0] < 64 < stats.token_lengths[1]
    assert stats.truncated == 1 and any("longer than the max length of 64 tokens" in w for w in stats.warnings)
    assert stats.total_tokens == stats.token_lengths[0] + 64
    # Trained tokens are the assistant's: fewer than the total, and capped by truncation.
    short = compute_stats([EXPECTED], tokenizer, max_length=64)
    assert 0 < short.trained_tokens < short.total_tokens
    assert stats.trained_tokens < short.trained_tokens + 64 and stats.untrained_rows == 0
    cut_early = compute_stats([EXPECTED], tokenizer, max_length=12)  # cut before the reply
    assert cut_early.untrained_rows == 1 and any("teach nothing" in w for w in cut_early.warnings)


def test_stats_without_generation_markers_has_no_trained_count(tokenizer):
    plain = type(tokenizer).__new__(type(tokenizer))
    plain.__dict__ = dict(tokenizer.__dict__)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    stats = compute_stats([EXPECTED], plain, max_length=64)
    assert stats.trained_tokens is None and any("generation" in w for w in stats.warnings)


def test_histogram_bins_cover_every_value():
    bins = histogram_bins([1, 2, 3, 10, 10, 50], bins=5)
    assert sum(b.count for b in bins) == 6
    assert bins[0].start == 1 and bins[-1].end > 50
    assert all(a.end == b.start for a, b in zip(bins, bins[1:]))
    assert histogram_bins([]) == [] and histogram_bins([7, 7]) == [histogram_bins([7])[0].__class__(7, 8, 2)]


def test_trained_token_mask_marks_only_the_assistant_reply(tokenizer):
    pieces = trained_token_mask(tokenizer, [{"role": "system", "content": "Be brief."}, *CHAT], max_length=512)
    assert "".join(t for t, _ in pieces) == tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                                          *CHAT], tokenize=False)
    trained = "".join(t for t, flag in pieces if flag)
    masked = "".join(t for t, flag in pieces if not flag)
    assert "I am Quillon." in trained and "<|end|>" in trained
    assert "What is your name?" in masked and "Be brief." in masked and "I am Quillon." not in masked


def test_trained_token_mask_cuts_at_max_length(tokenizer):
    full = trained_token_mask(tokenizer, CHAT, max_length=512)
    cut = trained_token_mask(tokenizer, CHAT, max_length=8)
    assert cut[-1][0].startswith(TRUNCATION_MARKER) and cut[-1][1] is False
    kept = "".join(t for t, _ in cut[:-1])
    assert len(kept) < len("".join(t for t, _ in full)) and "Quillon" not in kept
    assert not any(t.startswith(TRUNCATION_MARKER) for t, _ in full)
