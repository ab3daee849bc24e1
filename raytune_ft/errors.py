"""Errors a user can cause. The CLI prints them as one readable message and exits with their code.

Anything that is the user's to fix (a bad spec, a missing file, unreachable storage, a bad data row)
raises a subclass of :class:`UserError`; everything else is a bug or an infrastructure failure and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. ``exit_code`` is 2 unless a subclass says otherwise."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class SpecError(UserError):
    """The job spec (or an override) is invalid. Holds one line per problem."""

    def __init__(self, problems: list[str], *, source: str | None = None, notes: list[str] | tuple[str, ...] = ()):
        self.problems = list(problems)
        self.notes = list(notes)  # checks that could not run because of the problems (said, not silently dropped)
        self.source = source
        head = f"invalid job spec{f' {source}' if source else ''}"
        if len(self.problems) == 1:  # one problem, one line
            text = f"{head}: {self.problems[0]}"
        else:
            text = f"{head}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(text + "".join(f"\n  note: {n}" for n in self.notes))


class DataError(UserError):
    """A data file or row is unusable; the message names the file and the 1-based line."""


class StorageError(UserError):
    """Storage is unreachable, missing, refuses the credentials or is not writable."""


class SealError(UserError):
    """The sealed secrets of a Ray job could not be opened: wrong or missing cluster token, a damaged,
    truncated or foreign ``rtf_secrets.sealed``. One line, naming variables, never holding a value."""
