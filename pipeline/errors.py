"""The two kinds of failure a tool reports in one line (``pipeline.cli.run_cli`` prints them)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a bad option: the message is one sentence a user can act on (exit 2)."""


class RunError(Exception):
    """The run itself failed, not its input (a diverged loss): one sentence, exit 1."""
