"""Row formats: detect which one a dataset uses and normalise a row to OpenAI `messages`.

Pure functions only (no IO). A row that cannot be used raises `RowError(field, message)`;
`data.load_data` turns it into a `Problem` that also names the file and line/row.

Formats (the names `DataSettings.format` takes):
- messages:          {"messages": [{"role": "user", "content": "..."}, ...]}            (OpenAI)
- sharegpt:          {"conversations": [{"from": "human", "value": "..."}, ...]}
- alpaca:            {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- prompt_completion: {"prompt": str | [messages], "completion": str | [messages]}        (trl)
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from phi3_lora.errors import UserError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant")

# Column names each format reads; `mapping` may rename any of them (plus `role`/`content`,
# the keys inside one message).
COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion", "system"),
}
MESSAGE_KEYS = ("role", "content")
FORMAT_HELP = ("messages (OpenAI: a `messages` list of {role, content}), sharegpt (a `conversations` list of "
               "{from, value}), alpaca (instruction / input / output columns) or prompt_completion "
               "(prompt / completion columns)")

# ShareGPT speaker names; the messages format takes only the three OpenAI roles so that a
# typo never silently becomes a role.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bot": "assistant", "system": "system"}

# Real text never holds these; they come from binary junk or broken exports and upset tokenizers.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A conversation longer than this cannot fit even the largest max_length (131072 tokens).
MAX_ROW_CHARS = 4_000_000


class RowError(Exception):
    """One row cannot be used: `field` names where (e.g. `messages[2].content`), `message` says why and what to do."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --- mapping --------------------------------------------------------------------------------------

def check_mapping(mapping: Mapping[str, str] | None) -> dict[str, str]:
    """Validate `DataSettings.mapping` up front so a typo is one clear error, not a bad row per line."""
    mapping = dict(mapping or {})
    known = sorted({c for cols in COLUMNS.values() for c in cols} | set(MESSAGE_KEYS))
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, str) or not value.strip():
            raise UserError(f"data.mapping entry {key!r}: {value!r} must map a name to a non-empty name.")
        if key.startswith("role."):
            if value not in ROLES:
                raise UserError(f"data.mapping {key}: {value!r} must map to one of {', '.join(ROLES)}.",
                                hint=f"For example {{{key}: user}}.")
        elif key not in known:
            raise UserError(f"data.mapping has unknown key {key!r}.",
                            hint=f"Use one of {', '.join(known)}, or role.<name> (e.g. role.human: user).")
    return mapping


def _column(fmt_field: str, mapping: Mapping[str, str]) -> str:
    return mapping.get(fmt_field, fmt_field)


def role_map(fmt: str, mapping: Mapping[str, str]) -> dict[str, str]:
    """Role names accepted for `fmt`, after the user's `role.<name>` entries."""
    roles = dict(SHAREGPT_ROLES) if fmt == "sharegpt" else {r: r for r in ROLES}
    roles.update({k[len("role."):]: v for k, v in mapping.items() if k.startswith("role.")})
    return roles


# --- detection ------------------------------------------------------------------------------------

def _looks_like(record: Mapping[str, Any], fmt: str, mapping: Mapping[str, str]) -> bool:
    has = lambda name: _column(name, mapping) in record  # noqa: E731
    return {"messages": has("messages") and not _sharegpt_items(record.get(_column("messages", mapping))),
            "sharegpt": has("conversations") or _sharegpt_items(record.get(_column("messages", mapping))),
            "alpaca": has("instruction") and has("output"),
            "prompt_completion": has("prompt") and has("completion")}[fmt]


