"""The JSON form of the HTTP API against what SMTP and the message/rfc822 form already do: each mailbox
delivered once, bad addresses listed in "rejected" and kept out of To/Cc, the header fields a client may
not forge refused, and long values folded so that no line passes 998 octets."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

import aiohttp

from mailrelayd.smtp.address import header_addresses
from tests.test_api import _daemon_with_key

OK = {"from": "App <app@example.com>", "to": ["a@dest.test"], "subject": "s", "text": "t"}


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str, key: str, daemon: Any) -> None:
        self.http, self.url, self.key, self.daemon = http, url, key, daemon

    async def post(self, doc: Any = None, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}", **kw.pop("headers", {})}
        async with self.http.post(self.url, headers=headers, json=doc, **kw) as r:
            return r.status, await r.json()

    async def queued(self, answer: dict[str, Any]) -> list[str]:
        """The envelope recipients of an accepted message, in order."""
        rec = await self.daemon.spool.get(answer["queue_id"])
        return [r.address for r in sorted(rec.recipients, key=lambda r: r.index)]

    async def message(self, answer: dict[str, Any]) -> tuple[bytes, email.message.EmailMessage]:
        data = await self.daemon.spool.body(answer["queue_id"])
        assert data is not None
        return data, email.message_from_bytes(data, policy=email.policy.default)


async def _api(start_daemon: Any, tmp_path: Path, tls_files: Any) -> tuple[Any, Client, aiohttp.ClientSession]:
    # Deliveries go nowhere (the base config's route): accepted messages stay in the spool to be read.
    d, key, url = await _daemon_with_key(start_daemon, tmp_path, tls_files, {"api": {"address": "127.0.0.1:0",
                                                                                     "tls": False}})
    http = aiohttp.ClientSession()
    return d, Client(http, url, key, d), http


async def test_each_mailbox_is_queued_once(start_daemon, tmp_path, tls_files) -> None:
    """As SMTP's RCPT answers "250 2.1.5 Ok (duplicate recipient)": the same mailbox (the domain compared
    lowercased, the local part as is) once, neither counted against limits.max_recipients (100) nor
    reported; in both forms."""
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        status, body = await api.post({**OK, "to": ["d1@dest.test", "d1@dest.test"], "cc": ["d1@dest.test"],
                                       "bcc": ["d1@Dest.TEST", "D1@dest.test"]})
        assert (status, body["rejected"]) == (202, []), body
        assert await api.queued(body) == ["d1@dest.test", "D1@dest.test"]
        many = ["u@dest.test"] * 5000 + [f"r{i}@dest.test" for i in range(99)]
        status, body = await api.post({**OK, "to": many})
        assert (status, body["rejected"]) == (202, []), body["rejected"][:3]
        assert await api.queued(body) == ["u@dest.test", *many[5000:]]
        raw = b"From: app@example.com\r\nTo: b@dest.test, b@DEST.test\r\nCc: b@dest.test.\r\n\r\nx\r\n"
        status, body = await api.post(data=raw, headers={"Content-Type": "message/rfc822"})
        assert (status, body["rejected"]) == (202, []), body
        assert await api.queued(body) == ["b@dest.test"]
    finally:
        await http.close()
        await d.stop()


async def test_bad_addresses_are_rejected_and_kept_out_of_the_header(start_daemon, tmp_path, tls_files) -> None:
    """A bad to/cc/bcc entry is listed in "rejected" with RCPT's 553 5.1.3, as the message/rfc822 form
    lists it, and is never written into To or Cc; alone, it is the request's error."""
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        status, body = await api.post({**OK, "to": ["x@", "y@dest.test"], "cc": ["Bad <a@b@dest.test>"],
                                       "bcc": "<>"})
        assert status == 202, body
        assert [(r["recipient"], r["code"], r["enhanced"]) for r in body["rejected"]] == [
            ("x@", 553, "5.1.3"), ("Bad <a@b@dest.test>", 553, "5.1.3"), ("<>", 553, "5.1.3")]
        assert await api.queued(body) == ["y@dest.test"]
        data, msg = await api.message(body)
        assert msg["To"] == "y@dest.test" and msg["Cc"] is None and b"x@," not in data
        # The same answer as the message/rfc822 form gives for the same address.
        status, body = await api.post({**OK, "to": "x@"})
        raw = b"From: app@example.com\r\n\r\nx\r\n"
        rfc822 = await api.post(data=raw, headers={"Content-Type": "message/rfc822"}, params={"to": "x@"})
        assert (status, body["error"]["code"], body["error"]["enhanced"]) == (422, 553, "5.1.3"), body
        assert (rfc822[0], rfc822[1]["error"]["code"], rfc822[1]["error"]["enhanced"]) == (422, 553, "5.1.3")
    finally:
        await http.close()
        await d.stop()


