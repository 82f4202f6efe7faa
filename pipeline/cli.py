"""One command-line style for every tool: a dataclass is the command line.

    @dataclass
    class Config:
        data_dir: Path = arg(help="folder of photos", positional=True)
        size: int = arg(512, "side of the square images in px", **IMAGE_SIZE)
        quiet: bool = arg(False, "no progress bar")

    def main(argv=None) -> int:
        cfg = parse_config(Config, argv, prog="make_shards.py", description=__doc__)

    if __name__ == "__main__":
        run_cli(main)

Each field becomes ``--field-name`` (or a positional argument, or ``flag``: another name, with
``aliases`` accepted too), typed from its annotation:
``bool`` is a switch, ``X | None`` an optional X, ``list[X]`` one or more values. Unknown
options, bad values and the config's own checks (``__post_init__`` raising UserError) end
in one line, ``error: ...``, and exit 2. Every tool that writes files takes ``--out DIR``,
the folder it writes into (make_shards keeps the user's positional ``OUT_DIR``).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import os
import signal
import sys
import threading
import traceback
import types
import typing
from collections.abc import Callable, Sequence

from pipeline.errors import RunError, UserError

REQUIRED = dataclasses.MISSING
# One name for one thing in every command: an image's side is --image-size (the trainer's
# name); --size, its older name in the shard tools, is accepted as well
IMAGE_SIZE = {"flag": "image-size", "aliases": ("size",), "metavar": "PX"}
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_abandoned: list[threading.Thread] = []  # threads left behind that may never end


def abandon_threads() -> None:
    """Say that the threads running now besides this one may never end, e.g. the manager
    thread of a process pool whose workers were killed (it can wait for ever for the rest of
    a result a worker was sending when it died). If one still runs when ``run_cli`` exits,
    once every ``finally`` block has run, the process ends without joining them."""
    _abandoned.extend(t for t in threading.enumerate() if t is not threading.current_thread())


def arg(
    default=REQUIRED,
    help: str = "",
    *,
    choices: Sequence | None = None,
    metavar: str | None = None,
    positional: bool = False,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    const=None,
):
    """A config field that is also a command-line option: ``--flag`` (default: the field's
    name with dashes) and ``--alias`` for each of ``aliases``, all setting the field.
    ``const``: the option may be given without a value, and then means ``const``
    (``--resume`` = ``--resume last``)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "metavar": metavar,
        "positional": positional,
        "flag": flag,
        "aliases": tuple(aliases),
        "const": const,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through run_cli, not argparse's usage dump
        raise UserError(f"{message} (see {self.prog} --help)")


def _base_type(annotation) -> tuple[type, bool]:
    """(X, is_list) for ``X``, ``X | None`` and ``list[X]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """The parser for dataclass ``cls``; only the options typed end up in the namespace."""
    parser = _Parser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue  # not an option (set by the program, not the user)
        kind, many = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not REQUIRED else f.default
        help_text = meta["help"]
        if default not in (REQUIRED, None, False, []) and "default" not in help_text:
            help_text += f" (default: {default})"
        if meta["positional"]:
            nargs = (
                ("+" if default is REQUIRED else "*")
                if many
                else (None if default is REQUIRED else "?")
            )
            # an optional positional needs its real default: argparse would run the type
            # conversion on SUPPRESS itself
            extra = {} if default is REQUIRED else {"default": default}
            parser.add_argument(
                f.name,
                type=kind,
                nargs=nargs,
                choices=meta["choices"],
                metavar=meta["metavar"] or f.name.upper(),
                help=help_text,
                **extra,
            )
            continue
        primary = meta.get("flag") or f.name.replace("_", "-")
        flags = ["--" + name for name in (primary, *meta.get("aliases", ()))]
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        else:
            optional_value = {"const": meta["const"]} if meta.get("const") is not None else {}
            parser.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                nargs="?" if optional_value else ("+" if many else None),
                **optional_value,
                choices=meta["choices"],
                metavar=meta["metavar"],
                required=default is REQUIRED,
                help=help_text,
            )
    return parser


def parse_config_given(cls, argv: Sequence[str] | None, prog: str, description: str):
    """The config from ``argv``, and the names of the options that were typed."""
    given = vars(build_parser(cls, prog, description).parse_args(argv))
    return cls(**given), set(given)


def parse_config(cls, argv: Sequence[str] | None, prog: str, description: str):
    return parse_config_given(cls, argv, prog, description)[0]


def console(**options):
    """The rich Console a command prints through: styled on a terminal; into a file or a pipe
    plain text (rich writes no escape codes there) with every line whole (rich would otherwise
    cut lines at 80 columns where there is no terminal to ask for its width)."""
    from rich.console import Console  # where it is used: --help answers without it

    return Console(soft_wrap=True, **options)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point and exit with its status.

    A UserError (bad input, bad option, full disk) is one line and exit 2; a RunError (the run
    itself failed, e.g. the loss diverged) one line and exit 1; Ctrl-C 130, SIGTERM 143.
    """
    terminated = finished = False

    def on_sigterm(signum, frame):  # `kill PID` ends a tool the way Ctrl-C does: cleanup runs
        nonlocal terminated
        if finished:
            return  # the exit status is decided; a late `kill` does not change it
        terminated = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # The interpreter's teardown puts back the default handlers: a signal then would end the
    # process by the signal, whatever its status. Held back from the atexit stage on.
    atexit.register(signal.pthread_sigmask, signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        code = main()
        finished = True
    except UserError as err:
        finished = True
        print(f"error: {err}", file=sys.stderr)
        _exit(2)
    except RunError as err:
        finished = True
        print(f"error: {err}", file=sys.stderr)
        _exit(1)
    except KeyboardInterrupt:
        finished = True
        print("interrupted", file=sys.stderr)
        _exit(143 if terminated else 130)
    except Exception as err:
        finished = True
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            where = f" while writing {err.filename}" if err.filename else ""
            print(f"error: no space left on device{where}", file=sys.stderr)
            _exit(2)
        if not any(thread.is_alive() for thread in _abandoned):
            raise
        traceback.print_exc()  # a bug: its traceback, as Python would print it
        _exit(1)
    _exit(code or 0)


def _exit(code: int) -> None:
    """``sys.exit``, or, when threads were abandoned, the same status without the interpreter's
    teardown: it would join those threads and could wait for ever."""
    if any(thread.is_alive() for thread in _abandoned):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
