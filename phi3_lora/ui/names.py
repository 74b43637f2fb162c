"""What the web form names a data source or a base model, and what each name stands for on this server.

A form's values travel to the browser (the page's config, the API page's defaults, every answer), so they name no
folder of the server: this session's upload is `upload:<its file name>`, the bundled sample is the path it has in
every phi3_lora checkout (portable.SAMPLE_IN_CHECKOUT), and a base model in a folder of the server that the owner made
the app's default is that folder's name (portable.model_name). Anything else (a Hub id, a path the owner typed) is
its own name. Handlers turn a name from the web into the server's value with `server_*` before they gate or use it,
and a value into its name with `web_*` before the browser gets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi3_lora import portable, uploads
from phi3_lora.access import Requester

UPLOADED = "upload:"


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def web_source(state: Any, source: str | None) -> str:
    """The form's name of a data source: an upload (this session's, a run's kept copy or a draft's) by its file
    name, the bundled sample by its checkout path; a Hub id or another path as it is."""
    source = (source or "").strip()
    if not source:
        return ""
    if _same_file(source, state.options.sample_dataset):
        return portable.SAMPLE_IN_CHECKOUT
    path = Path(source)
    if path.is_absolute() and uploads.root(state.options.runs_dir).resolve() in path.resolve().parents:
        return UPLOADED + path.name
    return source


def server_source(state: Any, who: Requester, name: str | None) -> str:
    """The data source a form's name stands for: `upload:<file>` is that file of this session's upload folder (a
    run's kept copy of it, for Load settings of a past run), the sample's checkout path the bundled sample; anything
    else unchanged (access.source_action then gates it as what it is)."""
    name = (name or "").strip()
    if name == portable.SAMPLE_IN_CHECKOUT:
        return str(state.options.sample_dataset)
    if not name.startswith(UPLOADED):
        return name
    file = name[len(UPLOADED):]
    if not file or Path(file).name != file or file.startswith("."):
        return name  # not a plain file name: gated (and refused to visitors) as the path it looks like
    runs_dir = state.options.runs_dir
    session = uploads.session_dir(runs_dir, who.session) / file if who.session else None
    kept = uploads.root(runs_dir) / uploads.KEPT / file
    if (session is None or not session.is_file()) and kept.is_file():
        return str(kept)
    return str(session) if session is not None else name


def is_upload(name: str | None) -> bool:
    """The form's source names an upload (the × of the upload box takes it away)."""
    return (name or "").strip().startswith(UPLOADED)


def web_model(state: Any, name: str | None) -> str:
    """The form's name of a base model: the app's default in a server folder by that folder's name."""
    name = (name or "").strip()
    return state.default_name if name and state.default_path and name == state.default_path else name


def server_model(state: Any, name: str | None) -> str:
    """The base model a form's name stands for: the app's default by its shown name is its folder."""
    name = (name or "").strip()
    return state.default_path if name and state.default_path and name == state.default_name else name
