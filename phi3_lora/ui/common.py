"""What every tab shares: the app's options, its long-lived state, and turning UserError into gr.Error."""

from __future__ import annotations

import functools
import html
import inspect
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from phi3_lora import access, portable, quotas, uploads
from phi3_lora.errors import UserError
from phi3_lora.runs import default_runs_dir
from phi3_lora.spaces import SpaceEnv, training_refusal
from phi3_lora.ui.strings import MARKER, english, t

log = logging.getLogger("phi3_lora.ui")


@dataclass(slots=True)
class AppOptions:
    """Every switch of the app in one place (the Space build adds its flags here)."""

    runs_dir: Path = field(default_factory=default_runs_dir)
    default_model: str = "auto"          # "auto" resolves to Phi-3-mini on a GPU with the Hub, else embedded
    max_file_size: str = "200mb"         # uploads above this are refused by Gradio before they reach us
    queue_max_size: int = 32             # waiting events beyond this are refused ("too busy")
    concurrency_limit: int = 2           # events of one kind running at once (the machine has few cores)
    poll_seconds: float = 1.0            # how often the Train tab reads the run folder
    sample_dataset: Path = portable.BUNDLED_SAMPLE  # the bundled sample conversations (public)
    demo_mode: bool = False              # Space: show everything, refuse to train (set by the Space build)
    storage_warning: str | None = None   # Space without persistent storage: said at the top of the page
    space_env: SpaceEnv = field(default_factory=SpaceEnv)  # what phi3_lora.spaces detected (empty off Spaces)
    login_required: bool = False         # Space with hf_oauth: Sign in with Hugging Face before training
    shared: bool = False                 # a share link was asked for: nobody on the web is the owner
    max_prompt_bytes: int = 16 * 1024    # one Compare message
    max_chat_bytes: int = 64 * 1024      # a whole Compare conversation (each side)
    max_generation_s: float = 120.0      # one Compare answer pair (also bounds how long Compare is busy)
    upload_session_quota: int = uploads.SESSION_QUOTA_BYTES  # one browser session's uploads together
    upload_total_quota: int = uploads.TOTAL_QUOTA_BYTES      # all sessions' uploads together
    limits: quotas.Limits = quotas.LIMITS  # what visitors may keep on the disk: drafts, downloads, runs (quotas.py)

    @property
    def training_refusal(self) -> str | None:
        """Why Start/Resume refuse here (demo mode, ZeroGPU), or None."""
        return training_refusal(self.space_env, self.demo_mode)

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir).resolve()


@dataclass(slots=True)
class AppState:
    """Long-lived objects shared by all sessions: the loaded chat engines (one per base model + 4-bit)."""

    options: AppOptions
    engines: dict[tuple[str, bool], Any] = field(default_factory=dict)
    engine_lock: threading.Lock = field(default_factory=threading.Lock)
    default_reason: str = ""
    default_name: str = ""   # the app's default model as the web names it (ui.names: a server folder by its name)
    default_path: str = ""   # what default_name stands for when that differs: the folder of the server
    mode: access.ServerMode = access.UNLAUNCHED   # set by launch(): until then nobody is the owner
    starters: access.RunStarters = field(init=False)  # who started which run (from options.runs_dir)

    def __post_init__(self) -> None:
        self.starters = access.RunStarters(self.options.runs_dir)


