"""How the command line reports a mistake: one line naming the argument, exit status 2."""

from __future__ import annotations

from pathlib import Path

USAGE_EXIT = 2


class UsageError(Exception):
    """A mistake in the command line or in a file it names: printed as one line, exit status 2."""


def check_folder(value: str, flag: str, what: str) -> None:
    if not Path(value).is_dir():
        raise UsageError(
            f"{flag} {value}: no such folder; give {what} (models are loaded from local folders only, nothing is "
            "downloaded)"
        )
