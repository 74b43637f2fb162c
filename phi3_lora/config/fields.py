"""The machinery every settings section uses: a field with its metadata (help, label, widget, choices, range),
the one generic check of a value against its field (type, finiteness, choices, range), and reading form / YAML /
CLI text as the field's type. The sections themselves are in schema.py."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import field, fields
from typing import Any, Literal, Union

from phi3_lora.errors import UserError

def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (our per-field docstring)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})



def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)



_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false", list: "a list",
               dict: "a mapping", type(None): "empty"}


def _matches_type(value: Any, tp: Any) -> bool:
    """Whether `value` fits the field annotation `tp` (pure; the annotations RunConfig uses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches_type(value, arg) for arg in typing.get_args(tp))
    if origin in (list, dict):
        args = typing.get_args(tp)
        if origin is list:
            return isinstance(value, list) and all(_matches_type(v, args[0]) for v in value)
        return isinstance(value, dict) and all(_matches_type(k, args[0]) and _matches_type(v, args[1])
                                               for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_words(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_words(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_words(typing.get_args(tp)[0])}"
    return _TYPE_WORDS.get(origin or tp, getattr(tp, "__name__", str(tp)))


def check_fields(section: Any) -> None:
    """The one check every field of a settings section passes, driven by the schema: the value has the field's
    type; a number is finite (NaN and infinity train garbage or crash); it is one of the field's `choices` (each
    item, for a list) unless the field takes `custom` values; it lies within the bounds in the field's metadata
    (gt, ge, lt, le). Per-field rules that metadata cannot say stay in each __post_init__."""
    name = getattr(section, "SECTION", type(section).__name__)
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        value, where = getattr(section, f.name), f"{name}.{f.name}"
        if not _matches_type(value, hints[f.name]):
            raise UserError(f"{where} must be {_type_words(hints[f.name])}; got {value!r}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where} must be a finite number; got {value!r}.")
        _check_choice(f, value, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = {k: f.metadata[k] for k in ("gt", "ge", "lt", "le") if k in f.metadata}
        tests = {"gt": value > bounds.get("gt", 0), "ge": value >= bounds.get("ge", 0),
                 "lt": value < bounds.get("lt", 0), "le": value <= bounds.get("le", 0)}
        failed = [k for k in bounds if not tests[k]]
        if failed:
            words = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}
            rule = " and ".join(f"{words[k]} {bounds[k]:,}" for k in bounds)
            raise UserError(f"{where} must be {rule}; got {value!r}.")



def _check_choice(f: Any, value: Any, where: str) -> None:
    choices = f.metadata.get("choices")
    if choices is None or f.metadata.get("custom"):
        return
    if isinstance(value, list):
        bad = [v for v in value if v not in choices]
        if bad:
            raise UserError(f"{where} has unknown value(s) {bad}; choose from {', '.join(map(str, choices))}.")
    elif value not in choices:
        words = " or ".join(map(str, choices)) if len(choices) == 2 else f"one of {', '.join(map(str, choices))}"
        raise UserError(f"{where} must be {words}; got {value!r}.")


def field_bounds(cls: type, name: str) -> tuple[float | None, float | None]:
    """(lowest, highest) value field `name` of settings section `cls` allows, both inclusive, from the same
    metadata check_fields enforces; None where unbounded. The widgets (Settings, Dataset, Compare's seed) take
    their ranges from here. For a whole-number field an exclusive bound is the next whole number inside it
    (lt=2**32 allows at most 2**32 - 1; gt=0 at least 1). A float's exclusive bound (gt/lt) is returned as the
    bound itself, since a widget's minimum and maximum are inclusive and no float "just inside" is worth
    showing: the widget lets the bound through and check_fields refuses it with its message."""
    f = next(x for x in fields(cls) if x.name == name)
    tp = typing.get_type_hints(cls)[name]
    numbers = {a for a in (typing.get_args(tp) or (tp,)) if a in (int, float)}
    step = 1 if numbers == {int} else 0
    m = f.metadata
    low = m["ge"] if "ge" in m else m["gt"] + step if "gt" in m else None
    high = m["le"] if "le" in m else m["lt"] - step if "lt" in m else None
    return low, high


_EMPTY = ("", "none", "null")


def coerce_value(value: Any, tp: Any) -> Any:
    """`value` as type `tp` where it can be read as one (pure): "3" -> 3 for int, 2 -> 2.0 for float,
    "true" -> True for bool, "" -> None where None is allowed; a Union tries its members in order."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _EMPTY)):
            return None
        members = [a for a in args if a is not type(None)]
        exact = next((a for a in members if _matches_type(value, a)), None)
        if exact is not None:
            return coerce_value(value, exact)
        for member in members:
            turned = coerce_value(value, member)
            if _matches_type(turned, member):
                return turned
        return value
    if tp is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if tp is int and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if tp is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
    return value




def parse_text(text: str, tp: Any) -> Any:
    """A value written as text (a CLI flag) as field type `tp`: read as YAML (lists, numbers, booleans, null),
    except where YAML makes of it something the field does not take and the text itself fits: a model named
    'embedded: SmolLM2-135M-Instruct' is not a mapping, a file named 2024 not a number."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not _matches_type(coerce_value(value, tp), tp) and _matches_type(text, tp):
        return text
    return value


def coerce_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML, CLI and form values arrive as strings or floats; turn each into its field's type (from the
    resolved annotations, typing.get_type_hints). What cannot be turned is left for check_fields to refuse."""
    hints = typing.get_type_hints(cls)
    return {key: coerce_value(value, hints[key]) for key, value in values.items()}


