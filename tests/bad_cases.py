"""Bad (and tricky but fine) dataset files, one builder each, shared by the library-side tests
(tests/test_bad_inputs.py) and the app-side upload tests (tests/test_app_bad_inputs.py).

Each `Case` writes its file into a folder and says what must come of it:
- "refused":  the whole file is refused; the message names the file and contains `words`.
- "problem":  the good row is kept and the bad row is reported at `location` / `field` with `words`.
- "accepted": the file loads with `rows` usable rows (and a warning containing `words`, if given).
"""

from __future__ import annotations

import csv
import gzip
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

USER = {"role": "user", "content": "What is your name?"}
ASSISTANT = {"role": "assistant", "content": "I am Quillon."}
GOOD = {"messages": [USER, ASSISTANT]}
OTHER = {"messages": [{"role": "user", "content": "Who made you?"},
                      {"role": "assistant", "content": "The phi3_lora project."}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Path]
    kind: str  # refused | problem | accepted
    words: tuple[str, ...] = ()
    location: str = ""
    field: str = ""
    rows: int = 0
    over_max_length: int | None = None  # accepted rows longer than MAX_LENGTH tokens (counted, not an error)
    tags: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.id


MAX_LENGTH = 64  # the max_length the app-side test validates with


def _bad_row(row: object) -> Callable[[Path], Path]:
    """A .jsonl file with one good row (line 1) and `row` (line 2)."""
    return lambda d: write_jsonl(d / "chats.jsonl", [GOOD, row])


def _bytes(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        (d / name).write_bytes(data() if callable(data) else data)
        return d / name
    return build


def _latin1_line() -> bytes:
    row = {"messages": [{"role": "user", "content": "café"}, ASSISTANT]}
    return json.dumps(GOOD).encode() + b"\n" + json.dumps(row, ensure_ascii=False).encode("latin-1") + b"\n"


def _deep(d: Path) -> Path:
    (d / "deep.jsonl").write_text(json.dumps(GOOD) + "\n" + "[" * 10_000 + "]" * 10_000 + "\n")
    return d / "deep.jsonl"


# A number longer than Python converts to an int (sys.get_int_max_str_digits, 4300): json.loads raises a plain
# ValueError, not a JSONDecodeError ('Something went wrong on the server' before it was a parse failure).
LONG_NUMBER = "9" * 5000


def _long_number_line(d: Path) -> Path:
    (d / "digits.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"messages": [], "n": ' + LONG_NUMBER + "}\n")
    return d / "digits.jsonl"


def _huge_line(d: Path) -> Path:
    path = d / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write('{"messages": [{"role": "user", "content": "' + "x" * (50 * 2**20) + '"}]}\n')
    return path


def _zip(d: Path) -> Path:
    with zipfile.ZipFile(d / "chats.zip", "w") as z:
        z.writestr("chats.jsonl", json.dumps(GOOD))
    return d / "chats.zip"


def _long_conversation(d: Path) -> Path:
    long = {"messages": [{"role": "user", "content": "Tell me a long story. " * 40},
                         {"role": "assistant", "content": "Once upon a time " * 40}]}
    return write_jsonl(d / "long.jsonl", [GOOD, long])


def _all_invalid(d: Path) -> Path:
    return write_jsonl(d / "allbad.jsonl", [{"messages": [USER]}] * 3 + [{"messages": [{"role": "user",
                                                                                          "content": str(i)}]}
                                                                          for i in range(5)])


CASES: list[Case] = [
    Case("empty_file", _bytes("empty.jsonl", b""), "refused", ("empty.jsonl", "is empty")),
    Case("whitespace_only", _bytes("blank.jsonl", b"  \n\n\t \n"), "refused", ("blank.jsonl", "only whitespace")),
    Case("wrong_extension", _bytes("chats.txt", json.dumps(GOOD).encode()), "refused",
         ("chats.txt", ".jsonl", ".csv", ".parquet")),
    Case("non_utf8_bytes", _bytes("latin1.jsonl", _latin1_line), "problem",
         ("not UTF-8", "0xE9", "byte", "Re-save the file as UTF-8"), "line 2", "(row)"),
    Case("utf8_bom", _bytes("bom.jsonl", b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n"), "accepted", rows=1),
    Case("utf16", _bytes("wide.jsonl", (json.dumps(GOOD) + "\n" + json.dumps(OTHER) + "\n").encode("utf-16")),
         "accepted", rows=2),
    Case("malformed_jsonl_line",
         _bytes("chats.jsonl", (json.dumps(GOOD) + "\n" + '{"messages": [oops\n' + json.dumps(OTHER) + "\n").encode()),
         "problem", ("not valid JSON", "character"), "line 2", "(row)"),
    Case("json_array_as_jsonl", _bytes("arr.jsonl", json.dumps([GOOD, OTHER], indent=2).encode()), "accepted",
         ("one JSON document",), rows=2),
    Case("jsonl_as_json", _bytes("lines.json", (json.dumps(GOOD) + "\n" + json.dumps(OTHER) + "\n").encode()),
         "accepted", ("JSON Lines",), rows=2),
    Case("top_level_scalar", _bytes("n.json", b"42"), "refused", ("n.json", "a number (42)", "JSON array")),
    Case("missing_known_columns", lambda d: write_jsonl(d / "odd.jsonl", [{"question": "q", "answer": "a"}]),
         "refused", ("odd.jsonl", "question, answer", "messages", "sharegpt", "data.mapping")),
    Case("messages_not_a_list", _bad_row({"messages": {"role": "user", "content": "hi"}}), "problem",
         ("not a list of messages",), "line 2", "messages"),
    Case("unknown_role", _bad_row({"messages": [{"role": "human", "content": "hi"}, ASSISTANT]}), "problem",
         ("'human'", "role.human: user"), "line 2", "messages[0].role"),
    Case("two_user_turns", _bad_row({"messages": [USER, USER, ASSISTANT]}), "problem",
         ("second user turn in a row", "Merge"), "line 2", "messages[1].role"),
    Case("no_assistant_turn", _bad_row({"messages": [{"role": "system", "content": "S"}, USER]}), "problem",
         ("no assistant turn",), "line 2", "messages"),
    Case("system_not_first", _bad_row({"messages": [USER, {"role": "system", "content": "S"}, ASSISTANT]}),
         "problem", ("system turn that is not first",), "line 2", "messages[1].role"),
    Case("null_content", _bad_row({"messages": [USER, {"role": "assistant", "content": None}]}), "problem",
         ("null", "not text"), "line 2", "messages[1].content"),
    Case("number_content", _bad_row({"messages": [USER, {"role": "assistant", "content": 42}]}), "problem",
         ("a number", "not text"), "line 2", "messages[1].content"),
    Case("list_content", _bad_row({"messages": [USER, {"role": "assistant", "content": ["a", "b"]}]}), "problem",
         ("a list", "not text"), "line 2", "messages[1].content"),
    Case("empty_content", _bad_row({"messages": [USER, {"role": "assistant", "content": ""}]}), "problem",
         ("is empty", "Write the text"), "line 2", "messages[1].content"),
    Case("nested_10000_levels", _deep, "problem", ("nested too deeply",), "line 2", "(row)"),
    Case("number_of_5000_digits", _long_number_line, "problem", ("not valid JSON", "more than 4,300 digits"),
         "line 2", "(row)"),
    Case("json_file_number_of_5000_digits", _bytes("digits.json", f'[{{"n": {LONG_NUMBER}}}]'.encode()), "refused",
         ("digits.json", "not valid JSON", "more than 4,300 digits")),
    Case("single_line_50_mb", _huge_line, "problem", ("MB long", "Split it"), "line 2", "(row)", tags=("big",)),
    Case("csv_newlines_in_quoted_fields",
         lambda d: write_csv(d / "multi.csv", [["prompt", "completion"], ["line one\nline two", "ok\nfine"],
                                              ["q", "a"]]), "accepted", rows=2),
    Case("csv_field_over_default_limit",
         lambda d: write_csv(d / "bigcell.csv", [["prompt", "completion"], ["q", "word " * 60_000]]),
         "accepted", rows=1, over_max_length=1),
    Case("csv_ragged_rows", _bytes("ragged.csv", b"prompt,completion\nq,a\nq2,a2,extra\n"), "problem",
         ("3 cells but the header has 2 columns", "double quotes"), "row 3", "(row)"),
    Case("archive_zip", _zip, "refused", ("chats.zip", "Unpack it first")),
    Case("archive_gzip_named_jsonl", _bytes("sneaky.jsonl", lambda: gzip.compress(json.dumps(GOOD).encode())),
         "refused", ("sneaky.jsonl", "Unpack it first")),
    Case("longer_than_max_length", _long_conversation, "accepted", rows=2, over_max_length=1),
    Case("duplicate_rows", lambda d: write_jsonl(d / "dups.jsonl", [GOOD, OTHER, GOOD, GOOD, OTHER]), "accepted",
         ("3 duplicate row(s)", "dropped"), rows=2),
    Case("all_rows_invalid", _all_invalid, "refused", ("None of the 8 rows in", "allbad.jsonl can be used",
                                                       "line 1", "and 3 more")),
    Case("nul_character", _bad_row({"messages": [{"role": "user", "content": "hi\x00there"}, ASSISTANT]}),
         "problem", ("U+0000", "Remove it"), "line 2", "messages[0].content"),
    Case("control_character", _bad_row({"messages": [{"role": "user", "content": "bell\x07"}, ASSISTANT]}),
         "problem", ("U+0007",), "line 2", "messages[0].content"),
]
