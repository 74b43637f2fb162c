"""`RunConfig`: the single source of truth for every knob of a run, and what reads and writes it.

    schema.py   the four sections (model, lora, train, data) and RunConfig: every field's default, help, widget,
                range and choices; from_dict builds a checked RunConfig from nested dicts
    fields.py   the machinery behind the schema: the generic check of a value against its field's metadata
                (type, finiteness, choices, range) and typed coercion of form / YAML / CLI text
    files.py    YAML: a commented dump, and a bounded, checked load
    presets.py  named starting points and advice about a valid but unlikely config
    recipe.py   the Phi-3 cookbook's training_config / peft_config dicts, loaded unchanged

Import from here (`from phi3_lora import config`; `config.RunConfig`): these names are the package's interface.
"""

from phi3_lora.config.fields import coerce_value, field_bounds, parse_text
from phi3_lora.config.files import dump_yaml, load_yaml, save_yaml
from phi3_lora.config.presets import PRESET_NAMES, PRESETS, preset, preset_warnings
from phi3_lora.config.recipe import Hardware, from_recipe, recipe_dtype
from phi3_lora.config.schema import (DATA_FORMATS, SECTIONS, BoolOrAuto, DataSettings, LoraSettings, ModelSettings,
                                     RunConfig, TrainSettings, from_dict, help_text)

__all__ = ["BoolOrAuto", "DATA_FORMATS", "DataSettings", "Hardware", "LoraSettings", "ModelSettings", "PRESETS",
           "PRESET_NAMES", "RunConfig", "SECTIONS", "TrainSettings", "coerce_value", "dump_yaml", "field_bounds",
           "from_dict", "from_recipe", "help_text", "load_yaml", "parse_text", "preset", "preset_warnings", "recipe_dtype",
           "save_yaml"]
