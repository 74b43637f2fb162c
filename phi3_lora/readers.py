"""Reading chat data files and Hub datasets into raw rows, each with its location.

We read files with json / csv / pyarrow ourselves rather than `datasets.load_dataset("json", ...)`:
datasets reports neither the line nor the row of a bad record and fails a whole file on one
malformed line, and every problem here must name its file, line/row and field. Hub ids still go
through `datasets.load_dataset`.

The file type comes from the extension checked against the content: a .jsonl holding one JSON
array, or a .json holding JSON Lines, is read as what it is (with a warning).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3_lora.errors import UserError, hub_errors
from phi3_lora.formats import describe, parse_json

MAX_FILE_BYTES = 512 * 2**20
# A JSONL line longer than this is refused unparsed: it cannot be one trainable conversation
# (formats.MAX_ROW_CHARS) and parsing it would cost several times its size in memory.
MAX_LINE_BYTES = 16 * 2**20
SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
SUPPORTED_TEXT = "JSON Lines (.jsonl), JSON (.json), CSV (.csv), Parquet (.parquet), or a Hub dataset id (user/name)"
ARCHIVES = (".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar", ".zst")
_MAGIC_ARCHIVES = {b"PK\x03\x04": "a zip archive (or an Excel/Office file)", b"\x1f\x8b": "a gzip archive",
                   b"BZh": "a bzip2 archive", b"\xfd7zXZ": "an xz archive", b"7z\xbc\xaf": "a 7z archive"}
_OTHER_FILE_TYPES = (".txt", ".tsv", ".xlsx", ".xls", ".ods", ".md", ".yaml", ".yml", ".html", ".pdf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


@dataclass
class Problem:
    """One unusable row: where it is and what to do about it."""

    source: str    # file name or Hub id
    location: str  # "line 3" (JSONL), "row 5" (CSV, as a spreadsheet numbers it), "index 4" (JSON, Parquet, Hub)
    field: str     # e.g. "messages[2].content"; "(row)" for the row as a whole
    message: str   # what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.source}, {self.location}, {self.field}: {self.message}"


@dataclass
class RawRecords:
    """What `read_records` found, before format detection."""

    source: str
    kind: str                          # jsonl | json | csv | parquet | hub
    records: list[tuple[str, Any]]     # (location, raw row)
    problems: list[Problem] = field(default_factory=list)   # rows that could not even be parsed
    warnings: list[str] = field(default_factory=list)


# --- reading --------------------------------------------------------------------------------------

def is_hub_id(source: str) -> bool:
    """`user/name` that is not a local path; a file-like extension means a (missing) file, not a Hub id."""
    return (bool(_HUB_ID.match(source)) and not Path(source).exists()
            and Path(source).suffix.lower() not in SUPPORTED + ARCHIVES + _OTHER_FILE_TYPES)


def read_records(source: str, hub_split: str = "train", token: str | bool | None = None) -> RawRecords:
    """Raw rows with their locations. UserError when the source as a whole is unusable. `token` is for a Hub
    dataset: None = the machine's login, False = none (a web visitor without a token of their own)."""
    source = str(source).strip()
    if not source:
        raise UserError("No data given.", hint=f"Upload or name a file: {SUPPORTED_TEXT}.")
    if is_hub_id(source):
        return _read_hub(source, hub_split, token)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{source} does not exist (or is not a file).",
                        hint=f"Check the path. Supported: {SUPPORTED_TEXT}.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"{path.name} is {size / 2**20:,.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB.",
                        hint="Use a smaller sample of it (data.max_rows applies after reading), or split it.")
    raw = path.read_bytes()
    kind = _file_kind(path.name, raw)
    if kind == "parquet":
        return _read_parquet(path)
    text = _decode(path.name, raw, keep_errors=(kind == "jsonl"))
    if text is None:  # JSONL that is not clean UTF-8: decode line by line to report each bad line
        return _read_jsonl_bytes(path.name, raw)
    if not text.strip():
        raise UserError(f"{path.name} is empty{' (only whitespace)' if text else ''}.",
                        hint="Choose the file that holds your conversations.")
    if kind == "csv":
        return _read_csv(path.name, text)
    return _read_json_or_jsonl(path.name, text, kind)


