"""`config.toml_text`, the one way bench and the tests write TOML: whatever it is given comes
back unchanged through `tomllib`, hostile strings and floats included."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userstreamd.config import effective_toml, load_config, toml_text


def _same(a: Any, b: Any) -> bool:
    """Equal, with nan equal to nan (tomllib reads `nan` as float('nan'), never equal to
    itself)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _round_trips(tables: dict[str, dict[str, Any]]) -> None:
    text = toml_text(tables)
    back = tomllib.loads(text)
    assert _same(back, tables), text


HOSTILE_STRINGS = [
    "",
    "😀 emoji",
    'say "hi"',
    "back\\slash \\n \\u0041",
    "it's",
    "'''",
    '"""',
    "line\nbreak\r\nand\ttab",
    "nul \x00 bell \x07 esc \x1b del \x7f",
    "\u2028 line separator, \ufeff bom",
    "# not a comment",
    "[not.a.table]",
    "key = value",
]


@pytest.mark.parametrize("value", HOSTILE_STRINGS)
def test_hostile_strings_round_trip_as_values(value: str) -> None:
    _round_trips({"t": {"value": value, "in_a_list": [value]}})


@pytest.mark.parametrize("name", HOSTILE_STRINGS)
def test_hostile_strings_round_trip_as_keys_and_table_names(name: str) -> None:
    _round_trips({"t": {name: 1}, name: {"x": 2}})


@pytest.mark.parametrize(
    "value",
    [math.inf, -math.inf, math.nan, -0.0, 1e300, 5e-324, 0.1, 2**63 - 1, -(2**63), 0],
)
def test_extreme_numbers_round_trip(value: float) -> None:
    _round_trips({"n": {"value": value, "in_a_list": [value, value]}})


def test_nested_tables_lists_and_unicode_keys_round_trip() -> None:
    _round_trips(
        {
            "producer": {"rate_per_s": 5.0, "fields": ["name", "email"], "on": True},
            "ünïcödé": {"ключ": "значение", "键": "值", "a.b": "dotted key, one key"},
            "outer": {"inner": {"deeper": {"x": 1}}, "empty": {}, "list_of_tables": [{"a": 1}]},
            "empty_table": {},
            "mixed": {"array": [1, "two", 3.0, [4], {"five": 5}], "empty_list": []},
        }
    )


_keys = st.text()
_scalars = (
    st.text()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # TOML's integer range
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(_keys, st.dictionaries(_keys, _values, max_size=5), max_size=4))
def test_any_tables_round_trip(tables: dict[str, dict[str, Any]]) -> None:
    _round_trips(tables)


def test_the_effective_config_is_toml_whatever_its_values(tmp_path: Path) -> None:
    """`check --effective` writes values TOML can read back, hostile ones included."""
    path = tmp_path / "c.toml"
    path.write_text(
        toml_text(
            {
                "producer": {"seed": 'a "quoted"\\\\ seed 🦀', "rate_per_s": 12.5},
                "broadcaster": {"allowed_origins": ["https://ex.ample"]},
            }
        )
    )
    config = load_config(path)
    reread = tomllib.loads(effective_toml(config, environ={}))
    assert reread["producer"]["seed"] == 'a "quoted"\\\\ seed 🦀'
    assert reread["producer"]["rate_per_s"] == 12.5
    assert reread["broadcaster"]["allowed_origins"] == ["https://ex.ample"]
