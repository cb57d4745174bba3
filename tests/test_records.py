"""Validation and normalisation of one record: the API's schema traps."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from uuid import UUID

import pytest

from userstreamd.errors import InvalidRecord
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.stream.records import SECRET_LOGIN_FIELDS, parse_user, scrub

LAURA = {
    "gender": "female",
    "name": {"title": "Miss", "first": "Laura", "last": "Woods"},
    "location": {
        "street": {"number": 2479, "name": "Henry Street"},
        "city": "Blessington",
        "state": "Wexford",
        "country": "Ireland",
        "postcode": 78276,
        "coordinates": {"latitude": "2.0565", "longitude": "95.2422"},
        "timezone": {"offset": "+1:00", "description": "Brussels"},
    },
    "email": "laura.woods@example.com",
    "login": {
        "uuid": "9f07341f-6fd7-4b5c-8f5a-1f0e3d6b9a11",
        "username": "angryostrich988",
        "password": "racers",
        "salt": "B5ywSDUM",
        "md5": "x",
        "sha1": "y",
        "sha256": "z",
    },
    "dob": {"date": "1967-07-23T09:18:33.666Z", "age": 59},
    "registered": {"date": "2018-10-18T04:05:51.990Z", "age": 8},
    "phone": "031-623-5189",
    "cell": "081-807-8083",
    "id": {"name": "PPS", "value": "1101776T"},
    "picture": {
        "large": "https://randomuser.me/api/portraits/women/88.jpg",
        "medium": "https://randomuser.me/api/portraits/med/women/88.jpg",
        "thumbnail": "https://randomuser.me/api/portraits/thumb/women/88.jpg",
    },
    "nat": "IE",
}


def test_documented_record_parses_with_types() -> None:
    user = parse_user(LAURA)
    assert user.login.uuid == UUID("9f07341f-6fd7-4b5c-8f5a-1f0e3d6b9a11")
    assert user.location is not None and user.location.postcode == 78276
    assert (user.latitude, user.longitude) == (2.0565, 95.2422)
    assert user.dob is not None
    assert user.dob.date == datetime(1967, 7, 23, 9, 18, 33, 666000, tzinfo=UTC)


@pytest.mark.parametrize("nat", ["GB", "CA", "NO", "US", "IR", "UA", "TR", "NZ"])
def test_traps_of_every_kind_parse(nat: str) -> None:
    raw = synthetic_user("traps", 7, [nat])
    user = parse_user(raw)
    assert user.location is not None
    assert user.location.postcode == raw["location"]["postcode"]
    assert user.id is not None and user.id.value == raw["id"]["value"]
    if nat in {"IR", "UA", "TR", "NZ"}:
        assert user.id.value is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["login"].pop("uuid"), "missing required field `uuid`"),
        (lambda r: r.pop("login"), "missing required field `login`"),
        (lambda r: r["login"].update(uuid="not-a-uuid"), "Invalid UUID"),
        (lambda r: r["dob"].update(date="not-a-date"), "dob.date"),
        (lambda r: r["location"]["coordinates"].update(latitude="north"), "latitude"),
        (lambda r: r["location"]["coordinates"].update(longitude="181"), "outside"),
        (lambda r: r["location"]["street"].update(number="twelve"), "street.number"),
    ],
)
def test_invalid_records_say_which_field(mutate: object, message: str) -> None:
    raw = copy.deepcopy(LAURA)
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(InvalidRecord, match=message.replace("(", r"\(")):
        parse_user(raw)


def test_scrub_drops_fake_credentials_without_touching_the_input() -> None:
    raw = copy.deepcopy(LAURA)
    clean = scrub(raw)
    assert set(clean["login"]) == {"uuid", "username"}
    assert set(SECRET_LOGIN_FIELDS) <= set(raw["login"])
    assert scrub(clean) is clean


def test_values_postgres_could_not_store_are_invalid_here() -> None:
    raw = copy.deepcopy(LAURA)
    raw["name"]["first"] = "La\x00ura"
    with pytest.raises(InvalidRecord, match="NUL"):
        parse_user(raw)
    raw = copy.deepcopy(LAURA)
    raw["location"]["street"]["number"] = 10**12
    with pytest.raises(InvalidRecord, match=r"street\.number"):
        parse_user(raw)
