"""The one error type a user sees: it says which file, line and field to fix."""

from __future__ import annotations

from pathlib import Path


class SftflowError(Exception):
    """A problem the user fixes by editing one place in one file."""

    def __init__(
        self,
        msg: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.path, self.line, self.field = path, line, field

    def __reduce__(self) -> tuple:
        # Keep path/line/field across processes (datasets.map workers raise it).
        return (_rebuild, (self.args[0], self.path, self.line, self.field))

    @property
    def reason(self) -> str:
        return str(self.args[0])

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.path, self.line) if p is not None)
        field = f"{self.field}: " if self.field else ""
        return f"{where + ': ' if where else ''}{field}{self.args[0]}"


def _rebuild(msg: str, path: str | Path | None, line: int | None, field: str | None) -> SftflowError:
    return SftflowError(msg, path=path, line=line, field=field)
