"""flopdiff's exceptions: bad user input (the CLI prints its message as one line and exits 2), and the counter's
"cannot count this node" signal."""


class FlopdiffError(Exception):
    """A user error: the message names the input at fault and what to do about it."""


class CannotCount(Exception):
    """A formula cannot count this node from what it sees (say, values that fake tensors do not hold): the node is
    reported `unknown` with this reason, never counted as 0 in silence. Not a user error."""


class Aborted(Exception):
    """The run cannot finish for a reason outside its input (a worker process killed): its message is one line, the
    exit status the internal-error code (3), and nothing is written."""
