"""The one exception users see: a single line that says where, what and how to fix it.

The CLI turns a `PosttrainError` into that line and exit code 2; any other exception is a
bug in posttrain and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PosttrainError(Exception):
    """A problem with the user's input (recipe, data, files, options), not with posttrain."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        self.fix = fix

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.file, self.line) if p is not None)
        parts = [p for p in (where, self.key) if p]
        text = ": ".join([*parts, self.message])
        text = f"{text} ({self.fix})" if self.fix else text
        return text.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever the input held


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def one_of(choices: Iterable[str]) -> str:
    return "one of: " + ", ".join(sorted(str(c) for c in choices))


def warn(message: str) -> None:
    """One yellow `warning:` line on stderr: something the user should know that does not stop the run."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
