"""One error type for mistakes a user can cause, and the wrapper that turns it into an exit."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input or a bad option: the message is one sentence a user can act on."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point; a UserError ends in one line on stderr and exit 2, Ctrl-C in 130."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
