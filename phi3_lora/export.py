"""Take a trained adapter out: a zip bundle, a merged 16-bit model, or a push to the Hub.

Weights leave as safetensors only. Folders are written to a temp name and renamed, so an
interrupted merge never leaves something that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

from phi3_lora.config import RunConfig, load_yaml
from phi3_lora.errors import UserError
from phi3_lora.generate import AdapterRef, locate_adapter
from phi3_lora.runs import RunDir, adapter_config_file, find_run

# Files of an adapter folder that belong in a bundle (weights are safetensors only).
BUNDLE_SUFFIXES = (".safetensors", ".json", ".jinja", ".yaml", ".model", ".txt", ".md")


def _summary(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "run_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _config(ref: AdapterRef) -> RunConfig | None:
    path = adapter_config_file(ref.adapter_dir)
    return load_yaml(path) if path is not None else None


def _usage_peft(hub_base: str) -> str:
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{hub_base}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # carries the chat template used in training
```"""


def _usage_sliced(hub_base: str) -> str:
    # Slices of Phi-3's fused layers are separate modules in this adapter; stock peft would not find them.
    return f"""This adapter trains slices of Phi-3's fused layers (`lora.fused_slices`), so load it with
phi3_lora, which splits the base to match (or use the merged export, which is a stock Phi-3):

```python
import phi3_lora

base = phi3_lora.load_base("{hub_base}")
model = phi3_lora.load_lora(base, "path/to/this/folder")
```"""


def model_card(ref: AdapterRef, summary: dict[str, Any], config: RunConfig | None) -> str:
    """A Hub-style README for the adapter: what it is, how to load it, how it was trained (pure)."""
    base = ref.model_name
    hub_base = base if not base.startswith("embedded:") else "HuggingFaceTB/SmolLM2-135M-Instruct"
    metrics = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if v is not None) or "| - | - |"
    yaml_cfg = config.to_yaml() if config else "# config not recorded"
    from phi3_lora.fused import split_needed

    usage = _usage_peft(hub_base) if not split_needed(ref.adapter_dir) else _usage_sliced(hub_base)
    return f"""---
library_name: peft
base_model: {hub_base}
tags: [lora, qlora, phi3_lora, sft]
---
# LoRA adapter for {base}

Trained with phi3_lora ({'QLoRA, 4-bit NF4 base' if ref.load_in_4bit else 'LoRA, 16-bit base'}).

## Use it

{usage}
## Final metrics

| metric | value |
|---|---|
{metrics}

## Training config

```yaml
{yaml_cfg}```
"""


def adapter_zip(run_or_adapter: str | Path, out_dir: str | Path) -> Path:
    """A zip with the adapter weights, its config, the tokenizer + chat template and a model card."""
    ref = locate_adapter(run_or_adapter)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_name = ref.adapter_dir.parent.name if ref.adapter_dir.name == RunDir.ADAPTER else ref.adapter_dir.name
    dest = out_dir / f"{run_name}-adapter.zip"
    tmp = dest.with_suffix(".zip.tmp")
    card = model_card(ref, _summary(ref.adapter_dir), _config(ref))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(ref.adapter_dir.iterdir()):
            if path.is_file() and path.suffix in BUNDLE_SUFFIXES and path.name != "README.md":
                zf.write(path, f"{run_name}/{path.name}")
        zf.writestr(f"{run_name}/README.md", card)
    os.replace(tmp, dest)
    return dest


def merged_dtype(setting: str, cuda: bool) -> Any:
    """The dtype a merged model is saved in (pure)."""
    import torch

    if setting != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]
    return torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16


