"""An adapter folder: where it is (a run, a checkpoint or a bare adapter), which base model and settings it belongs
to, the chat template its training used, that its weights load without unpickling anything, and writing a run's
adapter folder whole or not at all."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_lora.config import save_yaml
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


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinite float as None (pure): run_summary.json travels with the adapter (Hub,
    bundles), and strict JSON readers (browsers, other languages) refuse Python's NaN. A NaN loss is logged as NaN
    since the step no longer filters it (speed/deferred_metrics.py)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def save_adapter_atomic(model: Any, tokenizer: Any, config: Any, summary: dict[str, Any], dest: Path) -> Path:
    """adapter/ with safetensors weights, config, tokenizer + chat template and the run summary; all or nothing."""
    from phi3_lora.runs import temporary_of

    tmp = temporary_of(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    _portable_base_name(tmp / "adapter_config.json", config.model.name)
    tokenizer.save_pretrained(tmp)
    save_yaml(config, tmp / "config.yaml")
    (tmp / "run_summary.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False),
                                          encoding="utf-8")
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _portable_base_name(adapter_config: Path, model_name: str) -> None:
    """base_model_name_or_path = the embedded model's Hub id instead of this machine's cache folder."""
    from phi3_lora.embedded import HUB_ID, is_embedded

    if not is_embedded(model_name):
        return
    cfg = json.loads(adapter_config.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = HUB_ID
    adapter_config.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
