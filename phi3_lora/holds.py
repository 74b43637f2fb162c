"""What keeps a run's files in place while something uses them: a checkpoint pinned while a request reads it
(Compare, Export; the running job's rotation skips it) and a run held while a request works on it (an export, an
evaluation; Delete run refuses it). Both are flocks, so a crashed holder never blocks anything.

The files they lock are the run folder's (runs.RunDir: its checkpoints, <run>/.holds/); the runs folder's lock is
runs.locked.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir, find_run, locked, parse_checkpoint_step


# --- checkpoints held while a request reads them (Compare, Export) -------------------------------------------------

PIN = ".pin"  # inside a checkpoint folder: readers hold a shared flock on it, rotation an exclusive one


class CheckpointGone(Exception):
    """The checkpoint was rotated away (or never completed) before it could be pinned."""


@contextmanager
def pin_checkpoint(folder: str | Path) -> Iterator[Path]:
    """Keep a checkpoint folder on disk while a request uses it: the running job's rotation skips it until the
    `with` block ends (or this process dies: the lock goes with it). Raises CheckpointGone if it is gone."""
    folder = Path(folder)
    try:
        fh = open(folder / PIN, "a+")
    except OSError:
        raise CheckpointGone(str(folder)) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        if not (folder / RunDir.ADAPTER_CONFIG).exists():  # removed while we waited for the lock
            raise CheckpointGone(str(folder))
        yield folder


def remove_unless_pinned(folder: Path) -> bool:
    """Delete a checkpoint folder unless a request holds it; True when removed."""
    try:
        fh = open(folder / PIN, "a+")
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(folder, ignore_errors=True)  # under the lock: no reader can pin it half-deleted
    return not folder.exists()


def rotate_checkpoints(run: RunDir, keep: int | None, protect: str | Path | None = None) -> list[Path]:
    """Keep the newest `keep` checkpoints (and `protect`, the best one); older ones are removed unless pinned
    (a pinned one goes at a later rotation). Returns what was removed. (transformers' rotate_checkpoints, plus pins.)"""
    if not keep or keep <= 0:
        return []
    try:
        found = sorted((step, p) for p in run.checkpoints.iterdir()
                       if (step := parse_checkpoint_step(p.name)) is not None and p.is_dir())
    except OSError:
        return []
    protected = Path(protect).resolve() if protect else None
    removed = []
    for _, folder in found[:-keep]:
        if folder.resolve() != protected and remove_unless_pinned(folder):
            removed.append(folder)
    return removed


# --- a run held while a request uses it (an export, an evaluation) ------------------------------------------------

@contextmanager
def hold_run(run: RunDir, what: str) -> Iterator[None]:
    """Keep `run` from being deleted while a request uses it: `what` (e.g. "a merge") is what Delete run says is
    running. One file per holder in the run's .holds/, locked (flock) until the `with` block ends or this process
    dies, so a crashed holder never blocks a delete. Taken under the runs folder's lock, which delete_run holds while
    it checks and moves the folder away: a run is either held or gone, never deleted under a holder."""
    import secrets

    with locked(run.path.parent):
        if not run.exists():
            raise UserError(f"Run {run.run_id} no longer exists (it was deleted).", hint="Pick another run.")
        folder = run.path / RunDir.HOLDS
        folder.mkdir(exist_ok=True)
        path = folder / f"{secrets.token_hex(6)}.{os.getpid()}"
        fh = open(path, "w", encoding="utf-8")
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(what)
        fh.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fh.close()


def holds_of(run: RunDir) -> list[str]:
    """What the live holders of `run` are doing (hold_run); a hold whose process is gone is removed."""
    found = []
    try:
        entries = sorted((run.path / RunDir.HOLDS).iterdir())
    except OSError:
        return []
    for path in entries:
        try:
            with open(path, "r+", encoding="utf-8") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # held: a separate open file, so even a holder in this process counts
                    found.append(fh.read().strip() or "a request")
                    continue
                path.unlink(missing_ok=True)  # its holder died without removing it
        except OSError:  # released and removed while we looked
            continue
    return found


# --- both, for whoever works on an adapter: the app's requests and the CLI's export and evaluate ------------------

def gone_checkpoint(path: Path) -> None:
    """A checkpoint the running job rotated away: say so and name the newest one (raises if `path` was one)."""
    if parse_checkpoint_step(path.name) is None or path.parent.name != RunDir.CHECKPOINTS:
        return
    run = RunDir(path.parent.parent)
    newer = [p for _, p in run.checkpoint_dirs(complete=False)]
    newest = f"; the newest now is {run.run_id} · {newer[-1].name}" if newer else ""
    raise UserError(f"{run.run_id} · {path.name} is gone: the running job keeps only its newest checkpoints and "
                    f"removed it{newest}.", hint="Pick that one (↻ Refresh list), or the run's final adapter.")


@contextmanager
def hold_checkpoint(path: Path) -> Iterator[None]:
    """While something uses a checkpoint, the running job's rotation leaves it on disk (pin_checkpoint); any other
    adapter folder needs nothing."""
    path = Path(path)
    if parse_checkpoint_step(path.name) is None or path.parent.name != RunDir.CHECKPOINTS:
        yield
        return
    try:
        with pin_checkpoint(path):
            yield
    except CheckpointGone:
        gone_checkpoint(path)
        raise


@contextmanager
def hold_adapter(path: str | Path, what: str) -> Iterator[None]:
    """While something works on a run's adapter or checkpoint (`what`: "a merge", "an evaluation from the command
    line"): Delete run refuses the run (hold_run) and the running job's rotation leaves the checkpoint on disk
    (hold_checkpoint). An adapter folder outside any run needs no hold."""
    path = Path(path).resolve()
    run = find_run(path)
    with hold_run(run, what) if run is not None else nullcontext(), hold_checkpoint(path):
        yield