def _file_kind(name: str, raw: bytes) -> str:
    """jsonl | json | csv | parquet, from the extension checked against the first bytes."""
    suffix = Path(name).suffix.lower()
    for magic, what in _MAGIC_ARCHIVES.items():
        if raw.startswith(magic):
            if suffix in (".xlsx", ".xls", ".ods", ".docx"):
                raise UserError(f"{name} is a spreadsheet, which cannot be read directly.",
                                hint="Export it as CSV (UTF-8) and upload that.")
            raise UserError(f"{name} is {what}.", hint=f"Unpack it first and upload the file inside: {SUPPORTED_TEXT}.")
    if suffix in ARCHIVES or name.lower().endswith(".tar.gz"):
        raise UserError(f"{name} is an archive.", hint=f"Unpack it first and upload the file inside: {SUPPORTED_TEXT}.")
    if raw.startswith(b"PAR1"):
        return "parquet"
    if suffix == ".parquet":
        raise UserError(f"{name} is not a Parquet file (it does not start with the Parquet marker PAR1).",
                        hint="Re-export it as Parquet, or give it the extension of its real type.")
    if suffix not in SUPPORTED:
        raise UserError(f"{name}: files of type {suffix or '(no extension)'} are not supported.",
                        hint=f"Supported: {SUPPORTED_TEXT}. Rename the file if it already is one of these.")
    return suffix[1:]


def _decode(name: str, raw: bytes, *, keep_errors: bool) -> str | None:
    """Text from bytes: BOM-aware (UTF-8/16/32), else strict UTF-8 with the place of the first bad byte.

    Returns None (instead of raising) when `keep_errors` and the bytes are not UTF-8, so that
    JSONL can report the bad lines and keep the good ones.
    """
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw[len(bom):].decode(encoding)
            except UnicodeDecodeError as exc:
                raise UserError(f"{name} starts with a {encoding} marker but byte {exc.start + len(bom)} is not "
                                f"valid {encoding}.", hint="Re-save the file as UTF-8.") from None
    if len(raw) >= 4 and raw[1:4:2] == b"\x00\x00" and raw[0:4:2] != b"\x00\x00":
        # UTF-16 saved without a BOM (ASCII text with every other byte 0), as some Windows tools do.
        try:
            return raw.decode("utf-16-le")
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if keep_errors:
            return None
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{name} is not UTF-8 text: line {line}, byte {column} of that line (byte offset "
                        f"{exc.start} in the file) is 0x{raw[exc.start]:02X}.",
                        hint="Re-save the file as UTF-8 (in Excel: 'CSV UTF-8'; in an editor: encoding UTF-8)."
                        ) from None


def _jsonl_line(name: str, number: int, line: str) -> tuple[str, Any] | Problem | None:
    where = f"line {number}"
    if not line.strip():
        return None
    if len(line) > MAX_LINE_BYTES:
        return Problem(name, where, "(row)", f"is {len(line) / 2**20:.0f} MB long, too long to be one "
                                             "conversation. Split it into shorter rows.")
    value, why = parse_json(line, one_line=True)
    if why is None:
        return where, value
    return Problem(name, where, "(row)", f"is not valid JSON ({why}). Fix or delete this line "
                                         "(each line must be one JSON object).")


def _read_jsonl_lines(name: str, lines: list[str]) -> RawRecords:
    out = RawRecords(name, "jsonl", [])
    for number, line in enumerate(lines, start=1):
        item = _jsonl_line(name, number, line)
        if isinstance(item, Problem):
            out.problems.append(item)
        elif item is not None:
            out.records.append(item)
    return out


