"""A zip written atomically: the one place that builds a zip file (export's adapter bundle, the app's downloads)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Union

# What one entry of a zip holds: a file of this machine (copied as it is) or the text/bytes to store.
Content = Union[Path, str, bytes]


def write_zip(dest: str | Path, entries: Iterable[tuple[str, Content]]) -> Path:
    """`dest` holding `entries` (name inside the zip, content), deflated. Written under a temporary name beside it and
    renamed into place, so a reader never sees half a zip and a failure (a full disk) leaves neither."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, content in entries:
                if isinstance(content, Path):
                    zf.write(content, name)
                else:
                    zf.writestr(name, content)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def folder_entries(folder: str | Path, *, leave_out: frozenset[str] = frozenset(),
                   top: str | None = None) -> list[tuple[str, Content]]:
    """Every file under `folder`, named '<top>/<its path inside>' (sorted; `top` defaults to the folder's name), except
    those named in `leave_out`."""
    folder = Path(folder)
    top = top or folder.name
    return [(f"{top}/{path.relative_to(folder).as_posix()}", path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in leave_out]
