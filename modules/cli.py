"""Command-line helpers shared by every stage script."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from modules.errors import UserError

USER_ERROR_EXIT_CODE = 2


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