def _sharegpt_items(value: Any) -> bool:
    """A `messages` list written ShareGPT-style ({from, value}) is ShareGPT, whatever the column is called."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], Mapping) and "from" in value[0]


def detect_format(records: Iterable[Any], mapping: Mapping[str, str] | None = None, sample: int = 1000) -> str:
    """The format most of the first `sample` rows look like; UserError naming the columns found if none fits."""
    mapping = dict(mapping or {})
    votes: Counter[str] = Counter()
    columns: Counter[str] = Counter()
    for n, record in enumerate(records):
        if n >= sample:
            break
        if not isinstance(record, Mapping):
            continue
        columns.update(str(k) for k in record)
        for fmt in FORMATS:
            if _looks_like(record, fmt, mapping):
                votes[fmt] += 1
                break
    if votes:
        return votes.most_common(1)[0][0]
    found = ", ".join(c for c, _ in columns.most_common(20)) or "none (no row is a JSON object)"
    raise UserError(f"Could not tell the data format: the columns found are {found}.",
                    hint=f"Expected {FORMAT_HELP}. If your columns have other names, set data.mapping, e.g. "
                         "{messages: dialog} or {prompt: question, completion: answer}.")


# --- normalisation --------------------------------------------------------------------------------

def describe(value: Any) -> str:
    """A short, safe description of a JSON value (never a full repr: values can be huge or deeply nested)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"[:60]
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return "an object {" + ", ".join(str(k) for k in list(value)[:6]) + "}"
    return f"a {type(value).__name__}"


def parse_json(text: str, *, one_line: bool = False) -> tuple[Any, str | None]:
    """(value, None) or (None, why it does not parse), for JSON a user gave. Deep nesting and an integer longer than
    Python converts (sys.get_int_max_str_digits: json raises a plain ValueError) are parse failures with a reason, not
    crashes. `one_line`: place a syntax error by its character in the line."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} at " + (f"character {exc.colno}" if one_line else
                                          f"line {exc.lineno}, column {exc.colno}")
    except RecursionError:
        return None, "it is nested too deeply (thousands of levels of [ or {)"
    except ValueError:
        return None, f"it holds a number of more than {sys.get_int_max_str_digits():,} digits"


def _as_list(value: Any, field: str) -> list[Any]:
    """A list field; CSV cells and some exports hold it as a JSON string, so decode that."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        value, why = parse_json(value)
        if why is not None:
            raise RowError(field, f"is text that looks like a JSON list but does not parse ({why}). "
                                  "Fix the JSON in this cell.")
    if value is None:
        raise RowError(field, "is missing or null. Give a list of messages.")
    if not isinstance(value, (list, tuple)):
        raise RowError(field, f"is {describe(value)}, not a list of messages. Give a JSON list such as "
                              '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].')
    return list(value)


def check_text(value: Any, field: str) -> str:
    """A turn's text: a non-blank string without control characters."""
    if not isinstance(value, str):
        what = describe(value)
        fix = ("Put the text in quotes." if isinstance(value, (int, float)) and not isinstance(value, bool)
               else "Give the text as one string (or a list of text content parts; images and tool calls are not supported).")
        raise RowError(field, f"is {what}, not text. {fix}")
    if not value.strip():
        raise RowError(field, ("is empty." if not value else "is only whitespace.")
                       + " Write the text of this turn, or delete the turn.")
    bad = _CONTROL_CHARS.search(value)
    if bad:
        raise RowError(field, f"contains the control character U+{ord(bad.group()):04X} at character "
                              f"{bad.start()}. Remove it (only newline, tab and carriage return are allowed).")
    return value


