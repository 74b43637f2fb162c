"""The one exception type for problems a user can fix.

Every message says what is wrong and what to do about it. The CLI prints it without a
traceback; the UI shows it as a ``gr.Error``. Anything that is *not* a ``UserError`` is a
bug in phi3_lora and keeps its traceback. `is_out_of_memory` and `is_disk_full` tell which failures of the
machine (not of phi3_lora) an exception is, so training and exports can say so in words.
"""

from __future__ import annotations

import errno
import importlib


class UserError(Exception):
    """A problem the user can fix: bad input, a busy machine, a missing token, ..."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip() if hint else message)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.args[0]


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from or during, outermost first (at most 10)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or GPU memory ran out, here or in a cause: Python's MemoryError, torch's OutOfMemoryError, or the text."""
    for e in _causes(exc):
        text = str(e).lower()
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or any(
                s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc")):
            return True
    return False


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, raised as OSError by Python, as text by safetensors' Rust writer ("StorageFull"), or by torch.save's
    zip writer, which loses the errno and reports the short write ("[enforce fail at inline_container.cc:...]
    unexpected pos 64 vs 0": seen when a checkpoint's optimizer state met a full disk)."""
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left on device" in text or "storagefull" in text or "disk quota exceeded" in text:
            return True
        if "inline_container" in text and "unexpected pos" in text:
            return True
    return False


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a call to the Hugging Face Hub raises when the network, the repo or the login fails: OSError and
    ValueError, and the HTTP errors of the client huggingface_hub uses: httpx, or httpx2 (huggingface_hub 2.x),
    whose errors are not httpx's, so catching httpx.HTTPError alone let an offline machine's ConnectError through."""
    kinds: list[type[BaseException]] = [OSError, ValueError]
    for client in ("httpx", "httpx2"):
        try:
            kinds.append(importlib.import_module(client).HTTPError)
        except ImportError:
            continue
    return tuple(kinds)
