"""flopdiff's exceptions: bad user input (the CLI prints its message as one line and exits 2), a run aborted for a
reason outside its input (one line, exit 3), the counter's "cannot count this node" signal; and how any other
exception is told in one line (exit 3: a crash must never read as a gap to a CI gate)."""

import os
import re
import traceback
from pathlib import Path

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
OURS = tuple(f"{os.sep}{package}{os.sep}" for package in ("tracer", "analytic", "mapping"))


class FlopdiffError(Exception):
    """A user error: the message names the input at fault and what to do about it."""


class CannotCount(Exception):
    """A formula cannot count this node from what it sees (say, values that fake tensors do not hold): the node is
    reported `unknown` with this reason, never counted as 0 in silence. Not a user error."""


class Aborted(Exception):
    """The run cannot finish for a reason outside its input (a worker process killed): its message is one line, the
    exit status the internal-error code (3), and nothing is written."""


def printable(text: str) -> str:
    """`text` with control characters escaped (`\\x1b`): a file name or a vendor string reaching the terminal must
    not move the cursor or clear the screen."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def one_line(text: str) -> str:
    """A message as the one line the command line prints: whitespace collapsed, control characters escaped."""
    return printable(" ".join(text.split()))


def describe(exc: BaseException) -> str:
    """An unexpected exception in one line: its type, message and the innermost flopdiff frame (else the innermost),
    and what to do."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ([f for f in frames if any(p in f.filename for p in OURS)] or frames or [None])[-1]
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    message = one_line(str(exc))[:300]
    return (f"{exc.__class__.__name__}{': ' + message if message else ''}{at}; this is a flopdiff bug or a machine "
            f"fault, not your input: please report it with the command line (FLOPDIFF_TRACEBACK=1 shows the traceback)")
