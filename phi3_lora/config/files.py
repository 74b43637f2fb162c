"""A run config as a YAML file: written with a comment per field (torchtune-style), read back with limits on
size and nesting, every value checked by the schema."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from phi3_lora.config.schema import SECTIONS, RunConfig, from_dict
from phi3_lora.errors import UserError


def dump_yaml(config: RunConfig) -> str:
    """YAML with a comment line per field saying what it does (torchtune-style)."""
    lines = ["# phi3_lora run config. Every key is documented; `python -m phi3_lora train --config FILE`."]
    if config.preset:
        lines.append(f"preset: {config.preset}")
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        obj = getattr(config, section)
        for f in fields(cls):
            value = yaml.safe_dump({f.name: getattr(obj, f.name)}, default_flow_style=True, width=10_000,
                                   sort_keys=False).strip()[1:-1]
            lines.append(f"  # {f.metadata.get('help', '')}")
            lines.append(f"  {value}")
    return "\n".join(lines) + "\n"


MAX_CONFIG_BYTES = 1 << 20  # a full config is ~6 KB
MAX_CONFIG_DEPTH = 16       # sections, then a list or mapping value, with room to spare
# What the config holds with every alias (*name) written out, in characters: the file's own limit. A 1 KB file of
# nested aliases stands for billions of values; building them is cheap (aliases share one object), but every walk
# over them (a check, the message that quotes a wrong value) runs for hours and takes the memory with it.
MAX_CONFIG_EXPANDED = MAX_CONFIG_BYTES


class _TooLarge(Exception):
    pass


def _check_shape(text: str) -> None:
    """Refuse deeply nested YAML (RecursionError) and YAML whose aliases expand past MAX_CONFIG_EXPANDED (_TooLarge),
    from its event stream (libyaml's when installed: milliseconds), before building it: composing thousands of levels
    takes seconds in PyYAML and then overflows the recursion limit."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth, size = 0, 0
    anchored: dict[str, int] = {}   # anchor -> the expanded size of its node
    started: list[tuple[str | None, int]] = []  # open collections: (anchor, size when it started)
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            size += anchored.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            size += len(event.value) + 1
            if event.anchor:
                anchored[event.anchor] = len(event.value) + 1
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise RecursionError
            started.append((event.anchor, size))
            size += 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            anchor, before = started.pop()
            if anchor:
                anchored[anchor] = size - before
        if size > MAX_CONFIG_EXPANDED:
            raise _TooLarge


def load_yaml(path: str | Path, shown_as: str | None = None) -> RunConfig:
    """The RunConfig of a YAML file. `shown_as`: how the messages name the file (a web upload: its name, never the
    server's folder it was saved in); the path itself by default."""
    path = Path(path)
    name = shown_as or str(path)
    if not path.is_file():
        raise UserError(f"Config file {name} does not exist.", hint="Check the path, or write one with "
                        "`python -m phi3_lora train --print-config > run.yaml`.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{name} is too large to be a run config ({path.stat().st_size:,} bytes).")
    try:
        text = path.read_text(encoding="utf-8")
        _check_shape(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{name} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a torn write, or not a text file
        raise UserError(f"{name} is not UTF-8 text (byte {exc.start}): it may have been cut short.") from None
    except RecursionError:
        raise UserError(f"{name} nests too deeply to be a run config.") from None
    except _TooLarge:
        raise UserError(f"{name} is too large to be a run config once its aliases (*name) are written out.",
                        hint="Write each value once, without repeating aliases of aliases; a full config is ~6 KB.") \
            from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{name} must hold a mapping with model/lora/train/data sections.")
    try:
        return from_dict(data)
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type that a check tripped on
        raise UserError(f"{name} has a value of the wrong type ({exc}).") from None


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(config), encoding="utf-8")