async def test_header_fields_a_client_may_not_set(start_daemon, tmp_path, tls_files) -> None:
    """Names compared case-insensitively, each once; trace and signature fields and Bcc refused by name;
    a Date must be an RFC 5322 §3.3 date-time."""
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        for headers, named in (({"Resent-Bcc": "hidden@example.org"}, "Resent-Bcc"), ({"bcc": "h@x.test"}, "bcc"),
                               ({"Return-Path": "<a@example.com>"}, "Return-Path"),
                               ({"Received": "from x by y; Mon, 30 Nov 2026 16:18:00 +0000"}, "Received"),
                               ({"DKIM-Signature": "v=1; d=example.com"}, "DKIM-Signature"),
                               ({"ARC-Seal": "i=1; cv=none"}, "ARC-Seal"),
                               ({"Authentication-Results": "mx; dkim=pass"}, "Authentication-Results"),
                               ({"Date": "garbage"}, "Date"), ({"Date": "Mon, 31 Feb 2026 10:00:00 +0000"}, "Date"),
                               ({"Message-ID": "<x@y>", "message-id": "<dup@y>"}, "message-id"),
                               ({"X-Tag": "a", "x-tag": "b"}, "x-tag"), ({"SUBJECT": "again"}, "SUBJECT")):
            status, body = await api.post({**OK, "headers": headers})
            assert (status, body["error"]["code"], body["error"]["enhanced"]) == (400, 501, "5.5.4"), headers
            assert f"header {named!r}" in body["error"]["message"], body
        fields = {"Date": "Mon, 30 Nov 2026 16:18:00 +0000", "Message-ID": "<x@y.test>", "Reply-To": "r@example.com"}
        status, body = await api.post({**OK, "headers": fields})
        assert status == 202, body
        _, msg = await api.message(body)
        for name, value in fields.items():
            assert msg.get_all(name) == [value], name
    finally:
        await http.close()
        await d.stop()


async def test_long_values_are_folded_within_998_octets(start_daemon, tmp_path, tls_files) -> None:
    """A subject, a text header value or a display name with a word too long for a line is written as RFC
    2047 encoded words that decode to the same text; where encoded words would change the value (a
    Message-ID), the request is refused naming the field instead of 'Line too long'."""
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        subject, tag, name = "s" * 1500, "t" * 3000, "n" * 1200
        status, body = await api.post({**OK, "subject": subject, "headers": {"X-Tag": tag},
                                       "to": [f"{name} <a@dest.test>", "b@dest.test"],
                                       "cc": f"É{name[:900]} <c@dest.test>"})
        assert status == 202, body
        data, msg = await api.message(body)
        assert max(map(len, data.split(b"\r\n"))) <= 998
        assert (msg["Subject"], msg["X-Tag"]) == (subject, tag)
        # Decoded as RFC 2047 §6.2 says (the blank between adjacent encoded words is not text; the email
        # package's address parser keeps it, its decode_header does not).
        raw = email.message_from_bytes(data, policy=email.policy.compat32)
        to = [(str(make_header(decode_header(n))), a) for n, a in header_addresses(raw.get_all("To"))]
        assert to == [(name, "a@dest.test"), ("", "b@dest.test")]
        assert str(make_header(decode_header(header_addresses(raw.get_all("Cc"))[0][0]))) == f"É{name[:900]}"
        status, body = await api.post({**OK, "headers": {"Message-ID": f"<{'m' * 1000}@x.test>"}})
        assert (status, body["error"]["enhanced"]) == (400, "5.5.4"), body
        assert "Message-ID" in body["error"]["message"] and "998" in body["error"]["message"]
    finally:
        await http.close()
        await d.stop()


async def test_address_fields_in_headers_keep_their_addresses_readable(start_daemon, tmp_path, tls_files) -> None:
    """A Reply-To with a non-ASCII display name: only the name is encoded (RFC 2047 §5), not the whole
    value, which hid the address from every reader; one that is no mailbox list is refused."""
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        status, body = await api.post({**OK, "headers": {"Reply-To": "Jösé Núñez <help@example.com>",
                                                         "Sender": "app@example.com"}})
        assert status == 202, body
        data, msg = await api.message(body)
        raw = email.message_from_bytes(data, policy=email.policy.compat32)
        (name, addr), = header_addresses(raw.get_all("Reply-To"))
        assert addr == "help@example.com" and str(make_header(decode_header(name))) == "Jösé Núñez"
        assert msg["Sender"] == "app@example.com"
        status, body = await api.post({**OK, "headers": {"Reply-To": "not an address"}})
        assert (status, body["error"]["enhanced"]) == (400, "5.5.4"), body
        assert "Reply-To" in body["error"]["message"]
    finally:
        await http.close()
        await d.stop()
