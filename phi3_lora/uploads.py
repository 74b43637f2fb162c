"""Data files uploaded through the web app: one folder per browser session, a quota, and clean-up.

    runs/.uploads/sessions/<session key>/<digest>-<name>   this session's uploads; deleted when the session ends
                                                          (the page is closed) or after MAX_AGE_S
    runs/.uploads/kept/<digest>-<name>                    a copy taken when a run starts from an upload, so
                                                          Resume can read it again after the session is gone;
                                                          it counts in the runs share of whoever started a run
                                                          on it and goes with the last such run (kept_held)

Every copy is written to a temporary name and renamed; a failed copy (a full disk included) removes its
temporary file and says so plainly. No gradio here: phi3_lora.ui.dataset calls it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

from phi3_lora import quotas
from phi3_lora.errors import UserError
from phi3_lora.runs import temporary_of

UPLOADS = ".uploads"
SESSIONS = "sessions"
KEPT = "kept"
DRAFTS = "drafts"
DRAFT_MAX_AGE_S = 14 * 24 * 3600      # a browser's draft copy of its upload outlives its sessions, not forever
SESSION_QUOTA_BYTES = 512 * 2**20     # one session's uploads together
TOTAL_QUOTA_BYTES = 4 * 2**30         # every session's uploads together
HOLDER = ".holder"  # in a session's or a draft's folder: the identity it counts for (quotas.holder_of)
MAX_AGE_S = 6 * 3600                  # a session folder older than this is deleted (a closed tab may not say so)
DISK_FULL = UserError("The server's disk is full, so the file could not be saved.",
                      hint="Try again later, or ask the app's owner to free some space.")


def root(runs_dir: Path) -> Path:
    return Path(runs_dir) / UPLOADS


def session_dir(runs_dir: Path, key: str) -> Path:
    if not key or not key.isalnum():
        raise ValueError(f"bad session key {key!r}")
    return root(runs_dir) / SESSIONS / key


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def copy_atomic(src: Path, dest: Path) -> Path:
    """Copy src to dest through a temporary file of this writer's own (runs.temporary_of: copies to one place at
    once each replace dest with a whole copy); on any failure the temporary file is removed, and a full disk
    becomes a UserError that says so."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_of(dest)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DISK_FULL from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def sessions_held(runs_dir: Path) -> list[quotas.Held]:
    """Every visitor's session folder: its key, the identity it counts for (HOLDER; none: anonymous), its bytes."""
    folder, held = root(runs_dir) / SESSIONS, []
    for session in folder.iterdir() if folder.is_dir() else []:
        try:
            marker = session / HOLDER
            holder = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
            if holder != quotas.OWNER:
                files = [p for p in session.iterdir() if p.is_file() and not p.name.startswith(".")]
                held.append(quotas.Held(session.name, holder or quotas.ANONYMOUS,
                                        sum(p.stat().st_size for p in files), session.stat().st_mtime))
        except OSError:  # deleted while we looked
            continue
    return held


def store(src: str | Path, runs_dir: Path, key: str, *, session_quota: int = SESSION_QUOTA_BYTES,
          total_quota: int = TOTAL_QUOTA_BYTES, holder: str | None = None,
          limits: quotas.Limits = quotas.LIMITS) -> Path:
    """Keep an uploaded file in this session's folder (Gradio's own temp files may be cleaned earlier). `holder`:
    the identity the session's uploads count for (quotas.holder_of; None: the owner, not counted): every visitor's
    sessions together stay within `total_quota`, each identity within its share (limits.uploads)."""
    src = Path(src)
    size = src.stat().st_size
    folder = session_dir(runs_dir, key)
    dest = folder / f"{_digest(src)}-{src.name}"
    if dest.exists():
        return dest
    used = quotas.folder_bytes(folder) if folder.exists() else 0
    if used + size > session_quota:
        raise UserError(f"This session has uploaded {_size(used)}; {src.name} ({_size(size)}) would pass the "
                        f"limit of {_size(session_quota)} per session.",
                        hint="Reload the page (that deletes this session's uploads) and upload again.")
    if holder is not None:
        # A reload is a new session with a quota of its own: each session counts for its holder, so one visitor
        # cannot fill the room every visitor's uploads share (they go when their session ends, or after MAX_AGE_S).
        room, held = limits.uploads(total_quota), sessions_held(runs_dir)
        if quotas.over(room, quotas.usage(held), holder, size):
            raise quotas.room_refusal(room, quotas.usage(held), holder, size, f"Uploading {src.name}",
                                      instead="Uploads are deleted when their page is closed: close the pages "
                                              "you no longer use.")
    copy_atomic(src, dest)
    (folder / HOLDER).write_text(holder or quotas.OWNER, encoding="utf-8")
    return dest