def merge_adapter(run_or_adapter: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Fold the adapter into the base (in fp32) and save a standalone 16-bit model folder.

    `dtype`: auto = bfloat16 (float16 on GPUs without bf16); bfloat16 / float16 / float32 as asked
    (float32 keeps the exact merge, twice the size)."""
    import torch
    from peft import PeftModel

    from phi3_lora import fused, models
    from phi3_lora.config import ModelSettings

    ref = locate_adapter(run_or_adapter)
    out_dir = Path(out_dir)
    check_merge_destination(out_dir)  # before the minutes of loading and merging
    # Merge in fp32: adding a small LoRA update to bf16 (let alone 4-bit) weights rounds much of it away.
    # Then store 16-bit, the dtype the model is normally shipped and served in.
    base = models.load_model(ModelSettings(name=ref.model_name, load_in_4bit=False, dtype="float32"))
    fused.prepare_base(base, ref.adapter_dir)  # a lora.fused_slices adapter needs Phi-3's fused layers split
    model = PeftModel.from_pretrained(base, str(ref.adapter_dir))
    merged = fused.restore_fused_layers(model.merge_and_unload())  # back to the stock fused layout
    merged = merged.to(merged_dtype(dtype, models.cuda_available()))
    tokenizer = models.load_tokenizer(ref.model_name)
    if (ref.adapter_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ref.adapter_dir))
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.no_grad():
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(ref, _summary(ref.adapter_dir), _config(ref)).replace(
            "# LoRA adapter for", "# Merged model (base + LoRA) from"), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed merge (a full disk) must not keep gigabytes behind
        from phi3_lora.train import is_disk_full

        if isinstance(exc, Exception) and is_disk_full(exc):
            raise UserError(f"Not enough disk space to save the merged model in {out_dir.parent}.",
                            hint="Free some space or merge to another disk (CLI: export --merge PATH).") from None
        raise
    return out_dir


def check_merge_destination(out_dir: Path) -> None:
    """A merged model may replace an earlier merged model, never a file or a folder a run or adapter owns."""
    out_dir = Path(out_dir)
    run = find_run(out_dir.parent)
    owned = (RunDir(out_dir).exists() or (out_dir / RunDir.ADAPTER_CONFIG).exists()
             or (run is not None and out_dir.parent == run.path and out_dir.name in RunDir.reserved_names())
             or (run is not None and out_dir.parent != run.path))  # inside a run's adapter/ or checkpoints/
    if owned or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"Cannot save a merged model as {out_dir}: that name belongs to "
                        f"{'an existing file' if out_dir.is_file() else 'a run or an adapter'}.",
                        hint="Pick another folder name, e.g. merged.")


def resolve_token(token: str | None) -> str:
    token = (token or "").strip() or os.environ.get("HF_TOKEN", "").strip()
    if not token:
        try:
            from huggingface_hub import get_token

            token = get_token() or ""
        except Exception:  # an unreadable token file is the same as none
            token = ""
    if not token:
        raise UserError("No Hugging Face token: pushing needs one with write access.",
                        hint="Paste a token from huggingface.co/settings/tokens, or set HF_TOKEN.")
    return token


def push_to_hub(run_or_adapter: str | Path, repo_id: str, token: str | None, merged: bool = False,
                private: bool = True, work_dir: str | Path | None = None) -> str:
    """Upload the adapter (or a merged model) to a Hub model repo; returns its URL."""
    from huggingface_hub import HfApi

    repo_id = (repo_id or "").strip()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not a Hub repo id.", hint="Use the form your-name/model-name.")
    token = resolve_token(token)
    ref = locate_adapter(run_or_adapter)
    folder = ref.adapter_dir
    if merged:
        run = find_run(ref.adapter_dir)
        folder = merge_adapter(run_or_adapter, Path(work_dir or (run.path if run else ref.adapter_dir.parent)) / "merged")
    else:
        (folder / "README.md").write_text(model_card(ref, _summary(folder), _config(ref)), encoding="utf-8")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"phi3_lora upload {time.strftime('%Y-%m-%d %H:%M')}",
                          allow_patterns=[f"*{s}" for s in BUNDLE_SUFFIXES])
    except Exception as exc:  # network, auth and offline errors all become one actionable message
        raise UserError(f"Could not push to the Hub ({type(exc).__name__}: {str(exc)[:200]}).",
                        hint="Check the network, that the token has write access, and the repo id. "
                             "The adapter is safe on disk; download the zip instead.") from None
    return f"https://huggingface.co/{repo_id}"
