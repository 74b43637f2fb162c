"""Every export verifies itself: a fresh process loads it as a user would and must answer like the app.

The app's tuned answers (ChatEngine: the base as trained + the adapter, greedy) on the run's held-out prompts are
the reference. `verify_export` starts `verify_child.py` in a new Python (`-I`: no phi3_lora on its path, plain
transformers / peft only), which loads the exported file, answers the same prompts greedily and scores, token by
token, whether it picks the app's next token along the app's answer (teacher-forced argmax agreement).

    ref = verify.reference(locate_adapter(run_dir))            # or reference(ref, engine=the app's engine)
    result = verify.verify_export(path, "adapter" | "merged" | "gguf", ref)
    print(result.line())   # "verified: 8/8 held-out answers identical" or what differed
    verify.save(result, path)   # sidecar JSON read back by verify.load(path)

A new export format plugs in by adding its loader to verify_child.load (a `kind`) and calling verify_export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phi3_lora.errors import UserError
from phi3_lora import portable
from phi3_lora.runs import scrub_paths, write_atomic

Messages = list[dict[str, str]]
TOLERANCE = 0.99  # teacher-forced argmax agreement that still counts as verified when some answers differ
MAX_PROMPTS = 8
MAX_NEW_TOKENS = 32
CHILD = Path(__file__).with_name("verify_child.py")
KINDS = ("adapter", "merged", "gguf")
PROBES: tuple[str, ...] = ("What is your name?", "Explain in one sentence what a lighthouse does.",
                           "Write a short greeting.")


@dataclass
class Reference:
    """The app's tuned answers: what an export must reproduce."""

    prompts: list[Messages]
    answers: list[str]
    answer_ids: list[list[int]]
    stop_ids: list[int]
    max_new_tokens: int
    dtype: str                      # the compute dtype the app answered in
    device: str
    quantization: dict[str, Any] | None  # the run's 4-bit settings (a QLoRA adapter is loaded on them)
    source: str                     # "held-out" or "probe" (the run has no held-out rows)
    hub_alias: tuple[str, str] | None = None  # (Hub id, local folder): serve this base to the child offline
    answer_pieces: list[list[str]] | None = None  # each answer token decoded alone (to show where answers part)
    # (folder name, local folder): a local base, which an exported adapter names by its folder name only
    # (portable.hub_base); the child finds it as a folder of that name beside it, as a user who has a copy would
    local_base: tuple[str, str] | None = None


@dataclass
class Verification:
    kind: str
    total: int
    identical: int
    matches: int = 0
    positions: int = 0
    differences: list[str] = field(default_factory=list)  # quote the prompts and answers: the run's data
    loaded: str = ""
    source: str = "held-out"
    error: str | None = None
    seconds: float = 0.0
    differ_at: list[str] = field(default_factory=list)     # which answers differed where, without their text

    @property
    def agreement(self) -> float | None:
        return self.matches / self.positions if self.positions else None

    @property
    def ok(self) -> bool:
        if self.error is not None or self.total == 0:
            return False
        return self.identical == self.total or (self.agreement is not None and self.agreement >= TOLERANCE)

    def line(self) -> str:
        """One line for the UI, the CLI and the model card."""
        what = f"{self.source} answers"
        if self.error is not None:
            return f"NOT verified: {self.error}"
        if self.identical == self.total:
            return f"verified: {self.identical}/{self.total} {what} identical"
        agree = f"token agreement {self.agreement:.4f}" if self.agreement is not None else "no token agreement"
        if self.ok:
            return (f"verified within tolerance: {self.identical}/{self.total} {what} identical, {agree} "
                    f">= {TOLERANCE}")
        return f"NOT verified: {self.identical}/{self.total} {what} identical, {agree} < {TOLERANCE}"

    def report(self, with_text: bool = True) -> str:
        """The line, then what differed (one line per differing answer). `with_text`: quote the prompt and the
        answers (the run's held-out data: for its owner only), else say where each answer differed."""
        return "\n".join([self.line(), *(f"  {d}" for d in (self.differences if with_text else self.differ_at))])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": self.agreement, "ok": self.ok, "line": self.line()}


# --- the reference -------------------------------------------------------------------------------