def _read_jsonl_bytes(name: str, raw: bytes) -> RawRecords:
    """JSONL with some non-UTF-8 bytes: report those lines (with the byte), keep the rest."""
    out = RawRecords(name, "jsonl", [])
    offset = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            item = _jsonl_line(name, number, line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            item = Problem(name, f"line {number}", "(row)",
                           f"is not UTF-8: byte {exc.start + 1} of the line (byte offset {offset + exc.start} in the "
                           f"file) is 0x{line[exc.start]:02X}. Re-save the file as UTF-8.")
        offset += len(line) + 1
        if isinstance(item, Problem):
            out.problems.append(item)
        elif item is not None:
            out.records.append(item)
    return out


def _read_json_or_jsonl(name: str, text: str, kind: str) -> RawRecords:
    """Content decides: a .jsonl holding one JSON array, or a .json holding lines, are read as what they are."""
    stripped = text.lstrip()
    lines = text.split("\n")  # physical lines only: str.splitlines would also split on \x0b, \u2028 ...
    first = next(line for line in lines if line.strip())
    if kind == "jsonl":
        # A JSON array, or one pretty-printed object (its first line alone does not parse).
        pretty = stripped.startswith("{") and len(first) < MAX_LINE_BYTES and parse_json(first)[1] is not None
        if stripped.startswith("[") or pretty:
            value, error = parse_json(text)
            if error is None:
                out = _rows_from_json(name, value)
                out.warnings.append(f"{name} holds one JSON document, not one object per line; read it as JSON.")
                return out
        return _read_jsonl_lines(name, lines)
    value, error = parse_json(text)
    if error is None:
        return _rows_from_json(name, value)
    if stripped.startswith("{") and isinstance(parse_json(first)[0], dict):
        out = _read_jsonl_lines(name, lines)
        out.warnings.append(f"{name} holds one JSON object per line (JSON Lines); read it as JSONL. "
                            "Name it .jsonl to silence this warning.")
        return out
    raise UserError(f"{name} is not valid JSON: {error}.",
                    hint="Fix the file, or save one conversation per line as JSON Lines (.jsonl), which "
                         "lets the good rows through and reports the bad ones.")


def _rows_from_json(name: str, value: Any) -> RawRecords:
    """A JSON document -> rows: an array of rows, {key: [rows]}, one conversation, or an object of columns."""
    if isinstance(value, list):
        return RawRecords(name, "json", [(f"index {i}", row) for i, row in enumerate(value)])
    if not isinstance(value, dict):
        raise UserError(f"{name} holds {describe(value)} at the top level, not rows.",
                        hint="Give a JSON array of rows, e.g. [{\"messages\": [...]}, ...], or use JSON Lines.")
    lists = {k: v for k, v in value.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v[:100])}
    row_lists = {k: v for k, v in lists.items() if not _looks_like_messages(v)}
    if len(row_lists) == 1:  # {"data": [rows]}, {"conversations": [rows]} ...
        key, rows = next(iter(row_lists.items()))
        return RawRecords(name, "json", [(f"index {i} of \"{key}\"", row) for i, row in enumerate(rows)])
    if lists and len(lists) > len(row_lists):  # {"messages": [{role, content}, ...]}: one conversation
        return RawRecords(name, "json", [("the top-level object", value)],
                          warnings=[f"{name} holds a single conversation, not a list of them."])
    columns = _columns_to_rows(value)
    if columns is not None:
        return RawRecords(name, "json", [(f"index {i}", row) for i, row in enumerate(columns)])
    keys = ", ".join(map(str, list(value)[:10])) or "none"
    raise UserError(f"{name} holds one JSON object (keys: {keys}) and no list of rows was found in it.",
                    hint="Give a JSON array of rows, an object with one key holding that array (e.g. \"data\"), "
                         "or one conversation per line as JSON Lines.")


def _looks_like_messages(items: list[dict[str, Any]]) -> bool:
    return all(("role" in m or "from" in m) for m in items[:5])


def _columns_to_rows(value: dict[str, Any]) -> list[dict[str, Any]] | None:
    """{col: [v0, v1]} or pandas' {col: {"0": v0, "1": v1}} -> rows; None if it is neither."""
    cols = list(value.values())
    if not cols:
        return None
    if all(isinstance(c, list) for c in cols) and len({len(c) for c in cols}) == 1:
        return [dict(zip(value, cells)) for cells in zip(*cols)]
    if all(isinstance(c, dict) for c in cols) and len({tuple(c) for c in cols}) == 1:
        index = list(cols[0])
        return [{k: value[k][i] for k in value} for i in index]
    return None


def _read_csv(name: str, text: str) -> RawRecords:
    # A long answer can exceed csv's default 128 KiB cell limit; the file-size guard already bounds it.
    csv.field_size_limit(MAX_FILE_BYTES)
    header_line = text.split("\n", 1)[0]
    # Excel in many locales writes ';'; tab-separated exports are common too.
    delimiter = max(",;\t", key=header_line.count) if any(d in header_line for d in ";\t") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except (csv.Error, StopIteration) as exc:
        raise UserError(f"{name}: the header row cannot be read ({exc}).",
                        hint="Save the file as CSV (UTF-8).") from None
    header = [h.strip() for h in header]
    out = RawRecords(name, "csv", [])
    row_number = 1  # spreadsheet numbering: the header is row 1; a quoted multi-line cell stays one row
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise UserError(f"{name}: CSV cannot be read near line {reader.line_num}: {exc}.",
                            hint="Check the quoting around that line; every cell with a comma, quote or "
                                 "newline must be in double quotes.") from None
        row_number += 1
        if not any(c.strip() for c in cells):
            continue
        where = f"row {row_number}"
        if len(cells) != len(header):
            out.problems.append(Problem(name, where, "(row)", f"has {len(cells)} cells but the header has "
                                        f"{len(header)} columns. Put cells that contain commas in double quotes, "
                                        "or fix the missing/extra cells."))
            continue
        out.records.append((where, dict(zip(header, cells))))
    return out


