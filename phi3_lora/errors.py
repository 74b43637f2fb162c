"""The one exception type for problems a user can fix.

Every message says what is wrong and what to do about it. The CLI prints it without a
traceback; the UI shows it as a ``gr.Error``. Anything that is *not* a ``UserError`` is a
bug in phi3_lora and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad input, a busy machine, a missing token, ..."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip() if hint else message)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.args[0]
