"""The API's top-level fields and its ``inc``/``exc`` selection, shared by every source.

The Random User API keeps the fields named in ``inc`` (all of them when ``inc`` is empty) and
then drops those named in ``exc``. Both sources apply the same rule, so that the same config
gives the same shape whichever source served a user, and ``login`` is always kept:
``login.uuid`` is the stream's key.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["FIELDS", "KEY_FIELD", "keyed_selection", "select", "selected"]

FIELDS: tuple[str, ...] = (
    "gender", "name", "location", "email", "login", "registered",
    "dob", "phone", "cell", "id", "picture", "nat",
)  # fmt: skip
KEY_FIELD = "login"


def selected(inc: Iterable[str] = (), exc: Iterable[str] = ()) -> frozenset[str]:
    """The fields a request with these ``inc``/``exc`` lists returns (the API's rule)."""
    return frozenset(inc or FIELDS) - frozenset(exc)


def select(user: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    """`user` with only `fields` (the user itself when that is all of them)."""
    if fields.issuperset(FIELDS):
        return user
    return {key: value for key, value in user.items() if key in fields}


def keyed_selection(inc: Sequence[str], exc: Sequence[str]) -> tuple[list[str], list[str]]:
    """The ``inc``/``exc`` lists to ask for: `login` added to a non-empty ``inc``; ValueError
    when ``exc`` names it."""
    if KEY_FIELD in exc:
        raise ValueError(f"{KEY_FIELD} cannot be excluded: {KEY_FIELD}.uuid is the key")
    return (list(dict.fromkeys([*inc, KEY_FIELD])) if inc else []), list(exc)
