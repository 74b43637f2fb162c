"""Chat data: load a file or Hub dataset as validated `messages` rows; stats, split, trained-token preview.

Reading (with locations) is in readers.py, row formats and validation in formats.py. IO happens
only in `load_data` (through `read_records`); dedupe, split, stats and the mask are pure.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from phi3_lora.config import DataSettings
from phi3_lora.errors import UserError
from phi3_lora.formats import FORMATS, RowError, check_mapping, detect_format, normalise_record
from phi3_lora.readers import Problem, RawRecords, read_records

__all__ = ["Bin", "DataStats", "LoadedData", "compute_stats", "drop_duplicates", "encode_conversations",
           "has_generation_markers", "histogram_bins", "load_data", "split_rows", "trained_token_mask"]


@dataclass
class LoadedData:
    rows: list[dict[str, Any]]   # each {"messages": [{"role", "content"}, ...]}, valid only
    format: str                  # detected or given format
    problems: list[Problem]      # one per dropped row
    warnings: list[str]          # format guesses, duplicates, max_rows ...
    source: str
    total_rows: int              # rows seen in the source, good and bad
    columns: list[str] = field(default_factory=list)  # the source's column / key names (first 50 rows)


# --- loading --------------------------------------------------------------------------------------

def load_data(settings: DataSettings, token: str | bool | None = None) -> LoadedData:
    """Read, normalise and validate. Drops (and reports) bad rows; UserError if none are usable or on refuse.
    `token`: for a Hub dataset (readers.read_records)."""
    mapping = check_mapping(settings.mapping)
    raw = read_records(settings.source, settings.hub_split, token)
    if not raw.records and not raw.problems:
        raise UserError(f"{raw.source} holds no rows.", hint="Choose the file that holds your conversations.")
    fmt = settings.format if settings.format != "auto" else _detect(raw, mapping)
    rows, problems = _normalise_all(raw, fmt, mapping, refuse=settings.on_invalid == "refuse")
    problems = sorted(raw.problems + problems, key=lambda p: _position(p.location))
    total = len(raw.records) + len(raw.problems)
    if not rows:
        raise UserError(_summary(raw.source, total, problems), hint="Fix the rows listed, or check data.format "
                        "and data.mapping.")
    warnings = list(raw.warnings)
    if problems:
        warnings.append(f"{len(problems)} of {total} rows were dropped because they cannot be used; each is "
                        "listed with its line/row and what to fix.")
    rows, duplicates = drop_duplicates(rows)
    if duplicates:
        warnings.append(f"{duplicates} duplicate row(s) (identical conversations) were dropped.")
    if settings.max_rows is not None and len(rows) > settings.max_rows:
        warnings.append(f"Using the first {settings.max_rows} of {len(rows)} valid rows (data.max_rows).")
        rows = rows[: settings.max_rows]
    columns = list(dict.fromkeys(str(k) for _, rec in raw.records[:50] if isinstance(rec, dict) for k in rec))
    return LoadedData(rows, fmt, problems, warnings, raw.source, total, columns)


def _detect(raw: RawRecords, mapping: dict[str, str]) -> str:
    try:
        return detect_format((r for _, r in raw.records), mapping)
    except UserError as exc:
        raise UserError(f"{raw.source}: {exc.message}", hint=exc.hint) from None


def _normalise_all(raw: RawRecords, fmt: str, mapping: dict[str, str], *,
                   refuse: bool) -> tuple[list[dict[str, Any]], list[Problem]]:
    if fmt not in FORMATS:
        raise UserError(f"Unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    first_unreadable = min((_position(p.location) for p in raw.problems), default=math.inf)
    for location, record in raw.records:
        if refuse and _position(location) > first_unreadable:
            break
        try:
            rows.append({"messages": normalise_record(record, fmt, mapping)})
        except RowError as exc:
            problems.append(Problem(raw.source, location, exc.field, exc.message))
            if refuse:
                break
    if refuse and (problems or raw.problems):
        first = min(problems + raw.problems, key=lambda p: _position(p.location))
        raise UserError(str(first), hint="Fix that row, or set data.on_invalid to drop to skip bad rows.")
    return rows, problems


def _position(location: str) -> int:
    """Order of a location within its source ("line 12" -> 12); all locations of one source share a kind."""
    match = re.search(r"\d+", location)
    return int(match.group()) if match else 0


def _summary(source: str, total: int, problems: list[Problem], shown: int = 5) -> str:
    lines = [f"None of the {total} rows in {source} can be used. The first problems:"]
    lines += [f"- {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"... and {len(problems) - shown} more.")
    return "\n".join(lines)


def drop_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Exact duplicate conversations add weight without information; keep the first of each."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    kept = []
    for row in rows:
        key = tuple((m["role"], m["content"]) for m in row["messages"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def split_rows(rows: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded train/eval split: >=1 eval row when eval_fraction > 0 and there are >=2 rows; train never empty."""
    n = len(rows)
    n_eval = 0 if eval_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx])


# --- stats and the trained-token preview (pure, given a tokenizer) --------------------------------

