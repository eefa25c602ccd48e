"""VERP return paths: round trip, case folding, forgery, rotation, length limits."""

from __future__ import annotations

import pytest

from mailrelayd.feedback.verp import (
    MAC_CHARS,
    MAX_LOCAL_PART,
    MAX_RCPT_INDEX,
    VerpToken,
    make_return_path,
    parse_return_path,
)

QID = "01JD3K5Q8Z7XM"
DOMAIN = "bounce.example.com"
SECRET = b"current-secret"
OLD = b"previous-secret"


def test_round_trip_and_shape() -> None:
    for index in (0, 1, 31, 32, 1000, 10_000, MAX_RCPT_INDEX):
        address = make_return_path(QID, index, DOMAIN, SECRET)
        local, _, domain = address.partition("@")
        assert domain == DOMAIN
        assert local.startswith("bounces+")
        assert len(local) <= MAX_LOCAL_PART
        assert local == local.lower()
        assert set(local) <= set("abcdefghijklmnopqrstuvwxyz0123456789+-.")
        assert parse_return_path(address, DOMAIN, [SECRET]) == VerpToken(QID, index)


def test_mac_has_at_least_40_bits() -> None:
    token = make_return_path(QID, 7, DOMAIN, SECRET).split("@")[0].split("-")[-1]
    assert len(token) == MAC_CHARS
    assert 5 * MAC_CHARS >= 40


def test_case_insensitive_and_angle_brackets() -> None:
    address = make_return_path(QID, 42, DOMAIN, SECRET)
    assert parse_return_path(address.upper(), DOMAIN, [SECRET]) == VerpToken(QID, 42)
    assert parse_return_path(f"<{address}>", DOMAIN.upper() + ".", [SECRET]) == VerpToken(QID, 42)
    assert parse_return_path(address, DOMAIN, [SECRET], prefix="BOUNCES") == VerpToken(QID, 42)


def test_rotation() -> None:
    old = make_return_path(QID, 3, DOMAIN, OLD)
    assert parse_return_path(old, DOMAIN, [SECRET, OLD]) == VerpToken(QID, 3)
    assert parse_return_path(old, DOMAIN, [SECRET]) is None


def test_distinct_tokens() -> None:
    a = make_return_path(QID, 1, DOMAIN, SECRET)
    assert a != make_return_path(QID, 2, DOMAIN, SECRET)
    assert a != make_return_path("01JD3K5Q8Z7XN", 1, DOMAIN, SECRET)
    assert a != make_return_path(QID, 1, DOMAIN, OLD)


def _tamper(address: str, position: int, char: str) -> str:
    return address[:position] + char + address[position + 1 :]


def test_forged_and_damaged_tokens_are_rejected() -> None:
    good = make_return_path(QID, 5, DOMAIN, SECRET)
    local = good.split("@")[0]
    bad = [
        "",
        "bounces@" + DOMAIN,
        "bounces+@" + DOMAIN,
        good.replace(DOMAIN, "other.example.com"),
        good.replace("bounces+", "returns+"),
        local + "@",
        local[:-1] + "@" + DOMAIN,  # truncated MAC
        local[:-3] + "@" + DOMAIN,
        local + "0@" + DOMAIN,  # extra character
        good.replace("-5-", "-6-"),  # another recipient, same MAC
        good.replace("-5-", "-05-"),  # non-canonical index
        good.replace(QID.lower(), "01jd3k5q8z7xn"),  # another queue entry
        good.replace(QID.lower(), "01jd3k5q8z7x"),  # short queue id
        good.replace(QID.lower(), "01jd3k5q8z7xu"),  # U is not Crockford
        local + "-x@" + DOMAIN,
        "bounces+" + "-".join(["0" * 13, "0", "0" * MAC_CHARS]) + "@" + DOMAIN,
        "bounces+" + "a" * 200 + "@" + DOMAIN,
    ]
    # Every single-character change of the MAC must be caught.
    mac_start = len(local) - MAC_CHARS
    for pos in range(mac_start, len(local)):
        replacement = "0" if good[pos] != "0" else "1"
        bad.append(_tamper(good, pos, replacement))
    for address in bad:
        assert parse_return_path(address, DOMAIN, [SECRET]) is None, address


@pytest.mark.parametrize("value", [None, 42, b"bytes", object(), "a@b@c", "\x00@" + DOMAIN])
def test_parse_never_raises(value: object) -> None:
    assert parse_return_path(value, DOMAIN, [SECRET]) is None  # type: ignore[arg-type]


def test_parse_with_no_or_empty_secrets() -> None:
    good = make_return_path(QID, 5, DOMAIN, SECRET)
    assert parse_return_path(good, DOMAIN, []) is None
    assert parse_return_path(good, DOMAIN, [b""]) is None


@pytest.mark.parametrize(
    ("queue_id", "index", "secret", "prefix"),
    [
        ("01JD3K5Q8Z7X", 0, SECRET, "bounces"),  # 12 characters
        ("01JD3K5Q8Z7XU", 0, SECRET, "bounces"),  # U excluded from Crockford base32
        (QID, -1, SECRET, "bounces"),
        (QID, MAX_RCPT_INDEX + 1, SECRET, "bounces"),
        (QID, 0, b"", "bounces"),
        (QID, 0, SECRET, "x" * 40),  # local part would exceed 64 octets
        (QID, 0, SECRET, "a+b"),
        (QID, 0, SECRET, ""),
    ],
)
def test_make_rejects_bad_input(queue_id: str, index: int, secret: bytes, prefix: str) -> None:
    with pytest.raises(ValueError):
        make_return_path(queue_id, index, DOMAIN, secret, prefix=prefix)


def test_lowercase_queue_id_accepted_and_canonicalised() -> None:
    address = make_return_path(QID.lower(), 9, DOMAIN, SECRET)
    assert address == make_return_path(QID, 9, DOMAIN, SECRET)
    assert parse_return_path(address, DOMAIN, [SECRET]) == VerpToken(QID, 9)
