"""The HTTP submission API against hostile requests, over real HTTP on loopback: malformed and
deeply nested JSON, every field with the wrong type, huge and non-UTF-8 bodies, odd content types
and charsets, missing, duplicate and garbage Authorization headers, header injection through line
breaks, other controls and RFC 2047 encoded words, thousands of recipients, and seeded random
documents. Every answer must come within a few seconds and be a 4xx with the documented JSON error
(or a 202 for a request that is in fact valid): never a 500, never a hang; and no message carrying a
header field the client smuggled in is accepted."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from tests.test_api import _daemon_with_key

MAX_SECONDS = 5.0  # per request: far more than any answer needs, far less than a hang
ENHANCED = re.compile(r"^([245])\.[0-9]{1,3}\.[0-9]{1,3}$")
FIELD_LINE = re.compile(rb"^([!-9;-~]+):")
OK = {"from": "App <app@example.com>", "to": ["a@dest.test"], "subject": "s", "text": "t"}
# What a message built from the JSON form may carry (the daemon adds trace and completion fields).
OWN_FIELDS = {b"received", b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
              b"content-type", b"content-transfer-encoding", b"dkim-signature", b"x-order"}
LINE_BREAKS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00"]


@dataclass
class Answer:
    status: int
    body: Any
    seconds: float


class Api:
    def __init__(self, http: aiohttp.ClientSession, url: str, key: str, daemon: Any) -> None:
        self.http, self.url, self.key, self.daemon = http, url, key, daemon
        self.accepted: list[str] = []  # queue ids of messages built from the JSON form

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def post(self, *, headers: Any = None, **kw: Any) -> Answer:
        """One request, bounded in time; the answer checked against the documented forms."""
        t0 = time.monotonic()
        async with asyncio.timeout(MAX_SECONDS), self.http.post(self.url, headers=headers, **kw) as r:
            raw = await r.read()
            status, ctype = r.status, r.content_type
        ans = Answer(status, None, time.monotonic() - t0)
        where = f"{kw!r:.200} -> {status} {raw[:300]!r}"
        assert status == 202 or 400 <= status < 500, where
        assert ctype == "application/json", where
        ans.body = json.loads(raw)
        if status == 202:
            assert isinstance(ans.body["queue_id"], str) and isinstance(ans.body["rejected"], list), where
        else:
            err = ans.body["error"]
            assert set(err) == {"code", "enhanced", "message"}, where
            assert isinstance(err["code"], int) and 400 <= err["code"] < 600, where
            m = ENHANCED.match(err["enhanced"])
            assert m is not None and m.group(1) == str(err["code"])[0], where
            assert isinstance(err["message"], str) and err["message"], where
        return ans

    async def json(self, doc: Any) -> Answer:
        body = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
        ans = await self.post(headers={**self.auth, "Content-Type": "application/json"}, data=body)
        if ans.status == 202:
            self.accepted.append(ans.body["queue_id"])
        return ans

    async def refused(self, doc: Any) -> Answer:
        ans = await self.json(doc)
        assert 400 <= ans.status < 500, (doc, ans)
        return ans

    async def check_accepted_messages(self) -> None:
        """Every message the API took has only the fields the JSON form makes, each well formed."""
        for qid in self.accepted:
            data = await self.daemon.spool.body(qid)
            assert data is not None, qid  # (deliveries fail: it stays queued)
            head = data.split(b"\r\n\r\n", 1)[0]
            assert not re.search(rb"\r(?!\n)|(?<!\r)\n", head), head
            for line in head.split(b"\r\n"):
                if line[:1] in (b" ", b"\t"):
                    continue
                m = FIELD_LINE.match(line)
                assert m is not None, (qid, line)
                assert m.group(1).lower() in OWN_FIELDS, (qid, line)


async def _api(start_daemon: Any, tmp_path: Path, tls_files: Any) -> tuple[Any, Api, aiohttp.ClientSession]:
    # Deliveries go nowhere (the base config's route), so accepted messages stay in the spool to be read.
    d, key, url = await _daemon_with_key(start_daemon, tmp_path, tls_files,
                                         {"api": {"address": "127.0.0.1:0", "tls": False},
                                          "limits": {"max_message_size": "1MB"}})
    http = aiohttp.ClientSession()
    return d, Api(http, url, key, d.daemon), http


async def test_authorization_headers(start_daemon, tmp_path, tls_files) -> None:
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        body = json.dumps(OK).encode()
        ctype = ("Content-Type", "application/json")
        for value in ["", "Bearer", "Bearer ", "Bearer  ", "bearer", "Basic " + api.key, "Token " + api.key,
                      api.key, "Bearer x", "Bearer " + api.key + "x", "Bearer " + api.key[:-1],
                      "Bearer é", "Bearer " + "x" * 7000, "Bearer\t" + api.key]:
            ans = await api.post(headers=CIMultiDict([ctype, ("Authorization", value)]), data=body)
            assert ans.status == 401 and ans.body["error"]["enhanced"] in ("5.7.0", "5.7.8"), value
        ans = await api.post(headers=CIMultiDict([ctype]), data=body)
        assert (ans.status, ans.body["error"]["code"]) == (401, 530)
        # Two Authorization fields: which one counts is ambiguous (a proxy may pick the other).
        for pair in ([api.key, "x"], ["x", api.key], [api.key, api.key]):
            h = CIMultiDict([ctype, *(("Authorization", f"Bearer {k}") for k in pair)])
            assert (await api.post(headers=h, data=body)).status == 401, pair
        for value in ("Bearer " + api.key, "bearer " + api.key, "BEARER  " + api.key + " "):
            assert (await api.post(headers=CIMultiDict([ctype, ("Authorization", value)]), data=body)).status == 202
        # Bytes that are not UTF-8, straight on the socket (the client would not send them).
        host, port = url_host_port(api.url)
        for auth in (b"Bearer \xff\xfe", b"Bearer " + api.key.encode() + b"\x80", b"\xc3\x28 " + api.key.encode()):
            status, raw = await raw_post(host, port, [b"Authorization: " + auth,
                                                      b"Content-Type: application/json"], body)
            assert status == 401 and json.loads(raw)["error"]["code"] in (530, 535), (auth, raw)
        await api.check_accepted_messages()
    finally:
        await http.close()
        await d.stop()


def url_host_port(url: str) -> tuple[str, int]:
    m = re.match(r"https?://([^:/]+):(\d+)/", url)
    assert m is not None
    return m.group(1), int(m.group(2))


async def raw_post(host: str, port: int, headers: list[bytes], body: bytes) -> tuple[int, bytes]:
    """A request written byte for byte (for what aiohttp's client would refuse to send)."""
    async with asyncio.timeout(MAX_SECONDS):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         + b"".join(h + b"\r\n" for h in headers)
                         + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            raw = await reader.read()
        finally:
            writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


async def test_bodies_and_content_types(start_daemon, tmp_path, tls_files) -> None:
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        good = json.dumps(OK).encode()
        j = {**api.auth, "Content-Type": "application/json"}
        for body in [b"", b"{", b"}", b"nul", b"[", b'{"from": }', b"{'from': 'a'}", b'{"a":1,}', b"\x00",
                     b"\xff\xfe{}", b"\xef\xbb\xbf" + good, good + b"\x80", b'{"subject": "\xc3"}',
                     b'{"subject": "\\ud800"}', b'{"a": ' + b"1" * 5000 + b"}", b"1e999999", b"NaN",
                     b'{"from": NaN}', b'{"text": Infinity}', b"[" * 100_000 + b"]" * 100_000,
                     b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 100_000, b'"' + b"\\" * 1001,
                     good + good, b"null", b"[]", b"true", b'"string"', b"42", b"{}", b'{"from":{"from":{}}}']:
            ans = await api.post(headers=j, data=body)
            assert ans.status in (400, 413, 415), body[:40]
        # A key given twice: which one a reader takes differs (RFC 8259 §4), so neither is guessed.
        for dup in (b'{"to": "a@dest.test", "from": "app@example.com", "text": "t", "to": "x@evil.test"}',
                    b'{"from": "app@example.com", "to": "a@dest.test", "text": "t", "from": "ceo@example.com"}',
                    b'{"from": "app@example.com", "to": "a@dest.test", "headers": {"X-A": "1", "X-A": "2"}}'):
            ans = await api.post(headers=j, data=dup)
            assert (ans.status, ans.body["error"]["enhanced"]) == (400, "5.5.4"), dup
            assert "duplicate key" in ans.body["error"]["message"]
        # Lone surrogates, which JSON can escape but no encoding can write.
        for field in ('"subject": "\\ud800"', '"subject": "\u00e9\\udfff"', '"headers": {"X-Order": "\\ud800"}',
                      '"from": "\\ud800 <app@example.com>"', '"cc": ["\\udc80 <c@dest.test>"]',
                      '"bcc": "\\ud800@dest.test"', '"text": "\\ud800"', '"text": null, "html": "\\udbff"'):
            body = ('{"from": "app@example.com", "to": "a@dest.test", "text": "t", ' + field + "}").encode()
            assert (await api.post(headers=j, data=body)).status == 400, field
        for ctype in ("text/plain", "", "application/jsonx", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", "application/json; charset=bogus",
                      "application/json; charset=hex", "application/json; charset=base64",
                      "application/json; charset=utf-16", ";;;==", "application/*", "*/*", "message/*"):
            ans = await api.post(headers={**api.auth, "Content-Type": ctype}, data=good)
            assert ans.status in (400, 415), ctype
        for charset, codec in (("utf-16", "utf-16"), ("latin-1", "latin-1"), ("UTF-8", "utf-8")):
            ans = await api.post(headers={**j, "Content-Type": f"application/json; charset={charset}"},
                                 data=json.dumps({**OK, "subject": "Réinitialisation"}).encode(codec))
            assert ans.status == 202, charset
        # Compressed bodies (not supported: a clear 415), whole, broken, cut short or inflating past the limit.
        bomb = gzip.compress(b'{"text": "' + b"x" * 5_000_000 + b'"}')
        for encoding, body in (("gzip", gzip.compress(good)), ("deflate", zlib.compress(good)), ("br", good),
                               ("gzip", b"\x1f\x8b not gzip"), ("deflate", b"garbage"),
                               ("gzip", gzip.compress(good)[:-9]), ("gzip", bomb), ("x-unknown", good)):
            ans = await api.post(headers={**j, "Content-Encoding": encoding}, data=body)
            assert (ans.status, ans.body["error"]["enhanced"]) == (415, "5.6.1"), encoding
        assert (await api.post(headers={**j, "Content-Encoding": "identity"}, data=good)).status == 202
        host, port = url_host_port(api.url)
        key = b"Authorization: Bearer " + api.key.encode()
        # What the HTTP parser itself refuses (before the API sees the request) still gets a 400.
        for extra in ([b"Content-Type: text/plain"], [b"Transfer-Encoding: chunked"]):
            status, _ = await raw_post(host, port, [key, b"Content-Type: application/json", *extra], good)
            assert status == 400, extra
        # message/rfc822 bodies that are not messages.
        rng = random.Random(5)
        pieces = [b"From: ", b"To: ", b"Bcc: ", b"Subject: x", b"\r\n", b"\n", b" ", b"\t", b"a@dest.test",
                  b"app@example.com", b"root", b"<", b">", b",", b"\xc3\xbc", b"\xff", b"\x00", b"(", b")", b'"',
                  b":", b";", b"=?utf-8?q?a=0D=0A?=", b"@", b"\r\n\r\n", b"x"]
        bodies = [b"", b"\r\n", b"\xff" * 100, b"From: \xc3\xbc\r\nTo: a@dest.test\r\n\r\nx",
                  b"From: root (Cr\xc3\xb6n)\r\nTo: a@dest.test\r\n\r\nx", b"From: \xff\r\nTo: a@dest.test\r\n\r\n"]
        bodies += [b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 25))) for _ in range(150)]
        for body in bodies:
            for params in ({}, {"to": "a@dest.test"}, {"to": "a@dest.test\r\nRCPT TO:<x@y>"},
                           {"from": "app@example.com\r\nX: y", "to": "a@dest.test"}):
                await api.post(headers={**api.auth, "Content-Type": "message/rfc822"}, data=body, params=params)
        await api.check_accepted_messages()
    finally:
        await http.close()
        await d.stop()


