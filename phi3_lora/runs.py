"""The run folder: the one owner of its layout, of run ids and of the record of a run's process.

    <runs>/.active.json              the one run allowed per machine: {"run_id", "process": {...}}
    <runs>/.lock                     serialises check-and-start (jobs)
    <runs>/.exports/<id>/            the app's adapter zips and their verification, downloads while they are built
                                     (exports_dir; never served: the web gets copies in gradio's cache)
    <runs>/<id>/config.yaml          the RunConfig it trains
    <runs>/<id>/events.jsonl         the diary (events.py)
    <runs>/<id>/train.log            the training process's stdout + stderr (jobs)
    <runs>/<id>/pid                  what identifies its process: pid, start time, per-run token
    <runs>/<id>/resolved.json        the model "auto" became, and why
    <runs>/<id>/eval_rows.jsonl      the held-out rows (Compare's examples)
    <runs>/<id>/checkpoints/checkpoint-N/   complete checkpoints (renamed into place from .staging/)
    <runs>/<id>/adapter/             the final adapter, written atomically
    <runs>/<id>/eval/<time>.json     base-vs-tuned scores on the held-out rows (evaluate.py)
    <runs>/<id>/<name>/              merged exports made from the app
    <runs>/<id>/.holds/<what>.<n>    one per request that uses the run (an export, an evaluation), locked while it
                                     does: Delete run waits for none of them, it refuses (holds.py)

Nothing here trains or signals; jobs.py and train.py act, this module only names and reads.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, overload

from phi3_lora.errors import UserError

RUNS_ENV = "PHI3_LORA_RUNS"
DEFAULT_RUNS_DIR = "runs"
ACTIVE = ".active.json"
LOCK = ".lock"
EXPORTS = ".exports"
TOKEN_ENV = "PHI3_LORA_RUN_TOKEN"  # set in the training process's environment: proves a pid is this run's
# set by jobs for a visitor's run (quotas.Limits.run_seconds): the training process saves and stops after this long
TIME_LIMIT_ENV = "PHI3_LORA_TIME_LIMIT_S"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def default_runs_dir() -> Path:
    """Where run folders go unless told: $PHI3_LORA_RUNS, else ./runs (CLI, app and library alike)."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR)


def exports_dir(runs_dir: str | Path, run_id: str) -> Path:
    """Where the app builds a run's zips (its adapter zip beside that zip's verification, which quotes the held-out
    rows): inside the runs folder, which the web server never serves."""
    return Path(runs_dir) / EXPORTS / run_id


# What versions before runs/.exports wrote into <runs>-exports/<run id>/: adapter zips and merged / GGUF download zips,
# a zip's <zip>.verification.json, and the temporary names of each (<zip>.tmp, .<zip>.tmp, .<run>-adapter.verify-N.zip,
# .<zip>.verification.json.tmp). Nothing else: a folder holding anything more is not provably ours.
_OLD_EXPORT_FILE = re.compile(r"^.+\.zip(\.tmp|\.verification\.json(\.tmp)?)?$")


def old_exports_dir(runs_dir: str | Path) -> Path:
    """The sibling folder earlier versions built downloads in (and served); no longer written nor served."""
    return Path(runs_dir).parent / f"{Path(runs_dir).name}-exports"


def remove_old_exports(runs_dir: str | Path) -> bool:
    """Delete old_exports_dir once it holds only what earlier versions wrote there (a folder per run id, in it only
    their zips and the zips' verification and temporary files; no links); True when it went. Anything else in it,
    and the folder is left alone: the owner may have put it there."""
    old = old_exports_dir(runs_dir)
    try:
        if old.is_symlink() or not old.is_dir():
            return False
        for run_folder in old.iterdir():
            if run_folder.is_symlink() or not run_folder.is_dir() or not valid_run_id(run_folder.name):
                return False
            for entry in run_folder.iterdir():
                if entry.is_symlink() or not entry.is_file() or not _OLD_EXPORT_FILE.match(entry.name):
                    return False
        shutil.rmtree(old)
    except OSError:  # unreadable, or changed while we looked: keep it
        return False
    return True


def valid_run_id(run_id: object) -> bool:
    """A plain folder name: letters, digits, '.', '_', '-', not hidden, no path separator (pure)."""
    return isinstance(run_id, str) and bool(_RUN_ID.match(run_id)) and ".." not in run_id


