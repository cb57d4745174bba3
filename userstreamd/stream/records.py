"""One Random User API 1.4 record, validated and normalised into one typed shape.

The schema traps of the real API are absorbed here and nowhere else: ``postcode`` is an
int for some nationalities and a string for others (kept as text), ``id.value`` may be
null, coordinates are strings (become floats), dates are ISO strings (become aware
datetimes). ``login.uuid`` is the natural key and the only field that must be present.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from ..errors import InvalidRecord

_encoder = msgspec.json.Encoder()
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]  # fits an integer column

# The API's fake credentials: dropped before broadcast and storage unless configured.
SECRET_LOGIN_FIELDS = ("password", "salt", "md5", "sha1", "sha256")


class _Part(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Name(_Part, frozen=True):
    title: str = ""
    first: str = ""
    last: str = ""


class Street(_Part, frozen=True):
    number: Int32 | None = None
    name: str = ""


class Coordinates(_Part, frozen=True):
    latitude: float | str
    longitude: float | str


class Timezone(_Part, frozen=True):
    offset: str = ""
    description: str = ""


class Location(_Part, frozen=True):
    street: Street | None = None
    city: str = ""
    state: str = ""
    country: str = ""
    postcode: int | str | None = None
    coordinates: Coordinates | None = None
    timezone: Timezone | None = None


class Login(_Part, frozen=True):
    uuid: uuid.UUID
    username: str = ""


class Dated(_Part, frozen=True):
    date: datetime
    age: Int32 | None = None


class IdDoc(_Part, frozen=True):
    name: str = ""
    value: str | None = None


class Picture(_Part, frozen=True):
    large: str = ""
    medium: str = ""
    thumbnail: str = ""


class User(_Part, frozen=True):
    """A validated record: exactly what the table's typed columns are made from."""

    login: Login
    gender: str | None = None
    name: Name | None = None
    location: Location | None = None
    email: str | None = None
    dob: Dated | None = None
    registered: Dated | None = None
    phone: str | None = None
    cell: str | None = None
    id: IdDoc | None = None
    picture: Picture | None = None
    nat: str | None = None

    @property
    def latitude(self) -> float | None:
        c = self.location.coordinates if self.location else None
        return None if c is None else float(c.latitude)

    @property
    def longitude(self) -> float | None:
        c = self.location.coordinates if self.location else None
        return None if c is None else float(c.longitude)


def _coordinate(value: float | str, limit: float, key: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidRecord(f"{key}: expected a number, got {value!r}") from None
    if not -limit <= number <= limit:
        raise InvalidRecord(f"{key}: {number} is outside -{limit}..{limit}")
    return number


_user_decoder = msgspec.json.Decoder(User, strict=False)


def parse_user(raw: Any) -> User:
    """Validate one raw record; InvalidRecord says which field is wrong."""
    try:
        user = msgspec.convert(raw, User, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidRecord(_where(exc)) from None
    return _checked(user, _encoder.encode(raw))


def decode_user(raw_json: bytes) -> User:
    """`parse_user` for a record still in JSON text: validated as it is decoded, in one
    pass that builds no dicts (what the consumer does for each user it receives)."""
    try:
        user = _user_decoder.decode(raw_json)
    except msgspec.DecodeError as exc:
        raise InvalidRecord(_where(exc)) from None
    return _checked(user, raw_json)


def _where(exc: msgspec.DecodeError) -> str:
    return str(exc).replace("`$.", "`")


def _checked(user: User, raw_json: bytes) -> User:
    """What the types alone do not say: no NUL (JSON writes it only as that escape), and
    coordinates that are numbers on the globe."""
    if b"\\u0000" in raw_json:
        raise InvalidRecord("a text field holds a NUL character, which PostgreSQL cannot store")
    if user.location and user.location.coordinates:
        c = user.location.coordinates
        _coordinate(c.latitude, 90, "location.coordinates.latitude")
        _coordinate(c.longitude, 180, "location.coordinates.longitude")
    return user


def scrub(raw: dict[str, Any]) -> dict[str, Any]:
    """The record without the API's fake credentials (a shallow copy; `raw` is untouched)."""
    login = raw.get("login")
    if not isinstance(login, dict) or not any(k in login for k in SECRET_LOGIN_FIELDS):
        return raw
    return {**raw, "login": {k: v for k, v in login.items() if k not in SECRET_LOGIN_FIELDS}}