WRONG = [0, 1.5, -1, True, False, None, [], [1], [None], [[]], [{}], {}, {"X-Order": "b"}, "", " ", "x" * 2000,
         ["a@dest.test", 1], [{"a": "b"}], 10 ** 30]


# The values above that are fine where they are: an optional field left empty, free text.
# A bad cc or bcc address is listed in "rejected" (and left out of the Cc field); the message goes to "to".
FAIR = {"cc": [None, [], "", " ", "x" * 2000], "bcc": [None, [], "", " ", "x" * 2000],
        "headers": [None, {}, {"X-Order": "b"}],
        "subject": ["", " ", "x" * 2000], "text": ["", " ", "x" * 2000], "html": [None, "", " ", "x" * 2000]}


async def test_wrong_types_for_every_field(start_daemon, tmp_path, tls_files) -> None:
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        for field in ("from", "to", "cc", "bcc", "subject", "text", "html", "headers"):
            for value in WRONG:
                ans = await api.json({**OK, field: value})
                if ans.status == 202:  # only where the value is a fair one for that field
                    assert value in FAIR.get(field, []), (field, value)
        for doc in ({**OK, "unknown": 1}, {**OK, "From": "a@b"}, {**OK, "": 1}, {**OK, "attachments": []},
                    {**OK, "headers": {"X-A": 1}}, {**OK, "headers": {"X-A": None}}, {**OK, "headers": {"X-A": ["v"]}},
                    {**OK, "headers": {"": "v"}}, {**OK, "headers": {"Bcc": "x@dest.test"}},
                    {**OK, "headers": {"content-type": "text/html"}}, {**OK, "headers": {"X A": "v"}},
                    {**OK, "headers": {"X:A": "v"}}, {**OK, "headers": {"Ü": "v"}}, {**OK, "headers": {"X-\x7f": "v"}},
                    {**OK, "text": None, "html": None}, {k: v for k, v in OK.items() if k != "from"},
                    {k: v for k, v in OK.items() if k != "text"}, {**OK, "from": ["a@example.com", "b@example.com"]},
                    {**OK, "text": "\ud800"}, {**OK, "subject": "\udcff"}, {**OK, "to": ["\ud800@dest.test"]}):
            await api.refused(doc)
        # Seeded random documents: random JSON in random fields.
        rng = random.Random(11)

        def value(depth: int = 0) -> Any:
            k = rng.randrange(10 if depth < 3 else 6)
            if k == 0:
                return rng.choice([None, True, False, 0, -1, 2 ** 64, 1e308, 0.5])
            if k in (1, 2, 3):
                return rng.choice(["", "a@dest.test", "App <app@example.com>", "x" * rng.randrange(300), "é",
                                   "=?utf-8?q?=0D=0A?=", "a\r\nBcc: b@dest.test", "\x00", "<>", "a@b@c", ", , ,"])
            if k in (4, 5):
                return rng.choice(LINE_BREAKS) + "Bcc: x@dest.test"
            if k in (6, 7):
                return [value(depth + 1) for _ in range(rng.randrange(4))]
            return {rng.choice(["X-Order", "Bcc", "", "X A", "from", "Subject"]): value(depth + 1)
                    for _ in range(rng.randrange(3))}

        for _ in range(150):
            doc = {**OK}
            for _ in range(rng.randrange(1, 4)):
                doc[rng.choice(["from", "to", "cc", "bcc", "subject", "text", "html", "headers", "x"])] = value()
            await api.json(doc)
        await api.check_accepted_messages()
    finally:
        await http.close()
        await d.stop()


