"""The synthetic source: Random User API 1.4 shape, schema traps, determinism."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from functools import partial

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from userstreamd.sources.synthetic import (
    NATIONALITIES,
    NO_ID_NATS,
    STRING_POSTCODE_NATS,
    SyntheticSource,
    synthetic_page,
    synthetic_user,
)

from ..helpers import turns_while

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TOP_KEYS = {
    "gender", "name", "location", "email", "login", "dob",
    "registered", "phone", "cell", "id", "picture", "nat",
}  # fmt: skip
LOCATION_KEYS = {"street", "city", "state", "country", "postcode", "coordinates", "timezone"}
LOGIN_KEYS = {"uuid", "username", "password", "salt", "md5", "sha1", "sha256"}
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PICTURE_RE = re.compile(
    r"^https://randomuser\.me/api/portraits/(med/|thumb/)?(men|women)/\d+\.jpg$"
)
INT_POSTCODE_NATS = set(NATIONALITIES) - STRING_POSTCODE_NATS


def users_of(nat: str, count: int = 40) -> list[dict]:
    return synthetic_page(f"traps-{nat}", 1, count, [nat], now=NOW)


def assert_api_shape(user: dict) -> None:
    assert set(user) == TOP_KEYS
    assert user["gender"] in ("male", "female")
    assert set(user["name"]) == {"title", "first", "last"}
    assert all(isinstance(v, str) and v for v in user["name"].values())
    location = user["location"]
    assert set(location) == LOCATION_KEYS
    assert set(location["street"]) == {"number", "name"}
    assert type(location["street"]["number"]) is int
    assert 1 <= location["street"]["number"] <= 9999
    assert set(location["coordinates"]) == {"latitude", "longitude"}
    assert set(location["timezone"]) == {"offset", "description"}
    assert user["email"].isascii() and user["email"].endswith("@example.com")
    assert set(user["login"]) == LOGIN_KEYS
    assert str(uuid.UUID(user["login"]["uuid"])) == user["login"]["uuid"]
    for block in ("dob", "registered"):
        assert set(user[block]) == {"date", "age"}
        assert DATE_RE.match(user[block]["date"]), user[block]["date"]
        assert type(user[block]["age"]) is int and user[block]["age"] >= 0
    assert isinstance(user["phone"], str) and isinstance(user["cell"], str)
    assert set(user["id"]) == {"name", "value"}
    assert set(user["picture"]) == {"large", "medium", "thumbnail"}
    for url in user["picture"].values():
        assert PICTURE_RE.match(url), url
    assert user["nat"] in NATIONALITIES
    assert json.loads(json.dumps(user, ensure_ascii=False)) == user  # JSON-able as is


def test_nationalities_are_the_api_list() -> None:
    expected = "AU BR CA CH DE DK ES FI FR GB IE IN IR MX NL NO NZ RS TR UA US"
    assert " ".join(NATIONALITIES) == expected


def test_every_nationality_has_the_exact_api_shape() -> None:
    for nat in NATIONALITIES:
        users = users_of(nat)
        assert {u["nat"] for u in users} == {nat}
        for user in users:
            assert_api_shape(user)


def test_same_seed_and_position_give_the_same_user() -> None:
    assert synthetic_user("s", 42, now=NOW) == synthetic_user("s", 42, now=NOW)
    assert synthetic_user("s", 42, ["us"], now=NOW) == synthetic_user("s", 42, ["US"], now=NOW)
    assert synthetic_user("s", 42, now=NOW) != synthetic_user("t", 42, now=NOW)


def test_now_only_moves_the_ages() -> None:
    early = synthetic_user("s", 7, now=datetime(2030, 1, 1, tzinfo=UTC))
    late = synthetic_user("s", 7, now=datetime(2040, 1, 1, tzinfo=UTC))
    assert late["dob"]["age"] == early["dob"]["age"] + 10
    assert late["registered"]["age"] == early["registered"]["age"] + 10
    for user in (early, late):
        del user["dob"]["age"], user["registered"]["age"]
    assert early == late


def test_age_is_whole_years_against_now() -> None:
    user = synthetic_user("ages", 3, now=NOW)
    born = datetime.strptime(user["dob"]["date"], "%Y-%m-%dT%H:%M:%S.%f%z")
    had_birthday = (NOW.month, NOW.day, NOW.time()) >= (born.month, born.day, born.time())
    assert user["dob"]["age"] == NOW.year - born.year - (0 if had_birthday else 1)


def test_ten_thousand_positions_have_distinct_uuids() -> None:
    users = synthetic_page("uuids", 1, 10_000, now=NOW)
    assert len({u["login"]["uuid"] for u in users}) == 10_000
    assert all(uuid.UUID(u["login"]["uuid"]).version == 4 for u in users[:100])


def test_uuid_depends_on_seed_and_position_only() -> None:
    a = synthetic_user("s", 9, ["IR"], now=NOW)
    b = synthetic_user("s", 9, ["US"], now=NOW)
    assert a["login"]["uuid"] == b["login"]["uuid"]
    assert (a["nat"], b["nat"]) == ("IR", "US")


@pytest.mark.parametrize(("page", "results"), [(1, 1), (1, 25), (3, 10), (7, 1), (2, 500)])
def test_page_semantics_equal_position_semantics(page: int, results: int) -> None:
    got = synthetic_page("pages", page, results, ["gb", "de"], now=NOW)
    first = (page - 1) * results + 1
    want = [
        synthetic_user("pages", p, ["GB", "DE"], now=NOW) for p in range(first, first + results)
    ]
    assert got == want


def test_page_rejects_nonsense() -> None:
    assert synthetic_page("s", 1, 0) == []
    with pytest.raises(ValueError, match="page"):
        synthetic_page("s", 0, 10)
    with pytest.raises(ValueError, match="position"):
        synthetic_user("s", 0)


def test_postcode_is_int_or_str_by_nationality() -> None:
    assert {"CA", "GB", "NL", "NO"} == STRING_POSTCODE_NATS
    for nat in NATIONALITIES:
        kinds = {type(u["location"]["postcode"]) for u in users_of(nat)}
        assert kinds == ({str} if nat in STRING_POSTCODE_NATS else {int}), nat
    assert {"US", "AU", "CH", "DE", "FR", "IE"} <= INT_POSTCODE_NATS
    assert all(re.fullmatch(r"\d{4}", u["location"]["postcode"]) for u in users_of("NO"))
    assert any(u["location"]["postcode"].startswith("0") for u in users_of("NO", 200))
    assert all(re.fullmatch(r"[A-Z]\d[A-Z] \d[A-Z]\d", u["location"]["postcode"])
               for u in users_of("CA"))  # fmt: skip


def test_id_value_is_null_for_ir_nz_tr_ua() -> None:
    assert {"IR", "NZ", "TR", "UA"} == NO_ID_NATS
    for nat in NATIONALITIES:
        for user in users_of(nat, 10):
            if nat in NO_ID_NATS:
                assert user["id"] == {"name": "", "value": None}
            else:
                assert user["id"]["name"] and isinstance(user["id"]["value"], str)


@pytest.mark.parametrize(
    ("nat", "id_name", "pattern"),
    [
        ("US", "SSN", r"\d{3}-\d{2}-\d{4}"),
        ("GB", "NINO", r"[A-Z]{2} \d{2} \d{2} \d{2} [A-Z]"),
        ("IE", "PPS", r"\d{7}[A-Z]"),
        ("AU", "TFN", r"\d{9}"),
        ("CH", "AVS", r"756\.\d{4}\.\d{4}\.\d{2}"),
        ("DE", "SVNR", r"\d{2} \d{6} [A-Z] \d{3}"),
        ("DK", "CPR", r"\d{6}-\d{4}"),
        ("ES", "DNI", r"\d{8}-[A-Z]"),
        ("FI", "HETU", r"\d{6}[-A]\d{3}[A-Z]"),
        ("FR", "INSEE", r"[12]\d{12} \d{2}"),
    ],
)
def test_national_ids(nat: str, id_name: str, pattern: str) -> None:
    for user in users_of(nat, 20):
        assert user["id"]["name"] == id_name
        assert re.fullmatch(pattern, user["id"]["value"]), user["id"]["value"]


def test_dob_derived_ids_match_the_birth_date() -> None:
    for nat in ("DK", "NO"):
        for user in users_of(nat, 10):
            y, m, d = user["dob"]["date"][:10].split("-")
            assert user["id"]["value"].startswith(f"{d}{m}{y[2:]}")


def test_non_ascii_names_and_ascii_emails() -> None:
    persian = re.compile(r"[\u0600-\u06FF]")
    cyrillic = re.compile(r"[\u0400-\u04FF]")
    for nat, script in (("IR", persian), ("UA", cyrillic), ("RS", cyrillic)):
        for user in users_of(nat, 20):
            assert script.search(user["name"]["first"]) and script.search(user["name"]["last"])
            assert script.search(user["location"]["street"]["name"])
            assert re.fullmatch(r"[a-z]+\.[a-z]+@example\.com", user["email"]), user["email"]
    german = users_of("DE", 200)
    assert any(not u["name"]["last"].isascii() for u in german)
    assert any(not u["location"]["street"]["name"].isascii() for u in german)
    assert all(u["email"].isascii() for nat in NATIONALITIES for u in users_of(nat, 20))


def test_coordinates_are_strings_in_range() -> None:
    for user in synthetic_page("coords", 1, 500, now=NOW):
        coordinates = user["location"]["coordinates"]
        assert all(type(v) is str for v in coordinates.values())
        assert -90 <= float(coordinates["latitude"]) <= 90
        assert -180 <= float(coordinates["longitude"]) <= 180


def test_login_hashes_are_real_digests_of_password_and_salt() -> None:
    for user in synthetic_page("hashes", 1, 200, now=NOW):
        login = user["login"]
        salted = (login["password"] + login["salt"]).encode()
        assert len(login["salt"]) == 8 and login["salt"].isalnum()
        assert login["md5"] == hashlib.md5(salted).hexdigest()
        assert login["sha1"] == hashlib.sha1(salted).hexdigest()
        assert login["sha256"] == hashlib.sha256(salted).hexdigest()


def test_nat_filter_is_case_insensitive_and_invalid_means_any() -> None:
    filtered = synthetic_page("nats", 1, 300, ["us", " Gb "], now=NOW)
    assert {u["nat"] for u in filtered} == {"US", "GB"}
    assert {u["nat"] for u in synthetic_page("nats", 1, 300, "fr,ch", now=NOW)} == {"FR", "CH"}
    for nats in (["US", "XX"], ["zz"], [], [""]):
        spread = {u["nat"] for u in synthetic_page("nats", 1, 600, nats, now=NOW)}
        assert spread == set(NATIONALITIES), nats


def test_picture_gender_matches_gender() -> None:
    for user in synthetic_page("pics", 1, 200, now=NOW):
        folder = "men" if user["gender"] == "male" else "women"
        assert f"/{folder}/" in user["picture"]["large"]
        number = user["picture"]["large"].rsplit("/", 1)[1]
        assert user["picture"]["thumbnail"].endswith(f"/thumb/{folder}/{number}")


async def test_source_fetch_matches_positions() -> None:
    source = SyntheticSource("src", nats=["de"])
    with trio.fail_after(5):
        batch = await source.fetch(11, 5)
    assert source.name == "synthetic"
    assert [u["login"]["uuid"] for u in batch] == [
        synthetic_user("src", p, ["DE"])["login"]["uuid"] for p in range(11, 16)
    ]
    assert {u["nat"] for u in batch} == {"DE"}
    with pytest.raises(ValueError, match="start"):
        await source.fetch(0, 1)


async def test_a_big_page_lets_other_tasks_run() -> None:
    """A 5,000-user page is generated in chunks: the loop keeps serving other tasks."""
    with trio.fail_after(60):
        users, during = await turns_while(partial(SyntheticSource("chunks").fetch, 1, 5000))
    assert len(users) == 5000
    assert during >= 5000 // 200, f"the other task ran {during} times during the page"


@pytest.mark.parametrize(
    ("inc", "exc", "keys"),
    [
        (["name", "email"], [], {"name", "email", "login"}),
        ([], ["picture", "id", "location"], TOP_KEYS - {"picture", "id", "location"}),
        (["name", "login", "nat"], ["nat"], {"name", "login"}),
        ([], [], TOP_KEYS),
    ],
)
async def test_source_selects_fields_like_the_api(
    inc: list[str], exc: list[str], keys: set[str]
) -> None:
    source = SyntheticSource("fields", inc=inc, exc=exc)
    users = await source.fetch(1, 20)
    assert all(set(user) == keys for user in users)
    full = [synthetic_user("fields", p) for p in range(1, 21)]
    assert [u["login"] for u in users] == [u["login"] for u in full]


def test_login_cannot_be_excluded() -> None:
    with pytest.raises(ValueError, match="login"):
        SyntheticSource("x", exc=["login"])


@settings(max_examples=150, deadline=None)
@given(seed=st.text(max_size=40), position=st.integers(min_value=1, max_value=10**12))
def test_property_any_seed_and_position(seed: str, position: int) -> None:
    user = synthetic_user(seed, position, now=NOW)
    assert_api_shape(user)
    assert user == synthetic_user(seed, position, now=NOW)
    assert user["login"]["uuid"] != synthetic_user(seed, position + 1, now=NOW)["login"]["uuid"]
    postcode = user["location"]["postcode"]
    assert isinstance(postcode, str if user["nat"] in STRING_POSTCODE_NATS else int)
    assert (user["id"]["value"] is None) == (user["nat"] in NO_ID_NATS)
