"""Command-line helpers shared by every stage script."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from modules.errors import UserError

USER_ERROR_EXIT_CODE = 2


def one_line(err: BaseException) -> str:
    """The user-facing line of an error.

    A UserError raised in a DataLoader worker comes back re-raised with the worker's traceback
    in its message ("Caught UserError in DataLoader worker ..."); the message is its last line.
    """
    text = str(err).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        prefix = "modules.errors.UserError: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.split("\n"))


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
