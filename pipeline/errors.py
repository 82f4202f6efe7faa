"""The kinds of failure a tool reports in one line (``pipeline.cli.run_cli`` prints them)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a bad option: the message is one sentence a user can act on (exit 2)."""


class RunError(Exception):
    """The run itself failed, not its input (a diverged loss): one sentence, exit 1."""


class DeviceError(RunError, RuntimeError):
    """The GPU or a library driving it failed (memory, CUDA, the JPEG decoders, a pipeline
    that does not build), not the data: the library's own words, exit 1. Still a
    RuntimeError, as the library's own error was."""
