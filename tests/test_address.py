"""Envelope and header address parsing (mailrelayd.smtp.address): the one place addresses are
normalised, unit-tested without sockets. The socket-level checks are in test_fault_clients.py."""

from __future__ import annotations

import pytest

from mailrelayd.errors import address_refusal
from mailrelayd.smtp.address import (
    AddressEncodingError,
    AddressError,
    Mailbox,
    header_mailboxes_by_email,
    parse_command_path,
    parse_header_mailboxes,
)


def mail(arg: str, **kw: object) -> Mailbox | None:
    return parse_command_path(arg, allow_null=True, utf8=True, **kw)[0]  # type: ignore[arg-type]


# --- quoted local parts (RFC 5321 §4.1.2 Quoted-string) -------------------------------------
@pytest.mark.parametrize(("arg", "expected"), [
    ('<"a b"@example.com>', '"a b"@example.com'),
    ('<"a b"@Example.COM.> SIZE=10', '"a b"@example.com'),
    ('<"alice"@example.com>', "alice@example.com"),          # a quoted dot-atom is the dot-atom
    ('<"a.b"@example.com>', "a.b@example.com"),
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),        # escaped quote stays escaped
    ('<"a\\b"@example.com>', "ab@example.com"),              # needless escape dropped
    ('<"a@b"@example.com>', '"a@b"@example.com'),
    ('<"a>b"@example.com>', '"a>b"@example.com'),
])
def test_quoted_local_parts_are_accepted_in_one_canonical_form(arg: str, expected: str) -> None:
    assert str(mail(arg)) == expected


@pytest.mark.parametrize("arg", [
    '<"a\tb"@example.com>', '<"a\x00b"@example.com>', '<"unterminated@example.com>', '<""@example.com>',
    '<"a b"@exa mple.com>', '<"a"b"@example.com>', '<a b@example.com>',
])
def test_bad_quoted_local_parts_are_refused(arg: str) -> None:
    with pytest.raises(AddressError):
        mail(arg)


def test_quoted_domain_of_the_params_is_still_split_correctly() -> None:
    mb, rest = parse_command_path('<"x y"@example.com> SMTPUTF8 SIZE=5', allow_null=True, utf8=True)
    assert str(mb) == '"x y"@example.com'
    assert rest.split() == ["SMTPUTF8", "SIZE=5"]


# --- <Postmaster> (RFC 5321 §4.5.1) -------------------------------------------------------------
@pytest.mark.parametrize("arg", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_names_the_given_domain(arg: str) -> None:
    mb, _ = parse_command_path(arg, allow_null=False, postmaster_domain="bounces.example.net")
    assert mb == Mailbox("postmaster", "bounces.example.net")


def test_bare_local_part_other_than_postmaster_is_refused() -> None:
    with pytest.raises(AddressError):
        parse_command_path("<abuse>", allow_null=False, postmaster_domain="bounces.example.net")
    with pytest.raises(AddressError):  # MAIL FROM has no postmaster shortcut
        mail("<postmaster>")


# --- bytes that are not UTF-8 --------------------------------------------------------------------
def _wire(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # what the session hands to the parser


@pytest.mark.parametrize("raw", [
    b"<\xff\xfe@evil.example> SMTPUTF8", b"<user@\xff\xfe.example> SMTPUTF8", b'<"\xff"@evil.example> SMTPUTF8',
    b"<user@example.com> SMTPUTF8 SIZE=\xff",
])
def test_non_utf8_bytes_are_an_encoding_error_5_6_7(raw: bytes) -> None:
    with pytest.raises(AddressEncodingError) as ei:
        mail(_wire(raw))
    r = address_refusal(ei.value, sender=True)
    assert (r.code, r.enhanced) == (553, "5.6.7")


def test_utf8_address_is_fine_with_smtputf8_and_5_6_7_without() -> None:
    assert str(mail(_wire("<jösé@exämple.com>".encode()))) == "jösé@xn--exmple-cua.com"
    with pytest.raises(AddressEncodingError) as ei:
        parse_command_path(_wire("<jösé@example.com>".encode()), allow_null=False, utf8=False)
    assert address_refusal(ei.value, sender=False).enhanced == "5.6.7"


def test_plain_syntax_errors_keep_their_codes() -> None:
    with pytest.raises(AddressError) as ei:
        mail("<no-at-sign>")
    assert str(address_refusal(ei.value, sender=True)).startswith("553 5.1.7 ")
    assert str(address_refusal(ei.value, sender=False)).startswith("553 5.1.3 ")


# --- header From / Sender mailbox lists (RFC 5322 §3.6.2) ----------------------------------------
@pytest.mark.parametrize("value", [
    "undisclosed-recipients:;", "ceo@victim.com@example.com", "<ceo@victim.com@example.com>",
    "Friends: alice@example.com;", "ceo@victim.com <alice@example.com>", "alice@example.com alice@example.org",
    "alice", "", "Alice <>", "alice@-example.com", "alice@example..com",
])
def test_header_values_without_valid_mailboxes_are_refused(value: str) -> None:
    with pytest.raises(AddressError):
        parse_header_mailboxes(value)


@pytest.mark.parametrize(("value", "expected"), [
    ("alice@Example.com", ["alice@example.com"]),
    ("Alice <alice@example.com>", ["alice@example.com"]),
    ("John Q. Public <jqp@example.com>", ["jqp@example.com"]),   # obsolete but unambiguous
    ('"Smith, J" <js@example.com>', ["js@example.com"]),
    ('"a b"@example.com', ['"a b"@example.com']),
    ("alice@example.com (Alice)", ["alice@example.com"]),
    ("a@example.com, b@example.org", ["a@example.com", "b@example.org"]),
    ("=?utf-8?q?Al=C3=A9?= <al@example.com>", ["al@example.com"]),
])
def test_header_mailboxes_parse(value: str, expected: list[str]) -> None:
    assert [str(m) for m in parse_header_mailboxes(value)] == expected


@pytest.mark.parametrize("value", [
    "sender@client.bench.invalid", "<alice@example.com>", "Alice <alice@Example.COM>",
    "John Q. Public <jqp@example.com>",
    '"Smith, J" <js@example.com>', '"" <x@example.com>', "  spaced  <x@example.com>  ", "a.b+tag@sub.example.com",
    "alice@example..com", "alice@example.com-", "x <a@b>",
])
def test_fast_path_agrees_with_the_email_parser(value: str) -> None:
    def outcome(fn: object) -> object:
        try:
            return [str(m) for m in fn(value)]  # type: ignore[operator]
        except AddressError:
            return "refused"
    assert outcome(parse_header_mailboxes) == outcome(header_mailboxes_by_email)