def parse_checkpoint_step(name: str) -> int | None:
    """`checkpoint-12` -> 12; anything else -> None (pure)."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


# --- the process of a run ---------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks since boot) from /proc/<pid>/stat, or None if gone.
    Linux only, like the rest of jobs (fcntl, sessions); elsewhere no process can be proven a run's."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[2]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int | None) -> bool:
    """The process exists and is not a zombie. Says nothing about whose process it is (see ProcessRecord)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


def process_start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[2] if stat else None


ENVIRON_WAIT_S = 1.0  # how long a process may show an empty environment before it is judged not ours


def _environ_has(pid: int, entry: str) -> bool:
    """`entry` is in the process's environment. A process caught inside execve (Popen returns once the child has
    released it, before the kernel has set the new environment's bounds) shows an empty one for a moment: read
    again until it is filled or ENVIRON_WAIT_S has passed, else a run started a moment ago would look like a stranger
    (and a second Start would be let through). A fresh-clone CI run hit it under load."""
    deadline = time.monotonic() + ENVIRON_WAIT_S
    while True:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                data = fh.read()
        except OSError:
            return False
        if data or time.monotonic() >= deadline:
            return entry.encode() in data.split(b"\0")
        time.sleep(0.01)


@dataclass(frozen=True)
class ProcessRecord:
    """What identifies a run's process: a pid alone is reused after a restart, so its start time (and, for
    runs the app starts, a random token in the process's environment) must match too."""

    pid: int
    start_time: int | None
    token: str | None = None

    @classmethod
    def of(cls, pid: int, token: str | None = None) -> "ProcessRecord":
        return cls(pid, process_start_time(pid), token)

    @classmethod
    def from_json(cls, text: str) -> "ProcessRecord | None":
        """The record, or None if unreadable. A bare pid (older versions) is read but can never be proven ours."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if isinstance(data, int) and not isinstance(data, bool):
            return cls(data, None, None)
        if not isinstance(data, dict):
            return None
        pid, start, token = data.get("pid"), data.get("start_time"), data.get("token")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(start, (int, type(None))) \
                or not isinstance(token, (str, type(None))):
            return None
        return cls(pid, start, token)

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "start_time": self.start_time, "token": self.token})

    def is_ours_and_alive(self) -> bool:
        """The pid is alive and is still the process this record was written for. Never true for this very
        process: whatever its pid file says, the app is not a training run of its own."""
        if self.pid <= 0 or self.start_time is None or self.pid == os.getpid():
            return False
        stat = _proc_stat(self.pid)
        if stat is None or stat[0] in ("Z", "X") or stat[2] != self.start_time:
            return False
        return self.token is None or _environ_has(self.pid, f"{TOKEN_ENV}={self.token}")


def new_token() -> str:
    return os.urandom(12).hex()


def temporary_of(path: str | Path) -> Path:
    """Where this thread of this process writes `path` before renaming it into place: '.<name>.tmp-<pid>-<thread>'
    beside it. The app's events run in threads, so two writers of one path at once (two visitors' sessions keeping
    the same upload) each get their own temporary, never one half-written by the other."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def temporaries_of(path: str | Path) -> list[Path]:
    """Every writer's temporary of `path` (temporary_of; '-<pid>' alone from before threads had their own) that
    exists: whoever `path` counts for holds them too."""
    path = Path(path)
    return [p for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*")
            if all(part.isdigit() for part in p.name[len(path.name) + 6:].split("-", 1))]


