"""User errors and how the command line reports them.

A ``UserError`` is bad input from the person running a command: a missing or malformed file, an argument out of
range, a run folder that belongs to another run. Its message names what is wrong and where (file and line, id,
argument or tensor) in one line. The command line prints it as

    error: data.pairs: runs/x/pairs.jsonl is a folder, expected a JSONL file

and exits with status 2; ``--debug`` (or ``HFF_DEBUG=1``) shows the traceback instead. Anything else is a bug and
keeps its traceback.

    with user_errors():          # every entry point: hermesflow, python -m hermesflow_fast.train / .selfplay
        run(...)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["EXIT_USER_ERROR", "UserError", "debug_enabled", "user_errors"]

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Input the user can fix; the message is one line naming the file/line, id, argument or tensor."""


def debug_enabled() -> bool:
    """True with ``HFF_DEBUG=1`` (``--debug`` sets it for the process and the ranks it launches)."""
    return os.environ.get("HFF_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.startswith("error:") else f"error: {text}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``UserError`` raised inside into one ``error: …`` line on stderr and exit status 2 (unless debugging).

    The process exits through ``SystemExit`` so that ``finally`` blocks and context managers above still run."""
    try:
        yield
    except UserError as exc:
        if debug_enabled():
            raise
        print(_one_line(exc), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