def _read_parquet(path: Path) -> RawRecords:
    """Parquet stores a repeated value once (dictionary + run length), so a kilobyte file can expand to tens of
    gigabytes and take the process down. Text columns are read still dictionary-encoded, and what they expand
    to is measured before any row is built: the bound is that of any data file (MAX_FILE_BYTES)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        leaves = [meta.schema.column(i) for i in range(len(meta.schema))]
        values = sum(meta.metadata.row_group(g).column(c).num_values
                     for g in range(meta.metadata.num_row_groups) for c in range(meta.metadata.num_columns))
        if values > MAX_PARQUET_VALUES:
            raise _expands(path, f"{values:,} values (the limit is {MAX_PARQUET_VALUES:,})")
        table = pq.read_table(path, read_dictionary=[c.path for c in leaves if c.physical_type == "BYTE_ARRAY"])
        expanded = sum(_expanded_bytes(chunk) for column in table.columns for chunk in column.chunks)
        if expanded > MAX_FILE_BYTES:
            raise _expands(path, f"{expanded / 2**20:,.0f} MiB of data")
        rows = table.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path.name} is not a readable Parquet file: {exc}.",
                        hint="Re-export it as Parquet.") from None
    return RawRecords(path.name, "parquet", [(f"index {i}", row) for i, row in enumerate(rows)])


MAX_PARQUET_VALUES = 16 * 2**20  # cells and list items of a Parquet file: each becomes a Python object when read


def _expands(path: Path, what: str) -> UserError:
    return UserError(f"{path.name} ({path.stat().st_size / 2**20:,.1f} MiB on disk) expands to {what} when read; "
                     f"the limit for a data file is {MAX_FILE_BYTES // 2**20} MiB.",
                     hint="Use a smaller sample of it, or split it into several files.")


def _expanded_bytes(array: Any) -> int:
    """Bytes of an Arrow array with every dictionary value written out (nested lists and structs included)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        values = array.dictionary
        if not (pa.types.is_string(values.type) or pa.types.is_binary(values.type)
                or pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)):
            return array.nbytes + len(array) * values.nbytes // max(1, len(values))
        return array.indices.nbytes + int(pc.sum(pc.take(pc.binary_length(values), array.indices)).as_py() or 0)
    if pa.types.is_struct(kind):
        return sum(_expanded_bytes(child) for child in array.flatten())
    if isinstance(array, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):  # maps are lists too
        return len(array) * 8 + _expanded_bytes(array.flatten())
    return array.nbytes


def _check_hub_dataset(dataset_id: str, token: str | bool | None) -> str | None:
    """The commit to load, once the dataset's file list shows at most MAX_FILE_BYTES of files (what any data file may
    hold: the rows are read into memory); nothing is downloaded before. None offline: only the local cache is read."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().dataset_info(dataset_id, files_metadata=True, token=token)
    except RepositoryNotFoundError:
        raise UserError(f"The Hub has no dataset {dataset_id} (or it is private or gated).",
                        hint="Check the id, log in with a token that can read it, or upload a file.") from None
    except hub_errors() as exc:
        raise UserError(f"Could not read the file list of the dataset {dataset_id} from the Hub "
                        f"({type(exc).__name__}).", hint="Check the id and that this machine can reach the Hub, or "
                                                         "upload the data as a file instead.") from None
    total = sum(f.size or 0 for f in info.siblings or [])
    if total > MAX_FILE_BYTES:
        raise UserError(f"The dataset {dataset_id} holds {total / 2**20:,.0f} MiB of files; the limit is "
                        f"{MAX_FILE_BYTES // 2**20} MiB (as for a data file), so it is not downloaded.",
                        hint="Upload the part you want to train on as a file (JSONL, CSV or Parquet), or give a "
                             "smaller dataset.")
    return info.sha


def _read_hub(dataset_id: str, split: str, token: str | bool | None = None) -> RawRecords:
    import datasets

    revision = _check_hub_dataset(dataset_id, token)  # the checked commit is the one loaded
    try:
        ds = datasets.load_dataset(dataset_id, split=split, token=token, revision=revision)
    except ConnectionError:
        raise UserError(f"The Hugging Face Hub is unreachable, so the dataset {dataset_id} cannot be downloaded.",
                        hint="Upload the data as a file instead (" + SUPPORTED_TEXT.split(", or")[0] + "), "
                             "or connect this machine to the internet.") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"The Hub has no dataset {dataset_id} (or it is private or gated).",
                        hint="Check the id, log in with a token that can read it, or upload a file.") from None
    except ValueError as exc:  # e.g. unknown split
        raise UserError(f"{dataset_id}: {exc}", hint="Set data.hub_split to one of the dataset's splits.") from None
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"{dataset_id} split {split!r} did not load as one table.", hint="Set data.hub_split.")
    return RawRecords(dataset_id, "hub", [(f"index {i}", row) for i, row in enumerate(ds)])