def kept_path(runs_dir: Path, upload: str | Path) -> Path:
    """Where keep_for_run keeps a session upload: by its content-hash name, so runs on the same file share one copy."""
    return root(runs_dir) / KEPT / Path(upload).name


def keep_for_run(path: str | Path, runs_dir: Path) -> Path:
    """A lasting copy of a session upload for a run that trains on it (Resume reads the data again)."""
    dest = kept_path(runs_dir, path)
    return dest if dest.exists() else copy_atomic(Path(path), dest)


# --- kept copies: they last as long as a run trains on them, and count for whoever started that run ---------------

def kept_copy(runs_dir: Path, source: object) -> Path | None:
    """The kept copy a run's data source names (its config's data.source), or None (the sample, a Hub id, a file)."""
    try:
        path = Path(str(source))
        return path if path.parent.resolve() == (root(runs_dir) / KEPT).resolve() and path.is_file() else None
    except (OSError, ValueError):
        return None


def run_source(run_dir: Path) -> str | None:
    """A run's data source as its config names it; None when the config cannot be read."""
    from phi3_lora.config import load_yaml
    from phi3_lora.runs import RunDir

    try:
        return load_yaml(RunDir(run_dir).config).data.source
    except (UserError, OSError):
        return None


def kept_in_use(runs_dir: Path) -> dict[Path, list[str]]:
    """Each kept copy a run trains on -> the ids of those runs."""
    from phi3_lora.runs import run_dirs

    out: dict[Path, list[str]] = {}
    for run in run_dirs(runs_dir):
        kept = kept_copy(runs_dir, run_source(run.path))
        if kept is not None:
            out.setdefault(kept.resolve(), []).append(run.run_id)
    return out


def kept_held(runs_dir: Path, starters: dict[str, str]) -> list[quotas.Held]:
    """What kept copies count for whom: each copy once for each identity that started a run training on it
    (`starters`: access.RunStarters.all()); the owner's runs count for nobody. The key is the copy's file name."""
    held = []
    for kept, run_ids in kept_in_use(runs_dir).items():
        holders = {starters.get(r) for r in run_ids} - {None, quotas.OWNER}
        try:
            size, used_at = kept.stat().st_size, kept.stat().st_mtime
        except OSError:  # removed while we looked
            continue
        held += [quotas.Held(kept.name, str(h), size, used_at) for h in sorted(holders)]
    return held


def drop_kept_unless_used(runs_dir: Path, kept: Path | None) -> bool:
    """Remove a kept copy no run trains on any more (its last run was deleted, or its start was refused); True when
    removed. A copy another run trains on stays."""
    if kept is None or not kept.is_file() or kept.resolve() in kept_in_use(runs_dir):
        return False
    kept.unlink(missing_ok=True)
    return True


def drop_session(runs_dir: Path, key: str | None) -> None:
    """Delete a session's uploads (the page was closed)."""
    if key:
        shutil.rmtree(session_dir(runs_dir, key), ignore_errors=True)


def sweep(runs_dir: Path, max_age_s: float = MAX_AGE_S, now: float | None = None) -> list[str]:
    """Delete session folders untouched for max_age_s and temp files left by a crash; returns what went."""
    now = time.time() if now is None else now
    gone = []
    sessions = root(runs_dir) / SESSIONS
    if not sessions.is_dir():
        return gone
    for folder in sessions.iterdir():
        try:
            newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
        except OSError:
            continue
        if now - newest > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
    return gone


# --- the draft's copy: a browser's upload outlives the session that uploaded it ---------------------------

def draft_dir(runs_dir: Path, token: str) -> Path:
    if not token or not token.isalnum():
        raise ValueError("bad draft token")
    return root(runs_dir) / DRAFTS / token


def is_session_upload(runs_dir: Path, key: str, source: str) -> bool:
    """Whether `source` is a file of this session's upload folder."""
    try:
        path = Path(source).resolve()
        return path.is_file() and session_dir(runs_dir, key).resolve() in path.parents
    except (OSError, ValueError):
        return False


