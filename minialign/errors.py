"""The one family of errors that a user, not minialign, can fix.

A bad flag, a missing or malformed file, a checkpoint that does not fit the run: each raises a
`UserError` whose message names the flag, file, line or key and says what to do. The scripts
print it as one line, `error: <message>`, and exit with status 2 (minialign.cli). Anything
else that escapes is a bug in minialign and keeps its traceback.

The subclasses also derive from the built-in exception a Python caller would expect
(`ValueError`, `FileNotFoundError`), so library code can be used with ordinary `except`
clauses too.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's flags, files or settings; the message says which, and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""

    __str__ = Exception.__str__  # FileNotFoundError's own formatting expects (errno, strerror)


__all__ = ["UserError", "MissingFileError"]
