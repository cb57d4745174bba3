"""What retrying can do about a database error, decided by its SQLSTATE.

psycopg's exception classes do not say it: a read-only standby's refusal (25006) is an
`InternalError`, a deadlock (40P01) and a statement timeout (57014) are
`OperationalError`s like a lost connection, a full disk (53100) too. So the code decides:

- ``transient``: the server or the moment, not the row: retried without end, never a
  dead letter. A read-only transaction (25006: a hot standby, a failover under way), the
  server shutting down, crashed or starting (57P01-57P03), an idle session closed
  (57P05), connection trouble (class 08, and no SQLSTATE at all: the server never
  answered), a serialization failure or deadlock (40001, 40P01), insufficient resources
  (class 53), a lock not available (55P03), a statement timeout (57014).
- ``row``: the server refused the row itself (class 22, data exception; class 23,
  integrity constraint violation): retrying the same row cannot succeed, and it may be
  set aside as a dead letter.
- ``unknown``: anything else (a missing table, a revoked permission, an internal
  error): not the row's fault as far as we know, so never a dead letter; retried like a
  transient fault, but logged as an error, since it may need an operator.
"""

from __future__ import annotations

from ..errors import Fault

TRANSIENT_CLASSES = frozenset({"08", "53"})
TRANSIENT_CODES = frozenset(
    {"25006", "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "57P05"}
)
ROW_CLASSES = frozenset({"22", "23"})


def classify(sqlstate: str | None) -> Fault:
    """The fault a SQLSTATE names (None: no answer from the server, a lost connection)."""
    if sqlstate is None or sqlstate in TRANSIENT_CODES or sqlstate[:2] in TRANSIENT_CLASSES:
        return "transient"
    if sqlstate[:2] in ROW_CLASSES:
        return "row"
    return "unknown"