EXPIRED = ".expired"   # in a draft's folder whose copy gave way to newer ones: the file's name, for the message
_drafts_lock = threading.Lock()  # check-and-copy: save_draft is not queued, two saves can run at once


def drafts_held(runs_dir: Path) -> list[quotas.Held]:
    """Every visitor's draft copy: its token, the identity it counts for (a copy from before holders were kept:
    anonymous), its bytes and when it was last written or restored."""
    folder, held = root(runs_dir) / DRAFTS, []
    for draft in folder.iterdir() if folder.is_dir() else []:
        try:
            files = [p for p in draft.iterdir() if p.is_file() and not p.name.startswith(".")]
            if not files:
                continue
            holder = (draft / HOLDER).read_text(encoding="utf-8").strip() if (draft / HOLDER).is_file() else ""
            if holder == quotas.OWNER:  # the owner's copies are not counted
                continue
            held.append(quotas.Held(draft.name, holder or quotas.ANONYMOUS, sum(p.stat().st_size for p in files),
                                    max(p.stat().st_mtime for p in files)))
        except OSError:  # not a folder (the browser secret), or deleted while we looked
            continue
    return held


def _expire_draft(runs_dir: Path, token: str) -> None:
    """Remove a draft's copy, leaving a note of its file's name so restoring it says what happened."""
    folder = draft_dir(runs_dir, token)
    names = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXPIRED).write_text("\n".join(names), encoding="utf-8")


def keep_for_draft(path: str | Path, runs_dir: Path, token: str, holder: str | None = None,
                   limits: quotas.Limits = quotas.LIMITS, now: float | None = None) -> Path:
    """The browser's draft keeps one upload: this one (an older draft copy goes). `holder`: the identity it counts
    for (quotas.holder_of; None: the owner, not counted). Visitors' copies stay within limits.drafts(): when this one
    would not fit, older copies give way, oldest first (quotas.expiry_plan); else a UserError says why."""
    path, folder = Path(path), draft_dir(runs_dir, token)
    dest = folder / path.name
    if dest.exists():
        return dest
    with _drafts_lock:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        # The draft's token comes from the browser: a client that sends a new one each time would copy its upload
        # again and again, each copy kept for two weeks, until the disk is full. So every copy counts for its holder.
        if holder is not None:
            room, size = limits.drafts(), path.stat().st_size
            held = drafts_held(runs_dir)
            gone = quotas.expiry_plan(room, held, holder, size, time.time() if now is None else now)
            if gone is None:
                raise quotas.room_refusal(room, quotas.usage(held), holder, size,
                                          f"A draft copy of {path.name.split('-', 1)[-1]}")
            for entry in gone:
                _expire_draft(runs_dir, entry.key)
        copy_atomic(path, dest)
        (folder / HOLDER).write_text(holder or quotas.OWNER, encoding="utf-8")
    return dest


def restore_draft(runs_dir: Path, token: str, name: str, key: str, holder: str | None = None,
                  limits: quotas.Limits = quotas.LIMITS) -> Path:
    """The draft's upload, copied into this (new) session's folder; ValueError/OSError when it is gone."""
    src = draft_dir(runs_dir, token) / Path(name).name
    if not src.is_file():
        expired = draft_dir(runs_dir, token) / EXPIRED
        if expired.is_file() and src.name in expired.read_text(encoding="utf-8").splitlines():
            raise UserError(f"Your upload {src.name.split('-', 1)[-1]} is no longer kept on the server: a draft keeps "
                            "only a temporary copy of an upload, and yours gave way to newer drafts when the "
                            "server's space for them was full (the oldest copies go first).",
                            hint="Upload the file again.")
        raise FileNotFoundError(name)
    os.utime(src)  # in use: the age sweep keeps it
    return store(src, runs_dir, key, holder=holder, limits=limits)


def sweep_drafts(runs_dir: Path, max_age_s: float = DRAFT_MAX_AGE_S, now: float | None = None) -> None:
    now = time.time() if now is None else now
    folder = root(runs_dir) / DRAFTS
    for draft in folder.iterdir() if folder.is_dir() else []:
        try:
            if now - max(p.stat().st_mtime for p in [draft, *draft.iterdir()]) > max_age_s:
                shutil.rmtree(draft, ignore_errors=True)
        except OSError:
            continue
