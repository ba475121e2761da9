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

import json
from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's flags, files or settings; the message says which, and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""

    __str__ = Exception.__str__  # FileNotFoundError's own formatting expects (errno, strerror)


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm; the message names the flag values
    most likely at fault (a learning rate or loss scale far too large)."""


class NothingToDo(Exception):
    """The command asked for work that is already done (a --resume of a finished run): the scripts
    print the message and exit with status 0, having changed nothing."""


def read_json(path, what: str = "") -> object:
    """The parsed contents of a JSON file the user handed us; a missing or malformed file is a
    UserError naming it (and `what` it is, e.g. "the checkpoint's config"), never a raw traceback."""
    path = Path(path)
    label = f"{path} ({what})" if what else str(path)
    if not path.is_file():
        raise MissingFileError(f"{label}: file not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)  # bytes in: bad UTF-8 is reported as a ValueError too
    except RecursionError:
        raise UserError(f"{label}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise UserError(f"{label}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{label}: cannot be read ({e.strerror or e})") from None


__all__ = ["UserError", "MissingFileError", "NothingToDo", "NonFiniteError", "read_json"]