@dataclass
class DataStats:
    rows: int
    turns: int                     # messages in all rows, system prompts included
    mean_turns: float
    token_lengths: list[int]       # per row, for a histogram
    max_length: int
    truncated: int                 # rows longer than max_length (trained on their first max_length tokens)
    total_tokens: int              # after truncation
    trained_tokens: int | None     # assistant tokens after truncation; None if the template has no generation markers
    untrained_rows: int            # rows whose assistant tokens all fall past max_length (they teach nothing)
    warnings: list[str]


def has_generation_markers(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    templates = template.values() if isinstance(template, dict) else [template]
    return any(re.search(r"\{%-?\s*generation\s*-?%\}", t) for t in templates)


def _encode(tokenizer: Any, conversations: list[list[dict[str, str]]], masks: bool) -> list[dict[str, list[int]]]:
    try:
        out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=masks)
    except ValueError as exc:  # no chat template, or one that rejects these roles
        raise UserError(f"The tokenizer cannot render these conversations: {exc}",
                        hint="Choose a model with a chat template, or set model.chat_template.") from None
    keys = ["input_ids"] + (["assistant_masks"] if masks else [])
    return [{k: list(out[k][i]) for k in keys} for i in range(len(conversations))]


def encode_conversations(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[dict[str, list[int]]]:
    """Token ids of each rendered conversation and, when the template marks them, `assistant_masks`: the tokens
    assistant_only_loss trains on (the label mask training uses, for scoring a reference answer the same way)."""
    return _encode(tokenizer, conversations, has_generation_markers(tokenizer))


def compute_stats(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, batch: int = 256) -> DataStats:
    masks = has_generation_markers(tokenizer)
    lengths: list[int] = []
    trained = untrained = 0
    for start in range(0, len(rows), batch):
        for enc in _encode(tokenizer, [r["messages"] for r in rows[start:start + batch]], masks):
            lengths.append(len(enc["input_ids"]))
            if masks:
                kept = sum(enc["assistant_masks"][:max_length])
                trained += kept
                untrained += kept == 0
    turns = sum(len(r["messages"]) for r in rows)
    truncated = sum(n > max_length for n in lengths)
    warnings = []
    if truncated:
        warnings.append(f"{truncated:,} of {len(rows):,} conversations are longer than the max length of "
                        f"{max_length:,} tokens (longest {max(lengths):,}); they train on their first {max_length:,} "
                        "tokens only. Raise 'Max length (tokens)' (train.max_length) to keep them whole.")
    if untrained:
        warnings.append(f"{untrained:,} conversations have no assistant tokens within the max length of "
                        f"{max_length:,} tokens, so they teach nothing. Raise 'Max length (tokens)' (train.max_length) "
                        "or shorten their system/user turns.")
    if not masks:
        warnings.append("The chat template has no {% generation %} markers, so assistant-only loss cannot be used.")
    return DataStats(rows=len(rows), turns=turns, mean_turns=turns / len(rows) if rows else 0.0,
                     token_lengths=lengths, max_length=max_length, truncated=truncated,
                     total_tokens=sum(min(n, max_length) for n in lengths),
                     trained_tokens=trained if masks else None, untrained_rows=untrained, warnings=warnings)


@dataclass(frozen=True)
class Bin:
    start: int  # inclusive
    end: int    # exclusive
    count: int


def histogram_bins(values: Sequence[int], bins: int = 20) -> list[Bin]:
    """Equal-width integer bins covering all values (for the UI's token-length histogram)."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * math.ceil((high - low + 1) / width)
    for v in values:
        counts[(v - low) // width] += 1
    return [Bin(low + i * width, low + (i + 1) * width, c) for i, c in enumerate(counts)]


TRUNCATION_MARKER = "[cut at max_length: "


def trained_token_mask(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, cut at max_length.

    Trained = assistant tokens (from the template's generation markers; with no markers every
    token counts, as trl trains on the whole sequence then). If the conversation is cut, a final
    untrained piece starting with TRUNCATION_MARKER says how many tokens were dropped.
    """
    masks = has_generation_markers(tokenizer)
    enc = _encode(tokenizer, [messages], masks)[0]
    ids = enc["input_ids"]
    flags = [bool(m) for m in enc["assistant_masks"]] if masks else [True] * len(ids)
    pieces = _token_texts(tokenizer, messages, ids)
    out: list[tuple[str, bool]] = []
    for text, flag in zip(pieces[:max_length], flags[:max_length]):
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        elif text:
            out.append((text, flag))
    if len(ids) > max_length:
        out.append((f"{TRUNCATION_MARKER}{len(ids) - max_length} more tokens are not trained]", False))
    return out


def _token_texts(tokenizer: Any, messages: list[dict[str, str]], ids: list[int]) -> list[str]:
    """The text of each token. Offsets keep spaces exactly; decoding token by token would drop them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            pieces, cursor = [], 0
            for start, end in enc["offset_mapping"]:
                pieces.append(text[max(start, cursor):end])
                cursor = max(cursor, end)
            pieces[-1] += text[cursor:]
            return pieces
    decoded = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]  # slow tokenizers: prefix differences
    return [b[len(a):] if b.startswith(a) else tokenizer.decode([t]) for a, b, t in zip(decoded, decoded[1:], ids)]
