"""`export --gguf`: a run's merged model as a GGUF file, an Ollama Modelfile beside it and the commands that
run it in llama.cpp and Ollama, verified in a fresh process before it is called done.

The export folder holds:
  <name>-<type>.gguf   the model, tokenizer, special tokens and chat template (gguf_export.py)
  Modelfile            FROM ./<name>-<type>.gguf, TEMPLATE, stop tokens, default sampling (ollama.py)
  README.md            the commands, and the verification figures
  verification.json    the same figures, for tools (gguf_verify.py)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_lora import gguf_export, ollama
from phi3_lora.errors import UserError
from phi3_lora.gguf_verify import GgufCheck, verify_gguf
from phi3_lora.runs import write_atomic

GGUF_TYPES = gguf_export.GGUF_TYPES
DEFAULT_CONTEXT = 4096  # Ollama's num_ctx default written to the Modelfile (capped by the model's context)


@dataclass
class GgufExport:
    folder: Path
    gguf: Path
    size_bytes: int
    modelfile: Path
    commands: dict[str, str]
    check: GgufCheck | None

    def summary(self) -> str:
        lines = [f"GGUF: {self.gguf} ({self.size_bytes / 2**20:.1f} MiB)", f"Modelfile: {self.modelfile}"]
        lines.append(self.check.summary() if self.check else "not verified (--no-verify)")
        return "\n".join(lines)


def _template(tokenizer: Any) -> str | None:
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def stop_strings(tokenizer: Any, template: str) -> list[str]:
    """The end-of-turn token and EOS: where Ollama must stop."""
    stops = [gguf_export.turn_end_token(tokenizer, template), tokenizer.eos_token]
    return list(dict.fromkeys(s for s in stops if s))


def readme(export_name: str, gguf_name: str, commands: dict[str, str], check: GgufCheck | None) -> str:
    runs = "\n".join(f"# {what}\n{cmd}" for what, cmd in commands.items())
    verdict = check.summary() if check else "Not verified."
    return (f"# {export_name} as GGUF\n\n`{gguf_name}` was written by phi3_lora from the merged model "
            f"(base + LoRA).\n\n## Run it\n\nIn this folder:\n\n```bash\n{runs}\n```\n\n## Verification\n\n{verdict}\n")


def bundle_from_merged(merged_dir: Path, out_dir: Path, gguf_type: str = "f16", *, name: str,
                       prompts: list[list[dict[str, str]]], prompt_source: str, pre: str | None = None,
                       verify: bool = True, file_name: str | None = None) -> GgufExport:
    """Write the GGUF, Modelfile and README for a merged (or any plain transformers) folder and verify it."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_export.write_gguf(merged_dir, out_dir / (file_name or f"{name}-{gguf_type}.gguf"), gguf_type,
                                       name=name, pre=pre)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    template = _template(tokenizer)
    if not template:
        raise UserError("The merged model has no chat template, so no Ollama TEMPLATE can be written.",
                        hint="Set model.chat_template for the run, or use the GGUF with llama.cpp directly.")
    template = gguf_export.strip_generation_markers(template)
    pieces = ollama.template_pieces(
        lambda m: tokenizer.apply_chat_template(m, chat_template=template, tokenize=False, add_generation_prompt=True),
        tuple(tokenizer.all_special_tokens))
    context = json.loads((merged_dir / "config.json").read_text())["max_position_embeddings"]
    modelfile = out_dir / "Modelfile"
    write_atomic(modelfile, ollama.modelfile(gguf_path.name, pieces, stop_strings(tokenizer, template),
                                            num_ctx=min(int(context), DEFAULT_CONTEXT)))
    commands = ollama.run_commands(gguf_path, ollama.ollama_name(name))
    check = verify_gguf(gguf_path, merged_dir, prompts, gguf_type, prompt_source) if verify else None
    if check:
        write_atomic(out_dir / "verification.json", json.dumps(check.to_json(), indent=2))
    # The README travels with the folder (a download unpacks it under the run's name, a copy): its commands run
    # in the folder that holds it, never from the server's absolute path or this folder's name here.
    portable = ollama.run_commands(Path(gguf_path.name), ollama.ollama_name(name))
    write_atomic(out_dir / "README.md", readme(name, gguf_path.name, portable, check))
    return GgufExport(out_dir, gguf_path, gguf_path.stat().st_size, modelfile, commands, check)