def write_atomic(path: str | Path, text: str) -> Path:
    """`path` holding `text` (UTF-8), written to this writer's own temporary (temporary_of) and renamed into place:
    readers see the old file or the new one, and writers of one path at once each replace it with a whole text
    instead of sharing one temporary name. A failed write leaves no temporary behind."""
    path = Path(path)
    tmp = temporary_of(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --- one run folder ---------------------------------------------------------------------------------

class _Inside:
    """A run folder's entry as an attribute of RunDir: `RunDir(p).<attr>` is `p / name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, run: None, owner: type) -> _Inside: ...

    @overload
    def __get__(self, run: RunDir, owner: type) -> Path: ...

    def __get__(self, run: RunDir | None, owner: type) -> Path | _Inside:
        return self if run is None else run.path / self.name


@dataclass(frozen=True)
class RunDir:
    """Every path of one run folder; reading helpers that never raise on a missing file."""

    path: Path

    CONFIG: ClassVar[str] = "config.yaml"
    EVENTS: ClassVar[str] = "events.jsonl"
    LOG: ClassVar[str] = "train.log"
    PROCESS: ClassVar[str] = "pid"
    RESOLVED: ClassVar[str] = "resolved.json"
    EVAL_ROWS: ClassVar[str] = "eval_rows.jsonl"
    CHECKPOINTS: ClassVar[str] = "checkpoints"
    STAGING: ClassVar[str] = ".staging"
    ADAPTER: ClassVar[str] = "adapter"
    EVAL: ClassVar[str] = "eval"
    ADAPTER_CONFIG: ClassVar[str] = "adapter_config.json"  # peft's: marks a folder holding an adapter
    TRAINER_STATE: ClassVar[str] = "trainer_state.json"    # transformers': marks a complete checkpoint
    HOLDS: ClassVar[str] = ".holds"                        # holds.hold_run: who uses the run now

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def run_id(self) -> str:
        return self.path.name

    # the paths: RunDir(p).config is p / "config.yaml", and so on
    config = _Inside(CONFIG)
    events = _Inside(EVENTS)
    log = _Inside(LOG)
    process_file = _Inside(PROCESS)
    resolved = _Inside(RESOLVED)
    eval_rows = _Inside(EVAL_ROWS)
    checkpoints = _Inside(CHECKPOINTS)
    adapter = _Inside(ADAPTER)
    eval_dir = _Inside(EVAL)

    @property
    def staging(self) -> Path:
        return self.checkpoints / self.STAGING

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def exists(self) -> bool:
        """A run folder: it has its config and is not itself an adapter folder (adapter/ holds a config copy)."""
        return self.config.is_file() and not (self.path / self.ADAPTER_CONFIG).exists()

    @classmethod
    def reserved_names(cls) -> frozenset[str]:
        """Names inside a run folder that belong to the run (an export must not take one: it replaces what is there),
        the trackers' log folders included."""
        from phi3_lora.trackers import MLFLOW_DIR, TENSORBOARD_DIR

        return frozenset({cls.CONFIG, cls.EVENTS, cls.LOG, cls.PROCESS, cls.RESOLVED, cls.EVAL_ROWS,
                          cls.CHECKPOINTS, cls.ADAPTER, cls.EVAL, f"{cls.EVENTS}.tmp", f"{cls.EVAL_ROWS}.tmp",
                          cls.HOLDS, TENSORBOARD_DIR, MLFLOW_DIR})

    # checkpoints
    def checkpoint_dirs(self, complete: bool = True) -> list[tuple[int, Path]]:
        """(step, folder) of each checkpoint, oldest first. complete: with its trainer state (what Resume
        needs); else every one holding an adapter (what Compare and Export can load)."""
        marker = self.TRAINER_STATE if complete else self.ADAPTER_CONFIG
        found = []
        try:
            entries = list(self.checkpoints.iterdir())
        except OSError:
            return []
        for p in entries:
            step = parse_checkpoint_step(p.name)
            if step is not None and (p / marker).exists():
                found.append((step, p))
        return sorted(found)

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (complete = renamed into place with its trainer state)."""
        found = self.checkpoint_dirs()
        return found[-1][1] if found else None

    def has_adapter(self) -> bool:
        return (self.adapter / self.ADAPTER_CONFIG).exists()

    # the process
    def write_process(self, record: ProcessRecord) -> None:
        write_atomic(self.process_file, record.to_json())

    def read_process(self) -> ProcessRecord | None:
        try:
            return ProcessRecord.from_json(self.process_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return None

    def process_alive(self) -> bool:
        """Its recorded process is alive and provably the same process (pid reuse reads as not alive)."""
        record = self.read_process()
        return record is not None and record.is_ours_and_alive()

    # what the run resolved
    def write_resolved(self, model: str, reason: str) -> None:
        write_atomic(self.resolved, json.dumps({"model": model, "reason": reason}))

    def resolved_model(self) -> str | None:
        try:
            model = json.loads(self.resolved.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            return None
        return model if isinstance(model, str) and model else None


@functools.lru_cache(maxsize=1)
def _home_dirs() -> frozenset[Path]:
    """Every user's home folder on this machine (its name is a user name), and this process's own ($HOME)."""
    homes = {Path(os.path.expanduser("~"))}
    try:
        import pwd

        homes.update(Path(entry.pw_dir) for entry in pwd.getpwall() if entry.pw_dir not in ("", "/"))
    except (ImportError, OSError):  # no user database (Windows, a bare container): $HOME alone
        pass
    return frozenset(h for h in homes if h.is_absolute())


def shown_path(path: str | Path) -> str:
    """A path as a web page shows it: inside a run, '<run id>/<the rest>'; a home folder (or a folder above one) as
    '~'; anything else by its name alone. Never the server's folders (the runs folder, a home directory, a user's
    name) that an absolute path names."""
    path = Path(path)
    if path in _home_dirs() or any(path in home.parents[:-1] for home in _home_dirs()):  # not '/' itself
        return "~"
    run = find_run(path if path.is_dir() else path.parent)
    if run is not None:
        try:
            return (Path(run.run_id) / path.relative_to(run.path)).as_posix()
        except ValueError:
            pass
    return path.name


# An absolute path inside a message: POSIX (/…, ~/…, ~user/…) or Windows (C:\…), not the middle of a URL, a Hub id or a
# word.
_PATH_TAIL = r"[^\s'\"`<>|,;()\[\]{}]"
_PATH_IN_TEXT = re.compile(rf"(?<![\w.:/~\\-])(?:~[\w.-]*/{_PATH_TAIL}*|(?:/|[A-Za-z]:\\){_PATH_TAIL}+)")


def scrub_paths(text: str) -> str:
    """`text` (an error message, the last line of a child process's stderr) with every absolute path in it as
    shown_path shows it: what the library or a child process says may reach a web visitor or a download anybody may
    take. A path's trailing full stop or colon stays punctuation."""

    def shown(m: re.Match[str]) -> str:
        raw = m.group(0)
        core = raw.rstrip(".:")
        path = Path(core.replace("\\", "/")[2:] if core[1:2] == ":" else core)
        try:
            name = shown_path(path.expanduser())
        except (OSError, RuntimeError, ValueError):  # an unknown ~user, unreadable, a loop or a NUL: the name alone
            name = path.name if not core.startswith("~") or "/" in core.rstrip("/") else "~"
        return (name or "…") + raw[len(core):]

    return _PATH_IN_TEXT.sub(shown, str(text))


def find_run(path: str | Path) -> RunDir | None:
    """The run a folder belongs to: the run folder itself, its adapter/ or one of its checkpoints."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        run = RunDir(candidate)
        if run.exists():
            return run
    return None


def adapter_config_file(adapter_dir: str | Path) -> Path | None:
    """The RunConfig an adapter was trained with: its own copy (adapter/ has one), else its run's config."""
    own = Path(adapter_dir) / RunDir.CONFIG
    if own.is_file():
        return own
    run = find_run(adapter_dir)
    return run.config if run else None


def run_in(runs_dir: str | Path, run_id: str | None) -> RunDir:
    """The existing run `run_id` of `runs_dir`, or a UserError that says there is none."""
    if not valid_run_id(run_id) or not (run := RunDir(Path(runs_dir) / str(run_id))).exists():
        # The folder by its name only: the message reaches web visitors, who must not learn the server's folders.
        raise UserError(f"There is no run called {run_id!r} in {Path(runs_dir).name}/.",
                        hint="Pick one from the list of runs.")
    return run


def run_dirs(runs_dir: str | Path) -> list[RunDir]:
    """Every run folder of `runs_dir`, newest id first (ids start with their start time)."""
    try:
        entries = list(Path(runs_dir).iterdir())
    except OSError:
        return []
    found = [RunDir(p) for p in entries if valid_run_id(p.name) and RunDir(p).exists()]
    return sorted(found, key=lambda r: r.run_id, reverse=True)


# --- the active run of a runs folder ----------------------------------------------------------------

def write_active(runs_dir: str | Path, run_id: str, record: ProcessRecord) -> None:
    write_atomic(Path(runs_dir) / ACTIVE, json.dumps({"run_id": run_id, "process": json.loads(record.to_json())}))


def read_active(runs_dir: str | Path) -> tuple[str, ProcessRecord] | None:
    """(run id, its process record) from .active.json, or None if absent or unreadable."""
    try:
        data = json.loads((Path(runs_dir) / ACTIVE).read_text(encoding="utf-8"))
        run_id, record = data["run_id"], ProcessRecord.from_json(json.dumps(data["process"]))
    except (OSError, ValueError, UnicodeDecodeError, TypeError, KeyError):
        return None
    return (run_id, record) if valid_run_id(run_id) and record is not None else None


@contextmanager
def locked(runs_dir: str | Path) -> Iterator[None]:
    """Serialise check-and-start across threads and processes (five Start clicks at once)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