def configure_logging() -> None:
    """phi3_lora's own log lines (refusals, unexpected errors with their id) on stderr, once."""
    logger = logging.getLogger("phi3_lora")
    if not any(getattr(h, "phi3_lora", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.phi3_lora = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def error_id() -> str:
    """A short id an unexpected error is logged and shown with, so a visitor can quote it to the owner."""
    return secrets.token_hex(4)


def to_gr_error(exc: BaseException, where: str) -> gr.Error:
    """A user error: its message and hint, logged as one line. Anything else: one traceback in the log and, on
    the page, only an id to quote (never the exception's text, which may name server paths)."""
    if isinstance(exc, gr.Error):
        exc.print_exception = False
        # gradio's REST route drops an error whose message or title is I18nData (not JSON serializable): English
        exc.message, exc.title = english(exc.message), english(exc.title)
        log.info("%s: %s", where, exc.message)
        return exc
    if isinstance(exc, UserError):
        text = exc.message + (f" {exc.hint}" if exc.hint else "")
        log.info("%s: refused: %s", where, text)
        return gr.Error(text, title="Cannot do that", print_exception=False)
    eid = error_id()
    log.error("%s: unexpected error %s", where, eid, exc_info=exc)
    return gr.Error(f"Something went wrong on the server ({type(exc).__name__}, error id {eid}). The app is still "
                    f"running; if it happens again, quote the id {eid} to the app's owner.",
                    title="Unexpected error", print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Show a UserError as a gr.Error with its hint (one log line, no traceback); any other exception as a short
    error with an id (its traceback logged once under that id)."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise to_gr_error(exc, fn.__name__) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise to_gr_error(exc, fn.__name__) from None
    return wrapper


def escape(text: Any) -> str:
    """`text` as HTML: escaped, except the translation markers in it (the page puts the translation there)."""
    text, out, at = str(text), [], 0
    for m in MARKER.finditer(text):
        out += [html.escape(text[at:m.start()]), m.group(0)]
        at = m.end()
    return "".join(out + [html.escape(text[at:])])


def help_md(text: Any) -> str:
    return f"<span class='p3-help'>{escape(text)}</span>"


def notice(kind: str, text: Any) -> str:
    """A coloured box (kind: info | warn | error | ok) as HTML."""
    return f"<div class='p3-note p3-{kind}'>{escape(text)}</div>"


def message_text(content: Any) -> str:
    """Chatbot message content (a string, or gradio 6's list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return "" if content is None else str(content)


CSS = """
.p3-help { color: var(--body-text-color-subdued); font-size: 0.85em; }
.p3-note { border-radius: 8px; padding: 8px 12px; margin: 4px 0; font-size: 0.92em; }
.p3-info { background: #eef4ff; border: 1px solid #bcd0f7; color: #1d3a6e; }
.p3-ok { background: #ecf8ef; border: 1px solid #a9dcb5; color: #1b4d2a; }
.p3-warn { background: #fff7e6; border: 1px solid #f3d08a; color: #6b4a00; }
.p3-error { background: #fdecec; border: 1px solid #f1aaaa; color: #7a1c1c; }
.p3-header h1 { margin-bottom: 0; }
.p3-tokens { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; line-height: 1.6;
             border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px; max-height: 320px;
             overflow-y: auto; }
.p3-trained { background: #c9f2d3; color: #0d3b1a; border-bottom: 2px solid #2e9d4d; }
.p3-masked { background: #eceff3; color: #6b7280; }
.p3-legend span { padding: 1px 6px; border-radius: 4px; margin-right: 8px; font-size: 0.85em; }
.p3-progress { width: 100%; background: var(--background-fill-secondary); border-radius: 8px; height: 22px;
               overflow: hidden; border: 1px solid var(--border-color-primary); }
.p3-progress > div { height: 100%; background: linear-gradient(90deg, #4f7cf7, #7aa2ff); transition: width .4s; }
.p3-stats { display: flex; gap: 18px; flex-wrap: wrap; margin-top: 6px; font-size: 0.92em; }
.p3-stats b { font-variant-numeric: tabular-nums; }
.p3-refresh-row { align-items: center !important; }
.p3-reference { border-left: 4px solid #7aa2ff; padding-left: 10px; }
"""


def run_picker(label: Any, info: Any, elem_id: str) -> tuple[gr.Dropdown, gr.Button]:
    """A run (or adapter) dropdown with its ↻ Refresh button on one row: the Train, Compare and Export tabs'."""
    with gr.Row(equal_height=False, elem_classes=["p3-refresh-row"]):
        picker = gr.Dropdown([], label=label, info=info, scale=5, allow_custom_value=True, elem_id=elem_id)
        refresh = gr.Button(t("app.refresh"), scale=1, size="sm", min_width=120)
    return picker, refresh
