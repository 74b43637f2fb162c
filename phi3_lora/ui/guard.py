"""The web side of phi3_lora.access: who a gr.Request is, and a decorator that hands it to a handler.

    @user_errors
    @guarded(state)
    def on_stop(who: Requester, run_id): ...      # gradio sees on_stop(request: gr.Request, run_id)

`check` raises the policy's refusal as a UserError, so the page shows it like any other user error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from phi3_lora import access
from phi3_lora.access import Action, Requester
from phi3_lora.errors import UserError
from phi3_lora.runs import find_run, scrub_paths


def _oauth_info(request: Any) -> dict[str, Any] | None:
    """The Sign in with Hugging Face session of this request (gradio keeps it under 'oauth_info')."""
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else None
    info = session.get("oauth_info") if isinstance(session, dict) else None
    if not isinstance(info, dict):
        return None
    expires = info.get("expires_at")
    if isinstance(expires, (int, float)) and expires < time.time():
        return None
    return info


def session_key(request: Any) -> str | None:
    """A name for this browser session that does not reveal its hash (used for its upload folder)."""
    session_hash = getattr(request, "session_hash", None)
    if not session_hash:
        return None
    return hashlib.sha256(f"phi3_lora:{session_hash}".encode()).hexdigest()[:20]


# Client keys are hashed with a secret of this process: the ledgers on disk (quotas' holders) name no visitor's address.
_CLIENT_SECRET = secrets.token_bytes(16)


def client_key(request: Any, mode: access.ServerMode) -> str | None:
    """A key of the network this request came from (access.client_network), for the share of the anonymous pools
    each anonymous client gets (quotas.holder_of); None without a request."""
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    if not isinstance(scope, dict):
        return None
    peer = (scope.get("client") or (None, 0))[0]
    forwarded = [v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"x-forwarded-for"]
    network = access.client_network(peer, forwarded, on_space=mode.on_space)
    return hashlib.sha256(_CLIENT_SECRET + network.encode("utf-8", "replace")).hexdigest()[:16]


def requester_of(state: Any, request: Any) -> Requester:
    """The policy's view of a request: level, identity, the visitor's own Hub token (if signed in), the browser
    session and the client's network (client_key)."""
    mode: access.ServerMode = getattr(state, "mode", access.UNLAUNCHED)
    username = getattr(request, "username", None) if request is not None else None
    info = _oauth_info(request) if (request is not None and mode.oauth) else None
    profile = (info or {}).get("userinfo") or {}
    who = access.requester(mode, username=username, oauth_user=profile.get("preferred_username"),
                           oauth_token=(info or {}).get("access_token"))
    if request is None:
        return who
    return Requester(who.level, who.identity, who.oauth_token, session_key(request), client_key(request, mode))


def check(state: Any, who: Requester, action: Action, *, started_by: str | None = None) -> None:
    """Raise the policy's refusal (a UserError) unless `who` may do `action`."""
    why = access.refusal(action, who, getattr(state, "mode", access.UNLAUNCHED), started_by=started_by)
    if why:
        raise UserError(why)


# A run's held-out rows are read to see whether they are the bundled sample's only when the file is no larger than
# this (or twice the sample): rows of the sample cannot fill more, and a large file is somebody's own data.
PUBLIC_ROWS_MAX_BYTES = 1 << 20