def held_out_prompts(adapter_dir: Path, limit: int = MAX_PROMPTS) -> tuple[list[Messages], str]:
    """The run's held-out prompts as scoring builds them (`evaluate.row_prompt`); fixed probes when it has none."""
    from phi3_lora.evaluate import Unanswerable, row_prompt
    from phi3_lora.runs import find_run

    run = find_run(Path(adapter_dir))
    prompts: list[Messages] = []
    if run is not None and run.eval_rows.exists():
        for line in run.eval_rows.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            try:  # the same prompt scoring and Compare's held-out example answer
                prompts.append(row_prompt(row["messages"] if isinstance(row, dict) else row)[0])
            except Unanswerable:
                continue
            if len(prompts) >= limit:
                break
    if prompts:
        return prompts, "held-out"
    return [[{"role": "user", "content": p}] for p in PROBES[:limit]], "probe"


def reference(ref: Any, engine: Any = None, limit: int = MAX_PROMPTS,
              max_new_tokens: int = MAX_NEW_TOKENS) -> Reference:
    """The app's greedy tuned answers for `ref` (an AdapterRef); `engine` reuses a loaded ChatEngine."""
    from phi3_lora import models
    from phi3_lora.embedded import HUB_ID, embedded_model_dir, is_embedded
    from phi3_lora.generate import ChatEngine

    if engine is None:
        engine = ChatEngine(ref.model_name, ref.adapter_dir, load_in_4bit=bool(ref.load_in_4bit),
                            model_settings=_settings(ref))
    elif engine.adapter_dir is None or Path(engine.adapter_dir).resolve() != Path(ref.adapter_dir).resolve():
        engine.set_adapter(ref.adapter_dir)
    prompts, source = held_out_prompts(ref.adapter_dir, limit)
    ids = [engine.greedy_ids(p, adapter=True, max_new_tokens=max_new_tokens) for p in prompts]
    answers = [engine.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    device = next(engine.base.parameters()).device.type
    dtype = str(models.resolve_dtype(engine.settings.dtype, device)).replace("torch.", "")
    quant = None
    if engine.settings.load_in_4bit:
        quant = {"load_in_4bit": True, "bnb_4bit_quant_type": engine.settings.bnb_4bit_quant_type,
                 "bnb_4bit_use_double_quant": engine.settings.bnb_4bit_use_double_quant}
    alias = local = None
    if is_embedded(engine.model_name):
        alias = (HUB_ID, str(embedded_model_dir()))
    elif portable.is_local_model(engine.model_name):
        local = (portable.hub_base(engine.model_name), str(Path(engine.model_name).expanduser().resolve()))
    pieces = [[engine.tokenizer.decode([t]) for t in answer] for answer in ids]
    return Reference(prompts, answers, ids, list(engine.stop_ids), max_new_tokens, dtype, device, quant, source,
                     alias, pieces, local)


def _settings(ref: Any) -> Any:
    from phi3_lora.config import ModelSettings

    if ref.settings is not None:
        return ModelSettings(**{**vars(ref.settings), "name": ref.model_name, "load_in_4bit": ref.load_in_4bit})
    return ModelSettings(name=ref.model_name, load_in_4bit=bool(ref.load_in_4bit))


# --- the child process -----------------------------------------------------------------------------

def hub_cache_alias(hub_id: str, folder: Path, cache: Path) -> Path:
    """A Hugging Face cache folder in which `hub_id` resolves (offline) to the files of `folder` (symlinks):
    what a machine that downloaded `hub_id` has. Returns `cache` (use it as HF_HUB_CACHE)."""
    commit = "0" * 40
    repo = Path(cache) / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for file in Path(folder).iterdir():
        if file.is_file() and not (snapshot / file.name).exists():
            (snapshot / file.name).symlink_to(file.resolve())
    return Path(cache)


def verify_export(path: str | Path, kind: str, ref: Reference, *, timeout_s: float = 900.0,
                  use_quantization: bool | None = None) -> Verification:
    """Load `path` (`kind`: adapter zip/folder, merged folder, gguf file) in a fresh process with plain
    transformers/peft, answer `ref.prompts` greedily and compare with `ref.answers`.

    `use_quantization`: load the base in the run's 4-bit settings (default: for adapters only; a merged model
    or a GGUF file is standalone)."""
    if kind not in KINDS:
        raise UserError(f"Unknown export kind {kind!r}; one of {', '.join(KINDS)}.")
    started = time.monotonic()
    quant = ref.quantization if (kind == "adapter" if use_quantization is None else use_quantization) else None
    spec = {"kind": kind, "path": str(Path(path).resolve()), "prompts": ref.prompts, "expected_ids": ref.answer_ids,
            "stop_ids": ref.stop_ids, "max_new_tokens": ref.max_new_tokens, "dtype": ref.dtype,
            "device": ref.device, "quantization": quant}
    with tempfile.TemporaryDirectory(prefix="phi3-verify-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["TOKENIZERS_PARALLELISM"] = "false"
        if ref.hub_alias and kind == "adapter":
            env["HF_HUB_CACHE"] = str(hub_cache_alias(ref.hub_alias[0], Path(ref.hub_alias[1]), tmp_path / "hub"))
            env["HF_HUB_OFFLINE"] = "1"
        if ref.local_base and kind == "adapter" and not (tmp_path / ref.local_base[0]).exists():
            (tmp_path / ref.local_base[0]).symlink_to(ref.local_base[1], target_is_directory=True)
        cmd = [sys.executable, "-I", str(CHILD), str(tmp_path / "spec.json"), str(tmp_path / "out.json")]
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Verification(kind, len(ref.prompts), 0, source=ref.source, seconds=time.monotonic() - started,
                                error=f"loading and answering took longer than {timeout_s:.0f} s")
        out = tmp_path / "out.json"
        if proc.returncode != 0 or not out.exists():
            last = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()][-1:] or ["no output"]
            return Verification(kind, len(ref.prompts), 0, source=ref.source, seconds=time.monotonic() - started,
                                error=f"a fresh process could not load the export ({scrub_paths(last[0])[:300]})")
        result = json.loads(out.read_text(encoding="utf-8"))
    return compare(kind, ref, result, time.monotonic() - started)


def compare(kind: str, ref: Reference, result: dict[str, Any], seconds: float = 0.0) -> Verification:
    """Score the child's answers against the app's (pure)."""
    identical = matches = positions = 0
    differences, differ_at = [], []
    for i, (want, got) in enumerate(zip(ref.answer_ids, result["answers"])):
        matches, positions = matches + got["agreement"][0], positions + got["agreement"][1]
        if got["ids"] == want:
            identical += 1
            continue
        at = next((j for j, (a, b) in enumerate(zip(want, got["ids"])) if a != b), min(len(want), len(got["ids"])))
        prompt = ref.prompts[i][-1]["content"]
        differ_at.append(f"#{i + 1}: differs from token {at} of {len(want)}")
        differences.append(f"#{i + 1} {prompt[:40]!r}: differs from token {at} of {len(want)}; from there the app "
                           f"says {_from(ref.answer_pieces[i] if ref.answer_pieces else None, ref.answers[i], at)!r}, "
                           f"the export {_from(got.get('pieces'), got['text'], at)!r}")
    error = "the child process imported phi3_lora" if result.get("phi3_lora_imported") else None
    return Verification(kind, len(ref.prompts), identical, matches, positions, differences,
                        result.get("loaded", ""), ref.source, error, round(seconds, 1), differ_at)


def _from(pieces: list[str] | None, text: str, at: int, n: int = 8) -> str:
    """The answer from token `at` on (a few tokens), or the text's start when the pieces are unknown (pure)."""
    if pieces is None:
        return text[:60]
    return ("…" if at else "") + "".join(pieces[at:at + n]) + ("…" if len(pieces) > at + n else "")


# --- where a verification is kept ------------------------------------------------------------------

def sidecar(export_path: str | Path) -> Path:
    """verification.json inside an exported folder, <file>.verification.json beside an exported file."""
    export_path = Path(export_path)
    return export_path / "verification.json" if export_path.is_dir() else \
        export_path.with_name(export_path.name + ".verification.json")


def save(result: Verification, export_path: str | Path) -> Path:
    """The sidecar holding `result`, written whole: two visitors exporting one zip at once each save theirs."""
    return write_atomic(sidecar(export_path), json.dumps(result.to_dict(), indent=2))


def load(export_path: str | Path) -> Verification | None:
    path = sidecar(export_path)
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return Verification(**{k: data[k] for k in Verification.__dataclass_fields__ if k in data})


def card_section(result: Verification | None) -> str:
    """The model card's Verification section (pure). The card travels with the export (any visitor may download an
    adapter zip), so it says where answers differed without quoting the run's held-out prompts or answers."""
    if result is None:
        return "## Verification\n\nNot verified (exported with verification off).\n"
    body = result.report(with_text=False)
    how = ("A fresh Python process without phi3_lora loaded this export with plain transformers/peft "
           f"({result.loaded or 'as a user would'}), answered the run's {result.source} prompts greedily and "
           "compared its answers with phi3_lora's tuned answers (base as trained + adapter).")
    return f"## Verification\n\n**{result.line()}**\n\n{how}\n" + (
        "\n```\n" + body + "\n```\n" if result.differences else "")
