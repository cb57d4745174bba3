"""errors.describe: the one way an exception becomes a line in a log or a status."""

from __future__ import annotations

from userstreamd.errors import StoreError, describe


def test_type_and_first_line() -> None:
    assert describe(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    assert describe(RuntimeError()) == "RuntimeError"


def test_the_cause_is_named_once() -> None:
    try:
        try:
            raise OSError("connection refused")
        except OSError as exc:
            raise StoreError("database unreachable") from exc
    except StoreError as exc:
        assert describe(exc) == "StoreError: database unreachable (connection refused)"


def test_each_leaf_of_a_group() -> None:
    group = ExceptionGroup("two", [KeyError("k"), ValueError("v")])
    assert describe(group) == "KeyError: 'k'; ValueError: v"


def test_a_huge_message_is_capped() -> None:
    assert len(describe(ValueError("x" * 10_000))) == 500