@functools.lru_cache(maxsize=4)
def _sample_digests(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    texts: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        texts.update(access.text_digest(t) for t in access.row_texts(row) or [])
    return frozenset(texts)


def sample_digests(state: Any) -> frozenset[str]:
    """The digests of the bundled sample's message texts (access.public_rows); empty when it cannot be read."""
    path = Path(state.options.sample_dataset)
    try:
        st = path.stat()
        return _sample_digests(str(path.resolve()), st.st_mtime_ns, st.st_size) if st.st_size <= (4 << 20) \
            else frozenset()
    except (OSError, UnicodeError):
        return frozenset()


def _held_out_rows(state: Any, run: Any) -> list[Any]:
    """The held-out rows of `run` (a RunDir or None), when small enough to be the sample's; else none."""
    try:
        limit = max(PUBLIC_ROWS_MAX_BYTES, 2 * Path(state.options.sample_dataset).stat().st_size)
        if run is None or run.eval_rows.stat().st_size > limit:
            return []
        return [json.loads(line) for line in run.eval_rows.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def rows_refusal(state: Any, who: Requester, path: Path, rows: list[Any] | None = None) -> str | None:
    """None when `who` may read the text of the data rows of the run that holds `path` (a run, its adapter or a
    checkpoint), else the policy's message: the rows are the data of whoever started the run. Rows whose every text
    is a text of the bundled sample are public (access.public_rows); `rows`: the rows the caller shows (default:
    the run's held-out rows, which the held-out example and the exports' verification quote)."""
    run = find_run(Path(path))
    started_by = state.starters.get(run.run_id) if run is not None else None
    why = access.refusal(Action.READ_RUN_DATA, who, getattr(state, "mode", access.UNLAUNCHED), started_by=started_by)
    if why and access.public_rows(_held_out_rows(state, run) if rows is None else rows, sample_digests(state)):
        return None
    return why


@contextlib.contextmanager
def visitor_messages(who: Requester) -> Iterator[None]:
    """A user error raised to anybody but the owner names no folder of the server: the library's messages name
    files as the owner at the machine needs them (a model folder, a data file, a child process's last line), so for
    a visitor every absolute path in them is shown as runs.scrub_paths shows it."""
    try:
        yield
    except UserError as exc:
        if who.level is access.Level.OWNER:
            raise
        raise UserError(scrub_paths(exc.message), hint=scrub_paths(exc.hint) if exc.hint else None) from None


def guarded(state: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the handler the requester as its first argument; gradio fills a gr.Request in its place."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1:]
        request_param = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
        new_sig = sig.replace(parameters=[request_param, *params])

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(request: gr.Request, *args: Any, **kwargs: Any) -> Any:
                who = requester_of(state, request)
                with visitor_messages(who):
                    yield from fn(who, *args, **kwargs)
            wrapper = gen_wrapper
        else:
            @functools.wraps(fn)
            def plain_wrapper(request: gr.Request, *args: Any, **kwargs: Any) -> Any:
                who = requester_of(state, request)
                with visitor_messages(who):
                    return fn(who, *args, **kwargs)
            wrapper = plain_wrapper
        wrapper.__signature__ = new_sig  # type: ignore[attr-defined]
        # gradio finds the gr.Request slot by type hint; the handler's own hints are strings it need not read.
        wrapper.__annotations__ = {"request": gr.Request}
        del wrapper.__wrapped__  # type: ignore[attr-defined]
        return wrapper

    return wrap


def upload_dir(runs_dir: Path, who: Requester) -> Path | None:
    """This session's upload folder (None without a session, e.g. a library call)."""
    from phi3_lora.uploads import session_dir

    return session_dir(runs_dir, who.session) if who.session else None


def check_source(state: Any, who: Requester, source: str) -> Action:
    """Gate a data source typed or sent from the web: this session's upload, the sample and Hub ids are fine
    for visitors (Hub datasets: signed-in only); any other path of the server only for the owner."""
    from phi3_lora.readers import is_hub_id

    source = (source or "").strip()
    if not source:
        return Action.VIEW
    action = access.source_action(source, sample=state.options.sample_dataset,
                                  uploads=upload_dir(state.options.runs_dir, who), is_hub_id=is_hub_id(source))
    check(state, who, action)
    if action is Action.READ_HUB_DATA:  # reading it downloads it
        check_dataset_room(state, who, source)
    return action


def known_models(state: Any) -> set[str]:
    from phi3_lora import models
    from phi3_lora.embedded import EMBEDDED_NAME

    names = {e.name for e in models.CATALOGUE} | {EMBEDDED_NAME, state.default_name, state.default_path,
                                                     state.options.default_model}
    return {n for n in names if n}


def check_model(state: Any, who: Requester, name: str | None) -> str:
    """Gate a base model name from the web: catalogue names, the app's default and Hub ids for anybody; a
    folder of the server only for the owner. Returns what the name stands for here (ui.names.server_model)."""
    from phi3_lora.models import is_embedded
    from phi3_lora.ui.names import server_model

    name = server_model(state, name)
    if not name or is_embedded(name):
        return name
    try:
        is_path = Path(name).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        is_path = True
    known = known_models(state)
    check(state, who, access.model_action(name, known=known, is_path=is_path))
    if who.level is not access.Level.OWNER and name not in known and not is_path:  # reading it downloads its files
        from phi3_lora.models import check_visitor_settings_files

        check_visitor_settings_files(name, access.hub_token(who, None))
    return name


def check_template(state: Any, who: Requester, value: str | None) -> None:
    """Gate model.chat_template from the web: template text for anybody, a file of the server only for the owner."""
    from phi3_lora.models import template_is_text

    check(state, who, access.template_action(value, is_text=template_is_text(value)))


def check_model_fits(state: Any, who: Requester, name: str | None) -> None:
    """A base model a visitor names is loaded on this machine (Compare: in the app's own process): refuse one whose
    weights could not fit, from the Hub's file list, before anything is downloaded, or whose download does not fit
    the visitor's room (downloads.check_room). The owner decides for themself."""
    from phi3_lora.models import check_visitor_model

    if who.level is not access.Level.OWNER and (name or "").strip():
        repo_id, size = check_visitor_model(name.strip(), access.hub_token(who, None))
        _check_download(state, who, repo_id, size, "model")


def check_adapter_room(state: Any, who: Requester, repo_id: str) -> None:
    """A Hub adapter a visitor names is downloaded into the Hub cache: within the visitor's room for downloads
    (downloads.check_room). The owner decides for themself."""
    from phi3_lora.models import hub_repo_bytes

    if who.level is not access.Level.OWNER:
        _check_download(state, who, repo_id, hub_repo_bytes(repo_id, access.hub_token(who, None)), "model")


def check_dataset_room(state: Any, who: Requester, dataset_id: str) -> None:
    """A Hub dataset a visitor names is downloaded into the Hub cache: within the same room as their models
    (downloads.check_room). One larger than a data file may be is left to readers, which refuses it before it
    downloads (so it does not count)."""
    from phi3_lora.models import hub_repo_bytes
    from phi3_lora.readers import MAX_FILE_BYTES

    if who.level is not access.Level.OWNER:
        size = hub_repo_bytes(dataset_id, access.hub_token(who, None), repo_type="dataset")
        if size is not None and size <= MAX_FILE_BYTES:
            _check_download(state, who, dataset_id, size, "dataset")


def _check_download(state: Any, who: Requester, repo_id: str, size: int | None, repo_type: str) -> None:
    from phi3_lora import downloads, quotas

    limits = getattr(state.options, "limits", quotas.LIMITS)
    downloads.check_room(state.options.runs_dir, quotas.holder_of(who), downloads.repo_key(repo_id, repo_type), size,
                         limits)


def run_time_limit(state: Any, who: Requester) -> float | None:
    """How long a run this request starts or resumes may train (quotas.Limits.run_seconds): None for the owner."""
    from phi3_lora import quotas

    if who.level is access.Level.OWNER:
        return None
    return getattr(state.options, "limits", quotas.LIMITS).run_seconds


def check_runs_room(state: Any, who: Requester, what: str, adding: int = 0, *, upload: Path | None = None,
                    replacing: str | None = None) -> None:
    """A signed-in visitor's runs, the exports they made and the copies of uploads kept for their runs
    (uploads.kept_held) stay within their share of the disk (quotas.Limits.runs_share): `what` (start, resume, a
    merge, a GGUF) of `adding` more bytes is refused past it, with what to delete. `upload`: the session upload a
    start keeps a copy of (counted unless one of their runs keeps it already). `replacing`: the export folder
    ('<run id>/<folder>') the new one replaces, whose bytes count no more if they counted for the visitor. Anonymous
    visitors cannot train nor merge; the owner is not counted."""
    from phi3_lora import quotas, uploads

    if who.level is not access.Level.SIGNED_IN or not who.identity:
        return
    limits = getattr(state.options, "limits", quotas.LIMITS)
    runs_dir, starters = state.options.runs_dir, state.starters.all()
    sizes = quotas.run_bytes_of(runs_dir, who.identity, starters)
    kept = [h for h in uploads.kept_held(runs_dir, starters) if h.holder == who.identity]
    sizes.update({f"upload {h.key.split('-', 1)[-1]} (kept for your runs)": h.size for h in kept})
    if upload is not None and uploads.kept_path(runs_dir, upload).name not in {h.key for h in kept}:
        adding += Path(upload).stat().st_size
    if replacing is not None:
        adding = max(0, adding - sizes.get(replacing, 0))
    refused = quotas.runs_refusal(sizes, limits.runs_share, what, adding)
    if refused is not None:
        raise refused
