"""Which adapter a request means, and the engine that serves it: the runs and checkpoints a visitor may pick
(Compare, its scoring panel and Export share them), a checkpoint held while in use, and one loaded base model
per setting shared by every tab."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import gradio as gr

from phi3_lora import jobs, portable, spaces
from phi3_lora.errors import UserError
from phi3_lora.holds import gone_checkpoint as _gone_checkpoint
from phi3_lora.holds import hold_adapter as hold_source, hold_checkpoint  # noqa: F401 (the tabs' names for them)
from phi3_lora.runs import RunDir
from phi3_lora.ui.common import AppState


def adapter_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """Runs with a final adapter, then each checkpoint holding an adapter (value: path relative to runs_dir)."""
    out = []
    for info in jobs.list_runs(runs_dir):
        if info.config_error:  # its base model is unknown: nothing here can load it
            continue
        run = RunDir(info.run_dir)
        if run.has_adapter():
            out.append((f"{info.run_id} · final adapter ({info.status.state})", info.run_id))
        for _, ck in reversed(run.checkpoint_dirs(complete=False)):
            out.append((f"{info.run_id} · {ck.name}", ck.relative_to(runs_dir).as_posix()))
    return out


# A run id and '/checkpoint-N' are far shorter; a Hub id is at most 96 characters.
MAX_VALUE_CHARS = 256


def _not_ours(value: object) -> UserError:
    shown = value[:80] + "…" if isinstance(value, str) and len(value) > 80 else value
    return UserError(f"{shown} is not a run or checkpoint of this app.", hint="Refresh the list and pick again.")


def _plain(value: object) -> str:
    """The adapter value a request sent, when it can name one at all: text the list could offer (a run id, '<run
    id>/checkpoint-N' or a Hub id), not another type, a NUL or a name longer than any folder's (the page never sends
    those; a client that does gets the list's message, not 'Something went wrong')."""
    if not isinstance(value, str) or "\x00" in value or len(value) > MAX_VALUE_CHARS:
        raise _not_ours(value if isinstance(value, str) else type(value).__name__)
    return value


def resolve_source(runs_dir: Path, value: str | None) -> Path:
    if not value:
        raise UserError("No adapter chosen.", hint="Pick a finished run or a checkpoint (train one in the Train tab).")
    value = _plain(value)
    try:
        path = (runs_dir / value).resolve()
        exists = path.exists()
    except (OSError, RuntimeError):  # a name the file system refuses, a symlink loop
        raise _not_ours(value) from None
    if runs_dir.resolve() not in path.parents or not exists:
        if runs_dir.resolve() in path.parents:
            _gone_checkpoint(path)
        raise _not_ours(value)
    return path


def is_hub_adapter(runs_dir: Path, value: str | None) -> bool:
    value = (value or "").strip() if isinstance(value, str) else ""
    try:
        return bool(value) and not (runs_dir / _plain(value)).exists() and spaces.is_hub_repo_id(value)
    except (OSError, RuntimeError, UserError):
        return False


def resolve_adapter(runs_dir: Path, value: str | None, token: str | bool | None = None) -> Path:
    """A run or checkpoint of runs_dir, else an adapter published on the Hub (owner/name), downloaded once with
    `token` (access.hub_token: a visitor's own, or False for none)."""
    if is_hub_adapter(runs_dir, value):
        return spaces.download_adapter((value or "").strip(), token=token)
    return resolve_source(runs_dir, value)


def get_engine(state: AppState, path: Path, progress: gr.Progress | None = None) -> Any:
    """The app's engine for this adapter's base model, created once, with this adapter attached."""
    from phi3_lora.generate import ChatEngine
    from phi3_lora.adapter_folder import locate_adapter

    ref = locate_adapter(path)
    ref.model_name = spaces.portable_model_name(ref.model_name)  # trained offline, opened on a Space
    settings = engine_settings(ref)
    key = (ref.model_name, settings.load_in_4bit, settings.bnb_4bit_quant_type, settings.bnb_4bit_use_double_quant,
           settings.dtype)
    with state.engine_lock:
        engine = state.engines.get(key)
        if engine is None:
            # One base model in memory at a time: a visitor's check (guard.check_model_fits) is for one model, and
            # engines kept per base and setting (Hub adapters naming one base after another, runs trained with
            # another dtype) added up until the app was killed for memory. The events that use an engine (Compare,
            # scoring) run one at a time (concurrency_id "generate"), so the one dropped here is idle.
            state.engines.clear()
            gc.collect()
            if progress is not None:
                progress(0.1, desc=f"Loading {portable.model_name(ref.model_name)} (first use only)…")
            engine = ChatEngine(ref.model_name, None, model_settings=settings)
            engine.serve_compare(state.options.runs_dir)  # its compiled pair step: in the background, never while a run trains
            state.engines[key] = engine
        if engine.adapter_dir is None or Path(engine.adapter_dir).resolve() != Path(ref.adapter_dir).resolve():
            if progress is not None:
                progress(0.7, desc="Attaching the adapter…")
            engine.set_adapter(ref.adapter_dir)
    return engine


def engine_settings(ref: Any) -> Any:
    """The run's model settings (4-bit type, double quant, dtype), so Compare loads the base as it was trained."""
    from phi3_lora.config import ModelSettings

    if ref.settings is not None:
        return ModelSettings(**{**vars(ref.settings), "name": ref.model_name})
    return ModelSettings(name=ref.model_name, load_in_4bit=bool(ref.load_in_4bit))
