"""An adapter folder: where it is (a run, a checkpoint or a bare adapter), which base model and settings it belongs
to, the chat template its training used, and that its weights load without unpickling anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_lora.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_safetensors(adapter_dir: Path) -> None:
    """Adapters load from safetensors only: a pickled adapter_model.bin could run code when unpickled."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_WEIGHTS).exists():
        return
    pickles = sorted(p.name for p in adapter_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise UserError(f"{adapter_dir} has its weights only as {', '.join(pickles)} (a pickle file); phi3_lora loads "
                        f"adapters only from {ADAPTER_WEIGHTS}, because unpickling a file can run code.",
                        hint="Convert it where you trust the file: load it with peft and call "
                             "save_pretrained(folder, safe_serialization=True), then use that folder.")
    raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}.", hint="Pick a finished run or one of its checkpoints.")


def adapter_chat_template(adapter_dir: Path) -> str | None:
    """The chat template training used, saved beside the adapter (chat_template.jinja or tokenizer_config.json)."""
    adapter_dir = Path(adapter_dir)
    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = adapter_dir / "tokenizer_config.json"
    if config.is_file():
        import json

        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None


def run_model_settings(adapter_dir: Path) -> Any:
    """The run's ModelSettings (4-bit type, double quant, dtype) for an adapter folder, or None."""
    try:
        return locate_adapter(adapter_dir).settings
    except UserError:
        return None


@dataclass
class AdapterRef:
    """Where an adapter is and which base model it belongs to."""

    adapter_dir: Path
    model_name: str
    load_in_4bit: bool
    settings: Any = None  # the run's ModelSettings (quantisation, dtype) when the run recorded them


def locate_adapter(path: str | Path) -> AdapterRef:
    """Accept a run folder (its final adapter, else its newest checkpoint), a checkpoint or an adapter folder."""
    import json

    from phi3_lora.config import load_yaml
    from phi3_lora.runs import RunDir, find_run

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.", hint="Give a run folder such as runs/<id> or an adapter folder.")
    as_run = RunDir(path)
    if as_run.has_adapter():
        adapter = as_run.adapter
    elif (path / RunDir.ADAPTER_CONFIG).exists():
        adapter = path
    elif (ckpt := as_run.last_checkpoint()) is not None:
        adapter = ckpt
    else:
        raise UserError(f"{path} holds no adapter yet (no adapter/ and no complete checkpoint).",
                        hint="Wait for the run to save a checkpoint, or pick a finished run.")
    require_safetensors(adapter)
    run = find_run(adapter)
    if run is not None and (name := run.resolved_model()) is not None:
        model = load_yaml(run.config).model
        return AdapterRef(adapter, name, model.load_in_4bit, model)
    if (adapter / RunDir.CONFIG).exists():
        cfg = load_yaml(adapter / RunDir.CONFIG)
        return AdapterRef(adapter, cfg.model.name, cfg.model.load_in_4bit, cfg.model)
    base = json.loads((adapter / RunDir.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "auto"
    return AdapterRef(adapter, base, False)