async def test_header_injection(start_daemon, tmp_path, tls_files) -> None:
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        attempts = []
        for br in LINE_BREAKS:
            attempts += [{"subject": f"hi{br}Bcc: x@dest.test"}, {"from": f"app@example.com{br}Bcc: x@dest.test"},
                         {"from": f"App{br}Bcc: x@dest.test <app@example.com>"},
                         {"to": [f"a@dest.test{br}Bcc: x@dest.test"]}, {"cc": f"c@dest.test{br}X-Evil: 1"},
                         {"bcc": [f"b@dest.test{br}X-Evil: 1"]}, {"headers": {"X-Order": f"1{br}X-Evil: 1"}},
                         {"headers": {f"X-Order{br}X-Evil": "1"}}, {"headers": {f"X-Evil: 1{br}X-Order": "1"}}]
        for word in ("=?utf-8?q?hi=0D=0ABcc:_x@dest.test?=", "=?utf-8?b?aGkNCkJjYzogeEBkZXN0LnRlc3Q=?=",
                     "=?iso-8859-1?q?hi=0ABcc:_x@dest.test?=", "=?utf-8?q?hi=0D=0A=0D=0Abody?=",
                     "x =?us-ascii?q?=0D=0AX-Evil:_1?= y", "=?utf-8?q?=00?="):
            attempts += [{"subject": word}, {"headers": {"X-Order": word}}, {"from": f"{word} <app@example.com>"},
                         {"to": [f"{word} <a@dest.test>"]}, {"cc": f'"{word}" <c@dest.test>'}]
        for extra in attempts:
            await api.refused({**OK, **extra})
        # What is fine stays fine, and arrives as it was meant.
        for extra in ({"subject": "Réinitialisation de votre mot de passe", "headers": {"X-Order": "1234"}},
                      {"subject": "=?utf-8?q?caf=C3=A9?= literal", "to": ["Jöhn Dœ <a@dest.test>", "b@dest.test"]},
                      {"from": '"Doe, Jöhn" <app@example.com>', "cc": "Ünal <c@dest.test>"},
                      {"subject": "tab\there", "headers": {"X-Order": "a\tb"}}):
            assert (await api.json({**OK, **extra})).status == 202, extra
        await api.check_accepted_messages()
    finally:
        await http.close()
        await d.stop()