def content_text(value: Any, field: str) -> str:
    """A message's content: a string, or OpenAI's list of content parts when every part is text
    ([{"type": "text", "text": "Hi"}, ...], joined with newlines as vLLM does); other parts are refused."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(part, Mapping) for part in value):
        return check_text(value, field)  # a plain list (of strings, ...) is not OpenAI's parts: "not text"
    if not value:
        raise RowError(field, "is an empty list of content parts. Write the text of this turn, or delete the turn.")
    texts = []
    for i, part in enumerate(value):
        where = f"{field}[{i}]"
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise RowError(where, f"is a {kind!r} content part; only text parts are supported (phi3_lora trains "
                                  "text-only chat models). Remove the part, or replace it with its text.")
        if not isinstance(part.get("text"), str):
            raise RowError(f"{where}.text", f"is {describe(part.get('text'))}, not text. Give the part's text as "
                                            "a string.")
        texts.append(part["text"])
    return check_text("\n".join(texts), field)


def _message(item: Any, field: str, roles: Mapping[str, str], mapping: Mapping[str, str]) -> dict[str, str]:
    """One message dict -> {"role", "content"}; takes role/content or ShareGPT's from/value keys."""
    if not isinstance(item, Mapping):
        raise RowError(field, f"is {describe(item)}, not an object with role and content.")
    role_key = _column("role", mapping) if _column("role", mapping) in item else "from"
    content_key = _column("content", mapping) if _column("content", mapping) in item else "value"
    if role_key not in item:
        raise RowError(f"{field}.role", f"is missing (keys found: {', '.join(map(str, item)) or 'none'}). "
                                        "Give each message a role: system, user or assistant.")
    if content_key not in item:
        raise RowError(f"{field}.content", f"is missing (keys found: {', '.join(map(str, item))}). "
                                           "Give each message its text under content.")
    raw_role = item[role_key]
    if not isinstance(raw_role, str):
        raise RowError(f"{field}.{role_key}", f"is {describe(raw_role)}; give system, user or assistant.")
    role = roles.get(raw_role, roles.get(raw_role.strip().lower()))
    if role is None:
        suggestion = SHAREGPT_ROLES.get(raw_role.strip().lower(), "user or assistant")
        raise RowError(f"{field}.{role_key}", f"is {raw_role[:40]!r}, which is not a known role (known: "
                                              f"{', '.join(sorted(roles))}). Rename it, or map it with "
                                              f"data.mapping {{role.{raw_role[:40]}: {suggestion}}}"
                                              + (" or data.format sharegpt." if raw_role.lower() in SHAREGPT_ROLES
                                                 else "."))
    return {"role": role, "content": content_text(item[content_key], f"{field}.{content_key}")}


def check_order(messages: list[dict[str, str]], names: list[str]) -> None:
    """Optional system first, then user/assistant alternating, ending on an assistant turn."""
    if not messages:
        raise RowError(names[0] if names else "messages", "has no messages. Add a user turn and an assistant reply.")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise RowError(f"{names[i]}.role", "is a system turn that is not first. Move the system prompt "
                                               "to the start of the conversation, or make it a user turn.")
    turns = [(m["role"], names[i]) for i, m in enumerate(messages) if m["role"] != "system"]
    if not turns:
        raise RowError(names[0], "holds only a system prompt. Add a user turn and an assistant reply.")
    if turns[0][0] == "assistant":
        raise RowError(f"{turns[0][1]}.role", "is an assistant turn before any user turn. Start the "
                                              "conversation with the user's message.")
    for (prev, _), (role, name) in zip(turns, turns[1:]):
        if role == prev:
            raise RowError(f"{name}.role", f"is a second {role} turn in a row. Merge the two turns, or put "
                                           f"the {'assistant reply' if role == 'user' else 'user message'} "
                                           "between them.")
    if not any(r == "assistant" for r, _ in turns):
        raise RowError(names[0].split("[")[0], "has no assistant turn, so there is nothing to learn. "
                                               "Add the assistant's reply.")
    if turns[-1][0] != "assistant":
        raise RowError(f"{turns[-1][1]}.role", "is the last turn but is not an assistant turn (nothing "
                                               "trains on it). Add the assistant's reply or delete this turn.")


def _messages_list(value: Any, field: str, roles: Mapping[str, str],
                   mapping: Mapping[str, str]) -> tuple[list[dict[str, str]], list[str]]:
    items = _as_list(value, field)
    names = [f"{field}[{i}]" for i in range(len(items))]
    if not items:
        raise RowError(field, "is an empty list. Add a user turn and an assistant reply.")
    return [_message(item, name, roles, mapping) for item, name in zip(items, names)], names


def _get(record: Mapping[str, Any], name: str, mapping: Mapping[str, str], *, required: bool) -> Any:
    column = _column(name, mapping)
    if column not in record:
        if not required:
            return None
        raise RowError(column, f"is missing (this row has {', '.join(map(str, record)) or 'no columns'}). "
                               f"Add it, or name the column that holds it with data.mapping {{{name}: <column>}}.")
    return record[column]


