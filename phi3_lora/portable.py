"""What an export says about the machine it was trained on: nothing but names.

An adapter zip is open to any visitor (access.Action.EXPORT_ZIP) and a push publishes the same files, so its config,
run summary, adapter_config.json and model card must not carry the trainer's paths: the data file, a local base model
folder, a chat template file. Each is replaced by what another machine can use (pure functions):

- a local base model folder -> its folder name (put a copy of that model there, or use its Hub id); the embedded
  model keeps its name (phi3_lora converts it anywhere) and is the Hub's SmolLM2 for plain transformers/peft;
- the bundled sample data -> data/sample_chat.jsonl, where every phi3_lora checkout has it;
- any other data file or template file -> its file name (runs.shown_path);
- Hub ids and template text stay as they are.

The card lists what was replaced, so whoever downloads the zip knows what to point at their own copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_lora.config import RunConfig

# The sample conversations bundled with phi3_lora (public: any visitor may validate and train on them).
BUNDLED_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_chat.jsonl"
SAMPLE_IN_CHECKOUT = "data/sample_chat.jsonl"


def is_local_model(name: str) -> bool:
    """A base model name that is a folder of this machine rather than a Hub id or the embedded model."""
    from phi3_lora.embedded import is_embedded

    name = (name or "").strip()
    if not name or is_embedded(name) or name.lower() == "auto":
        return False
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or name[1:3] in (":\\", ":/"):
        return True
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError):
        return True


def model_name(name: str) -> str:
    """The base model as the config of an export names it: a local folder by its name, else unchanged."""
    return Path(name.strip().replace("\\", "/")).name if is_local_model(name) else name


def hub_base(name: str) -> str:
    """The base model as plain transformers/peft load it elsewhere: the Hub id of the embedded model, a local
    folder by its name (a folder of that name beside the user, or replace it with the model's Hub id)."""
    from phi3_lora.embedded import HUB_ID, is_embedded

    return HUB_ID if is_embedded(name) else model_name(name)


def _is_sample(source: str, sample: Path) -> bool:
    try:
        return Path(source).resolve() == sample.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


@dataclass(frozen=True)
class Portable:
    config: RunConfig
    replaced: tuple[str, ...]  # one line per field whose value was a path of the trainer's machine


def portable_config(config: RunConfig, sample: Path = BUNDLED_SAMPLE) -> Portable:
    """`config` with the trainer's paths replaced by names (see the module's docstring), and what was replaced."""
    from phi3_lora.models import template_is_text
    from phi3_lora.readers import is_hub_id
    from phi3_lora.runs import shown_path

    replaced: list[str] = []
    model, data = {}, {}
    name = config.model.name
    if is_local_model(name):
        model["name"] = model_name(name)
        replaced.append(f"model.name: a folder on the trainer's machine, named here by its folder name "
                        f"`{model['name']}`; point it at your copy of that model (or its Hub id)")
    template = config.model.chat_template
    if template and not template_is_text(template):
        model["chat_template"] = Path(template.replace("\\", "/")).name
        replaced.append(f"model.chat_template: a file on the trainer's machine, named here by its file name "
                        f"`{model['chat_template']}`; the adapter's chat_template.jinja is the template it trained "
                        f"with")
    source = (config.data.source or "").strip()
    if source and _is_sample(source, sample):
        data["source"] = SAMPLE_IN_CHECKOUT
        replaced.append(f"data.source: phi3_lora's bundled sample data, `{SAMPLE_IN_CHECKOUT}` in a phi3_lora "
                        "checkout")
    elif source and not is_hub_id(source):
        data["source"] = Path(shown_path(source)).name or "data.jsonl"
        replaced.append(f"data.source: a file on the trainer's machine, named here by its file name "
                        f"`{data['source']}`; point it at your copy of the data")
    sections: dict[str, Any] = {k: v for k, v in (("model", model), ("data", data)) if v}
    return Portable(config.replace(**sections) if sections else config, tuple(replaced))


def portable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """run_summary.json as an export carries it: its base model named like the config's."""
    if isinstance(summary.get("model"), str):
        return {**summary, "model": model_name(summary["model"])}
    return summary