def embedded_pre(model_name: str) -> str | None:
    """The embedded model came from a GGUF: keep the pre-tokenizer name that file gives (SmolLM2's 'smollm'),
    which its transformers tokenizer.json no longer spells out."""
    from phi3_lora.embedded import embedded_gguf_path, is_embedded

    if not is_embedded(model_name):
        return None
    import gguf

    field = gguf.GGUFReader(str(embedded_gguf_path())).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _destination(out: str | Path) -> tuple[Path, str | None]:
    out = Path(out)
    return (out.parent, out.name) if out.suffix == ".gguf" else (out, None)


def export_gguf(run_or_adapter: str | Path, out: str | Path, gguf_type: str = "f16", *,
                merged_dir: str | Path | None = None, merge_base: str = "auto", verify: bool = True) -> GgufExport:
    """Merge the run's adapter (unless `merged_dir` already holds that merge; `merge_base` as export.merge_adapter),
    write the GGUF bundle into `out` (a folder, or a path ending in .gguf), and verify it on the run's held-out
    prompts against that merged model."""
    from phi3_lora import export
    from phi3_lora.adapter_folder import locate_adapter
    from phi3_lora.verify import held_out_prompts

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"Unknown GGUF type {gguf_type!r}.", hint=f"Use one of {', '.join(GGUF_TYPES)}.")
    from phi3_lora.runs import find_run

    ref = locate_adapter(run_or_adapter)
    run = find_run(ref.adapter_dir)
    name = run.run_id if run else ref.adapter_dir.name
    folder, file_name = _destination(out)
    prompts, source = held_out_prompts(ref.adapter_dir)
    source = f"{len(prompts)} {'held-out prompts' if source == 'held-out' else 'probe prompts (no held-out rows)'}"
    merged = Path(merged_dir) if merged_dir else None
    temporary = None
    if merged is None:
        gguf_export.check_architecture(_base_config(ref.model_name))  # refuse before the slow merge
        # Inside the export folder: whoever the export counts for (quotas.run_bytes_of) holds its peak, the merge
        # and the GGUF together (export.expected_export_bytes), and one removed folder takes both.
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        temporary = folder / f"{MERGE_TEMPORARY}{os.getpid()}"
    try:
        if temporary is not None:  # not verified on its own: the GGUF is checked against exactly this folder below
            merged = export.merge_adapter(run_or_adapter, temporary, base=merge_base, verify=False)
        return bundle_from_merged(merged, folder, gguf_type, name=name, prompts=prompts,
                                  prompt_source=source, pre=embedded_pre(ref.model_name), verify=verify,
                                  file_name=file_name)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
            if created and not any(folder.iterdir()):  # a failed first export leaves no empty folder behind
                folder.rmdir()


MERGE_TEMPORARY = ".merged-tmp-"  # + the pid of the export: the temporary 16-bit merge inside the export folder
_TEMPORARY = re.compile(r"^\..*tmp-(\d+)")  # ours, and merge_adapter's and write_gguf's temporary names in it


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove what a killed export left in its export folder (a temporary merge, a half-written GGUF): the temporary
    names whose process is gone. A live export's (a CLI beside the app) stays."""
    from phi3_lora.runs import pid_alive

    removed = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        match = _TEMPORARY.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sweep_stale_temporaries(runs_dir: Path) -> list[Path]:
    """What killed GGUF exports left in the export folders of `runs_dir`'s runs (an app that was stopped or crashed
    mid-export: its temporary merge, a whole 16-bit model): removed at the app's start, not only when somebody exports
    into that folder again."""
    from phi3_lora.runs import run_dirs

    removed = []
    for run in run_dirs(runs_dir):
        try:
            folders = [p for p in run.path.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            continue
        for folder in folders:
            if any(folder.glob(f"{MERGE_TEMPORARY}*")) or any(folder.glob(f".{MERGE_TEMPORARY}*")):
                removed += remove_stale_temporaries(folder)
    return removed


def _base_config(model_name: str) -> dict[str, Any]:
    from transformers import AutoConfig

    from phi3_lora import models

    name, _ = models.resolve_name(model_name)
    return AutoConfig.from_pretrained(models.local_path(name)).to_dict()