async def test_sizes_and_recipient_counts(start_daemon, tmp_path, tls_files) -> None:
    d, api, http = await _api(start_daemon, tmp_path, tls_files)
    try:
        # Huge strings: accepted or refused, promptly either way (a slow header build stalls the daemon).
        for field, big in (("subject", "é" * 300_000), ("subject", "É " * 150_000), ("subject", "a" * 600_000),
                           ("from", "É " * 100_000 + "<app@example.com>"), ("from", "x" * 600_000),
                           ("to", ["É" * 20 + f" <r{i}@dest.test>" for i in range(5000)]),
                           ("to", "É " * 100_000 + "<a@dest.test>"), ("cc", ", ".join(["a@dest.test"] * 50_000)),
                           ("headers", {f"X-Order{i}": "é" * 900 for i in range(300)}),
                           ("headers", {"X-Order": "é " * 200_000}), ("text", "é" * 450_000),
                           ("html", "<p>" * 100_000), ("text", "x" * 3_000_000)):
            ans = await api.json({**OK, field: big})
            assert ans.status in (202, 400, 413), field
            assert ans.seconds < 2.0, (field, ans.seconds)
        # Thousands of recipients: past limits.max_recipients each is refused (listed, 452 4.5.3, as SMTP
        # does), or the whole request once its header fields are too large; promptly either way.
        for n in (101, 2000, 5000):
            ans = await api.json({**OK, "to": [f"r{i}@dest.test" for i in range(n)]})
            assert ans.seconds < 2.0, (n, ans.seconds)
            if ans.status == 202:
                assert len(ans.body["rejected"]) == n - 100
                assert {r["enhanced"] for r in ans.body["rejected"]} == {"4.5.3"}
            else:
                assert ans.status == 413, ans
        for to in ([], [""], "", ["", " "], None, ["<>"], ["postmaster"], ["a@[127.0.0.1]"]):
            ans = await api.refused({**OK, "to": to})
            assert ans.body["error"]["enhanced"].startswith("5."), to
        raw = b"From: app@example.com\r\nTo: " + b",\r\n ".join(b"r%d@dest.test" % i for i in range(20_000)) + \
            b"\r\nSubject: many\r\n\r\nbody\r\n"
        ans = await api.post(headers={**api.auth, "Content-Type": "message/rfc822"}, data=raw)
        assert ans.status in (202, 400, 413) and ans.seconds < 2.0, ans
        await api.check_accepted_messages()
    finally:
        await http.close()
        await d.stop()
