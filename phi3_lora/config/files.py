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


def _check_depth(text: str) -> None:
    """Refuse deeply nested YAML from its event stream (libyaml's when installed: milliseconds), before building
    it: composing thousands of levels takes seconds in PyYAML and then overflows the recursion limit."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise RecursionError
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


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
        _check_depth(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{name} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a torn write, or not a text file
        raise UserError(f"{name} is not UTF-8 text (byte {exc.start}): it may have been cut short.") from None
    except RecursionError:
        raise UserError(f"{name} nests too deeply to be a run config.") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{name} must hold a mapping with model/lora/train/data sections.")
    try:
        return from_dict(data)
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type that a check tripped on
        raise UserError(f"{name} has a value of the wrong type ({exc}).") from None


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(config), encoding="utf-8")