def _optional_text(record: Mapping[str, Any], name: str, mapping: Mapping[str, str]) -> str:
    """Optional columns may be absent, null or empty (CSV cells are never absent)."""
    value = _get(record, name, mapping, required=False)
    if value is None or value == "":
        return ""
    return check_text(value, _column(name, mapping))


def _alpaca(record: Mapping[str, Any], mapping: Mapping[str, str]) -> tuple[list[dict[str, str]], list[str]]:
    instruction = check_text(_get(record, "instruction", mapping, required=True), _column("instruction", mapping))
    extra = _optional_text(record, "input", mapping)
    output = check_text(_get(record, "output", mapping, required=True), _column("output", mapping))
    system = _optional_text(record, "system", mapping)
    messages: list[dict[str, str]] = []
    names: list[str] = []
    if system:
        messages.append({"role": "system", "content": system})
        names.append(_column("system", mapping))
    history = _get(record, "history", mapping, required=False)
    if history not in (None, "", []):
        field = _column("history", mapping)
        for i, pair in enumerate(_as_list(history, field)):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RowError(f"{field}[{i}]", f"is {describe(pair)}; each history item must be a "
                                                "[user, assistant] pair of strings.")
            messages += [{"role": "user", "content": check_text(pair[0], f"{field}[{i}][0]")},
                         {"role": "assistant", "content": check_text(pair[1], f"{field}[{i}][1]")}]
            names += [f"{field}[{i}][0]", f"{field}[{i}][1]"]
    messages += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                 {"role": "assistant", "content": output}]
    names += [_column("instruction", mapping), _column("output", mapping)]
    return messages, names


def _prompt_completion(record: Mapping[str, Any], mapping: Mapping[str, str],
                       roles: Mapping[str, str]) -> tuple[list[dict[str, str]], list[str]]:
    parts: dict[str, tuple[list[dict[str, str]], list[str]]] = {}
    for name, default_role in (("prompt", "user"), ("completion", "assistant")):
        value = _get(record, name, mapping, required=True)
        column = _column(name, mapping)
        if isinstance(value, (list, tuple)) or (isinstance(value, str) and value.lstrip().startswith("[{")):
            parts[name] = _messages_list(value, column, roles, mapping)  # trl's conversational form
        else:
            parts[name] = [{"role": default_role, "content": check_text(value, column)}], [column]
    system = _optional_text(record, "system", mapping)
    head = ([{"role": "system", "content": system}], [_column("system", mapping)]) if system else ([], [])
    return (head[0] + parts["prompt"][0] + parts["completion"][0],
            head[1] + parts["prompt"][1] + parts["completion"][1])


def normalise_record(record: Any, fmt: str, mapping: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """One raw row -> a validated list of {"role", "content"} messages, or RowError(field, message)."""
    mapping = dict(mapping or {})
    if not isinstance(record, Mapping):
        raise RowError("(row)", f"is {describe(record)}, not an object with named fields. "
                                "Write each row as a JSON object, e.g. {\"messages\": [...]}.")
    roles = role_map(fmt, mapping)
    if fmt in ("messages", "sharegpt"):
        name = COLUMNS[fmt][0]
        if fmt == "sharegpt" and _column(name, mapping) not in record and _column("messages", mapping) in record:
            name = "messages"  # ShareGPT turns stored under a `messages` column
        column = _column(name, mapping)
        messages, names = _messages_list(_get(record, name, mapping, required=True), column, roles, mapping)
    elif fmt == "alpaca":
        messages, names = _alpaca(record, mapping)
    elif fmt == "prompt_completion":
        messages, names = _prompt_completion(record, mapping, roles)
    else:
        raise UserError(f"Unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    check_order(messages, names)
    size = sum(len(m["content"]) for m in messages)
    if size > MAX_ROW_CHARS:
        raise RowError(names[0].split("[")[0], f"holds {size:,} characters, far more than any max_length can "
                                               "train on. Split it into shorter conversations.")
    return messages
