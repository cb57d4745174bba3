"""``userstreamd tail``: the stream in a terminal, one line per user.

::

    $ userstreamd tail
    userstreamd tail: connected to ws://127.0.0.1:8765/: epoch 9c2f..., stream at seq 41
         42  Ms Jane Doe                   Norway            31  synthetic

Users go to ``out`` (stdout), one line each, flushed, so ``| grep`` and ``| head -3``
work; with ``json_lines`` each ``user`` frame is printed as received (`json_line`), one
JSON object per line, for ``jq``. Notices (connected, gap, disconnected, bad frames) go
to ``err`` (stderr), one line each, never to ``out``.

**No gap, no duplicate.** tail remembers the last (epoch, seq) it printed and, after any
disconnect (the server stopping, a refused connection, a daemon restart), reconnects with
``?epoch=E&since=S`` (capped exponential backoff with jitter), so the output goes on right
after the last line printed. A user at or below that seq of the same epoch is dropped.
What the server can no longer replay it announces with a ``gap``, which is reported.
``since`` without ``epoch`` means "after that seq of the current epoch": the first
welcome says which epoch that is, and tail reconnects from there.

**Group members** (``group``) get their share of the users and ack each one once it is
written and flushed. The group keeps a member's place (it redelivers what was not acked),
so they do not resume by seq.

**Untrusted input.** In the readable mode every field is escaped (control characters,
line separators, bidi overrides) and truncated, so a record cannot forge lines or repaint
the terminal. A frame that is not ours is reported (throttled) and skipped.

Output is written synchronously: a reader that stops reading (a paused pager) stops tail
too, until the server drops it as dead or too slow; tail then resumes where it stopped.

Exit codes: 0 on SIGINT or SIGTERM, and when ``out`` is a closed pipe; 1 when the server
refuses the handshake for a reason retrying cannot fix (HTTP 400, 401, 403, 404, 414), the
TLS certificate is not trusted, or ``out`` fails otherwise; 2 for invalid arguments.
"""

from .command import EXIT_FAILED, EXIT_OK, EXIT_USAGE, check_arguments, follow, run
from .follower import PONG_TIMEOUT_S, Tail, TailStatistics
from .render import clean, format_user, json_line

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PONG_TIMEOUT_S",
    "Tail",
    "TailStatistics",
    "check_arguments",
    "clean",
    "follow",
    "format_user",
    "json_line",
    "run",
]
