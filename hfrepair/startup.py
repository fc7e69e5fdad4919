"""The ``hfrepair`` command's first seconds: a Ctrl-C while torch, transformers and datasets
are still importing ends as the one line a Ctrl-C during a merge gives, not a traceback.

The package's ``__init__`` calls :func:`guard_startup` before its heavy imports. It acts only
when this process is the command (its script, ``python -m hfrepair`` or ``python -m
hfrepair.cli``), never on a library import; :func:`end_startup_guard`, called as the
command's ``main`` starts, gives SIGINT back to Python's own handler, so that a Ctrl-C
during a merge unwinds through its clean-up as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a command ended by SIGINT
TERMINATED = 128 + signal.SIGTERM  # ... and by SIGTERM
COMMAND_MODULES = ("hfrepair", "hfrepair.cli")


def started_as_command() -> bool:
    """Whether this process was started as the ``hfrepair`` command."""
    if Path(sys.argv[0]).stem == "hfrepair":  # the console script
        return True
    # While ``python -m PACKAGE`` imports the package, argv[0] is "-m".
    args = getattr(sys, "orig_argv", [])
    return sys.argv[0] == "-m" and any(flag == "-m" and module in COMMAND_MODULES
                                       for flag, module in zip(args, args[1:]))


def _interrupted_while_starting(_signum, _frame) -> None:
    # Nothing has been read or written yet, so there is nothing to clean up: leave at once
    # (a KeyboardInterrupt raised inside an import would print its traceback).
    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, every process gets the SIGINT
        sys.stderr.write("hfrepair: error: interrupted\n")
        sys.stderr.flush()
    os._exit(INTERRUPTED)


def guard_startup() -> None:
    """Turn a Ctrl-C during the command's imports into one line and the shell's status."""
    if (threading.current_thread() is threading.main_thread() and started_as_command()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def end_startup_guard() -> None:
    """Give SIGINT back to Python's handler (a KeyboardInterrupt) once the command runs."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command run alone (a batch scheduler's time limit, ``kill``): unwound
    like a Ctrl-C, so the staged output and the spill folder are removed on the way out
    (SIGTERM's default ends the process where it stands)."""


def _terminated(_signum, _frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds():
    """Within: SIGTERM raises :class:`Terminated`, unless a handler of the caller's own is set,
    this is not the main thread, or this is one of a launcher's processes: Python acts on a
    signal only between bytecodes, so a process waiting in a collective for one that failed
    would outlive the SIGTERM the launcher sends it (and be killed after its grace period).
    The handler before is restored after."""
    if (threading.current_thread() is not threading.main_thread()
            or int(os.environ.get("WORLD_SIZE", "1")) > 1
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
