"""Bad data, library side: each case gives a precise report (file, line/row, field, what to do), never a traceback.

The shared cases in tests/bad_cases.py run here through phi3_lora.data and in tests/test_app_bad_inputs.py through
the app's upload endpoint; the tests below them pin the details of each message."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from phi3_lora import readers
from phi3_lora.config import DataSettings
from phi3_lora.data import LoadedData, load_data
from phi3_lora.readers import Problem
from phi3_lora.errors import UserError

from bad_cases import ASSISTANT, CASES, GOOD, MAX_LENGTH, USER, Case, write_csv, write_jsonl


def load(path: Path, **kw) -> LoadedData:
    return load_data(DataSettings(source=str(path), **kw))


def only_problem(tmp_path: Path, bad_row: object) -> Problem:
    """Load one good row and one bad row; return the report about the bad one (line 2)."""
    data = load(write_jsonl(tmp_path / "chats.jsonl", [GOOD, bad_row]))
    assert data.rows == [GOOD] and len(data.problems) == 1
    problem = data.problems[0]
    assert problem.source == "chats.jsonl" and problem.location == "line 2"
    assert str(problem).startswith("chats.jsonl, line 2, ")
    return problem


def refused(path: Path, **kw) -> str:
    with pytest.raises(UserError) as info:
        load(path, **kw)
    return str(info.value)


# --- content of a turn ----------------------------------------------------------------------------

def test_empty_content(tmp_path):
    p = only_problem(tmp_path, {"messages": [USER, {"role": "assistant", "content": ""}]})
    assert p.field == "messages[1].content" and "is empty" in p.message and "Write the text" in p.message


def test_whitespace_only_content(tmp_path):
    p = only_problem(tmp_path, {"messages": [{"role": "user", "content": " \n\t "}, ASSISTANT]})
    assert p.field == "messages[0].content" and "only whitespace" in p.message


@pytest.mark.parametrize("value, words", [(None, "null"), (42, "a number"), (["a", "b"], "a list"),
                                          ({"text": "hi"}, "an object")])
def test_non_string_content(tmp_path, value, words):
    p = only_problem(tmp_path, {"messages": [USER, {"role": "assistant", "content": value}]})
    assert p.field == "messages[1].content" and words in p.message and "not text" in p.message


def test_control_characters_in_content_are_reported(tmp_path):
    p = only_problem(tmp_path, {"messages": [{"role": "user", "content": "hi\x00there"}, ASSISTANT]})
    assert p.field == "messages[0].content" and "U+0000" in p.message and "Remove it" in p.message
    ok = {"messages": [{"role": "user", "content": "line one\nline\ttwo\r\n"}, ASSISTANT]}
    assert load(write_jsonl(tmp_path / "ok.jsonl", [ok])).rows == [ok]  # \n \t \r are fine


# --- roles and order ------------------------------------------------------------------------------

def test_unknown_role_hints_the_mapping(tmp_path):
    p = only_problem(tmp_path, {"messages": [{"role": "human", "content": "hi"}, ASSISTANT]})
    assert p.field == "messages[0].role" and "'human'" in p.message
    assert "role.human: user" in p.message and "sharegpt" in p.message


def test_two_user_turns_in_a_row(tmp_path):
    p = only_problem(tmp_path, {"messages": [USER, USER, ASSISTANT]})
    assert p.field == "messages[1].role" and "second user turn in a row" in p.message and "Merge" in p.message


def test_assistant_first(tmp_path):
    p = only_problem(tmp_path, {"messages": [ASSISTANT, USER, ASSISTANT]})
    assert p.field == "messages[0].role" and "before any user turn" in p.message


def test_system_not_first(tmp_path):
    p = only_problem(tmp_path, {"messages": [USER, {"role": "system", "content": "S"}, ASSISTANT]})
    assert p.field == "messages[1].role" and "system turn that is not first" in p.message


def test_no_assistant_turn(tmp_path):
    p = only_problem(tmp_path, {"messages": [{"role": "system", "content": "S"}, USER]})
    assert p.field == "messages" and "no assistant turn" in p.message


def test_last_turn_not_assistant_is_reported_not_silently_dropped(tmp_path):
    p = only_problem(tmp_path, {"messages": [USER, ASSISTANT, USER]})
    assert p.field == "messages[2].role" and "last turn" in p.message and "Add the assistant's reply" in p.message


# --- row shape ------------------------------------------------------------------------------------

def test_messages_not_a_list(tmp_path):
    p = only_problem(tmp_path, {"messages": {"role": "user", "content": "hi"}})
    assert p.field == "messages" and "not a list of messages" in p.message


def test_missing_known_columns_lists_columns_and_formats(tmp_path):
    message = refused(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]))
    assert "odd.jsonl" in message and "question, answer" in message
    for expected in ("messages", "sharegpt", "alpaca", "prompt_completion", "data.mapping"):
        assert expected in message


def test_row_missing_the_detected_column(tmp_path):
    p = only_problem(tmp_path, {"msgs": [USER, ASSISTANT]})
    assert p.field == "messages" and "msgs" in p.message and "data.mapping" in p.message


def test_malformed_json_line_among_good_ones(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"messages": [oops\n' + json.dumps(GOOD | {"x": 1}) + "\n")
    data = load(path)
    assert len(data.rows) == 1 and data.total_rows == 3  # the third line duplicates the first after normalising
    (p,) = data.problems
    assert (p.location, p.field) == ("line 2", "(row)") and "not valid JSON" in p.message and "character" in p.message


def test_top_level_scalar(tmp_path):
    (tmp_path / "n.json").write_text("42")
    message = refused(tmp_path / "n.json")
    assert "n.json" in message and "a number (42)" in message and "JSON array" in message
    p = only_problem(tmp_path, "just a string")
    assert p.field == "(row)" and "not an object" in p.message


def test_deeply_nested_json_does_not_crash(tmp_path):
    deep = "[" * 10_000 + "]" * 10_000
    (tmp_path / "deep.jsonl").write_text(json.dumps(GOOD) + "\n" + deep + "\n")
    (p,) = load(tmp_path / "deep.jsonl").problems
    assert p.location == "line 2" and "nested too deeply" in p.message
    (tmp_path / "deep.json").write_text(deep)
    assert "nested too deeply" in refused(tmp_path / "deep.json")


def test_50_mb_single_line_is_refused_quickly(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write('{"messages": [{"role": "user", "content": "' + "x" * (50 * 2**20) + '"}]}\n')
    start = time.perf_counter()
    data = load(path)
    assert time.perf_counter() - start < 10
    (p,) = data.problems
    assert p.location == "line 2" and "MB long" in p.message and "Split it" in p.message


# --- CSV ------------------------------------------------------------------------------------------

def test_csv_newlines_inside_quoted_fields_keep_spreadsheet_row_numbers(tmp_path):
    path = write_csv(tmp_path / "a.csv", [["prompt", "completion"], ["line one\nline two", "ok\nfine"],
                                          ["q", ""]])
    data = load(path)
    assert data.rows[0]["messages"][0]["content"] == "line one\nline two"
    (p,) = data.problems
    assert p.location == "row 3" and p.field == "completion"  # header is row 1; a multi-line cell is one row


def test_csv_field_over_default_size_limit_is_accepted(tmp_path):
    answer = "word " * 60_000  # 300 KB, over csv's default 128 KiB field limit
    data = load(write_csv(tmp_path / "big.csv", [["prompt", "completion"], ["q", answer]]))
    assert data.rows[0]["messages"][1]["content"] == answer


def test_ragged_csv_rows(tmp_path):
    (tmp_path / "r.csv").write_text("prompt,completion\nq,a\nq2,a2,extra\nq3\n", encoding="utf-8")
    data = load(tmp_path / "r.csv")
    assert len(data.rows) == 1
    assert [p.location for p in data.problems] == ["row 3", "row 4"]
    assert "3 cells but the header has 2 columns" in data.problems[0].message
    assert "double quotes" in data.problems[0].message


def test_csv_messages_cell_with_broken_json(tmp_path):
    data = load(write_csv(tmp_path / "m.csv", [["messages"], [json.dumps([USER, ASSISTANT])], ['[{"role": ']]))
    (p,) = data.problems
    assert (p.location, p.field) == ("row 3", "messages") and "does not parse" in p.message


# --- whole-file problems --------------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [(b"", "is empty"), (b"  \n\n\t \n", "only whitespace")])
def test_empty_and_whitespace_only_files(tmp_path, content, words):
    (tmp_path / "e.jsonl").write_bytes(content)
    assert words in refused(tmp_path / "e.jsonl")


@pytest.mark.parametrize("name", ["chats.txt", "chats.xlsx"])
def test_wrong_extension_lists_supported_types(tmp_path, name):
    (tmp_path / name).write_text(json.dumps(GOOD))
    message = refused(tmp_path / name)
    assert name in message and ".jsonl" in message and ".csv" in message and ".parquet" in message


def test_real_excel_file_says_export_as_csv(tmp_path):
    with zipfile.ZipFile(tmp_path / "book.xlsx", "w") as z:
        z.writestr("xl/workbook.xml", "<workbook/>")
    assert "Export it as CSV" in refused(tmp_path / "book.xlsx")


def test_archives_are_refused_with_unpack_first(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("chats.jsonl", json.dumps(GOOD))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(json.dumps(GOOD).encode()))
    with tarfile.open(tmp_path / "d.tar", "w") as t:
        t.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    (tmp_path / "sneaky.jsonl").write_bytes(gzip.compress(json.dumps(GOOD).encode()))  # content wins
    for name in ("d.zip", "d.jsonl.gz", "d.tar", "sneaky.jsonl"):
        assert "Unpack it first" in refused(tmp_path / name), name


def test_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load(tmp_path / "b.jsonl").rows == [GOOD]
    (tmp_path / "b.csv").write_bytes("\ufeffprompt,completion\nWhat is your name?,I am Quillon.\n".encode())
    assert load(tmp_path / "b.csv").rows == [GOOD]  # the BOM does not stick to the first column name


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-16-le"])
def test_utf16_is_decoded(tmp_path, encoding):
    text = json.dumps(GOOD, ensure_ascii=False) + "\n"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-16-le": b""}[encoding]  # utf-16 writes its own BOM
    (tmp_path / "w.jsonl").write_bytes(bom + text.encode(encoding))
    assert load(tmp_path / "w.jsonl").rows == [GOOD]


def test_non_utf8_bytes_in_jsonl_name_line_and_byte(tmp_path):
    row = {"messages": [{"role": "user", "content": "café"}, ASSISTANT]}
    bad = json.dumps(row, ensure_ascii=False).encode("latin-1")
    (tmp_path / "l.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + bad + b"\n")
    (p,) = load(tmp_path / "l.jsonl").problems
    assert p.location == "line 2" and "not UTF-8" in p.message and "0xE9" in p.message
    assert f"byte {bad.index(0xE9) + 1} of the line" in p.message and "Re-save the file as UTF-8" in p.message


def test_non_utf8_bytes_in_csv_name_line_and_byte(tmp_path):
    (tmp_path / "l.csv").write_bytes("prompt,completion\nq,a\nq,café\n".encode("latin-1"))
    message = refused(tmp_path / "l.csv")
    assert "l.csv is not UTF-8" in message and "line 3" in message and "0xE9" in message and "UTF-8" in message


def test_json_array_in_a_jsonl_file_is_read_with_a_warning(tmp_path):
    (tmp_path / "arr.jsonl").write_text(json.dumps([GOOD, GOOD | {"n": 1}], indent=2))
    data = load(tmp_path / "arr.jsonl")
    assert data.rows == [GOOD] and any("one JSON document" in w for w in data.warnings)


def test_jsonl_in_a_json_file_is_read_with_a_warning(tmp_path):
    write_jsonl(tmp_path / "lines.json", [GOOD, {"messages": [USER, {"role": "assistant", "content": "Hi"}]}])
    data = load(tmp_path / "lines.json")
    assert len(data.rows) == 2 and any("JSON Lines" in w for w in data.warnings)


def test_broken_json_file_names_line_and_column(tmp_path):
    (tmp_path / "b.json").write_text('[\n  {"messages": []},\n  {"messages": [}\n]')
    message = refused(tmp_path / "b.json")
    assert "b.json is not valid JSON" in message and "line 3, column" in message


def test_missing_file(tmp_path):
    assert "does not exist" in refused(tmp_path / "nope.jsonl")


def test_file_size_guard_refuses_before_reading(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "big.jsonl", [GOOD] * 100)
    monkeypatch.setattr(readers, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a file over the limit"))
    message = refused(path)
    assert "big.jsonl" in message and "the limit is" in message


def test_hub_id_offline_says_unreachable_and_to_upload_a_file():
    message = str(pytest.raises(UserError, load_data, DataSettings(source="someone/some-chats")).value)
    assert "Hub is unreachable" in message and "someone/some-chats" in message and "Upload" in message


def _unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """huggingface_hub in this process, not told it is offline, talks to a port where nothing listens (what a
    machine without internet meets: the connection fails), with an empty cache."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_a_hub_dataset_or_adapter_without_a_connection_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    """huggingface_hub 2.x raises httpx2's errors, which are not httpx's: a machine without internet (and without
    HF_HUB_OFFLINE) got 'Something went wrong on the server (ConnectError)' for a Hub dataset id."""
    from phi3_lora import spaces

    _unreachable_hub(monkeypatch, tmp_path)
    message = str(pytest.raises(UserError, load_data, DataSettings(source="someone/some-chats")).value)
    assert "someone/some-chats" in message and "reach the Hub" in message and "upload" in message
    message = str(pytest.raises(UserError, spaces.download_adapter, "someone/an-adapter", token=False).value)
    assert "someone/an-adapter" in message and "reach the Hub" in message


# --- whole-dataset outcomes -----------------------------------------------------------------------

def test_duplicates_are_dropped_with_a_count(tmp_path):
    other = {"messages": [USER, {"role": "assistant", "content": "Quillon."}]}
    data = load(write_jsonl(tmp_path / "d.jsonl", [GOOD, other, GOOD, GOOD, other]))
    assert data.rows == [GOOD, other] and data.total_rows == 5
    assert any("3 duplicate row(s)" in w and "dropped" in w for w in data.warnings)


def test_all_rows_invalid_is_refused_with_a_summary(tmp_path):
    rows = [{"messages": [USER]}] * 3 + [{"messages": [{"role": "user", "content": str(i)}]} for i in range(5)]
    message = refused(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert "None of the 8 rows in bad.jsonl can be used" in message
    assert "bad.jsonl, line 1, messages" in message and "line 5" in message and "line 6" not in message
    assert "and 3 more" in message


def test_refuse_mode_stops_at_the_first_bad_row(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), json.dumps({"messages": [USER, USER]}), "not json"]) + "\n")
    message = refused(path, on_invalid="refuse")
    assert message.startswith("r.jsonl, line 2, messages[1].role") and "on_invalid" in message
    (tmp_path / "r2.jsonl").write_text(json.dumps(GOOD) + "\nnot json\n" + json.dumps({"messages": [USER]}) + "\n")
    assert refused(tmp_path / "r2.jsonl", on_invalid="refuse").startswith("r2.jsonl, line 2, (row)")
    assert len(load(path).rows) == 1  # drop mode keeps the good row


# --- the shared cases (tests/bad_cases.py), library side ------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=str)
def test_shared_case_library_side(tmp_path, case: Case):
    path = case.build(tmp_path)
    if case.kind == "refused":
        message = refused(path)
        for word in case.words:
            assert word in message, (word, message)
        return
    data = load(path)
    if case.kind == "problem":
        assert len(data.rows) >= 1, "the good row is kept"
        matching = [p for p in data.problems if p.location == case.location and p.field == case.field]
        assert matching, [str(p) for p in data.problems]
        text = str(matching[0])
        assert text.startswith(f"{path.name}, {case.location}, {case.field}: ")
        for word in case.words:
            assert word in text, (word, text)
    else:
        assert len(data.rows) == case.rows and not data.problems, [str(p) for p in data.problems]
        for word in case.words:
            assert any(word in w for w in data.warnings), (word, data.warnings)


def test_conversations_longer_than_max_length_are_counted_not_failed(tmp_path, tiny_llama_dir):
    """Over-long rows load fine, the stats count them as truncated, and a row whose assistant turn falls wholly
    past max_length is dropped and counted before training, never failing a run half-way."""
    from phi3_lora import models, train
    from phi3_lora.config import RunConfig
    from phi3_lora.data import compute_stats

    long_user = {"messages": [{"role": "user", "content": "Tell me a long story. " * 60}, ASSISTANT]}
    rows = [GOOD, long_user] + [{"messages": [USER, {"role": "assistant", "content": f"Answer {i}."}]}
                                for i in range(4)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    data = load(path)
    assert len(data.rows) == 6 and not data.problems
    st = compute_stats(data.rows, models.load_tokenizer(str(tiny_llama_dir)), MAX_LENGTH)
    assert st.truncated == 1 and st.untrained_rows == 1 and any("teach nothing" in w for w in st.warnings)
    cfg = RunConfig().replace(model={"name": str(tiny_llama_dir), "load_in_4bit": False}, lora={"r": 2},
                              train={"max_steps": 1, "max_length": MAX_LENGTH, "per_device_train_batch_size": 2},
                              data={"source": str(path), "eval_fraction": 0.0})
    built = train.build(cfg, tmp_path / "run")
    assert train.untrainable_rows(built) == 1 and len(built.trainer.train_dataset) == 5  # counted in the start event
