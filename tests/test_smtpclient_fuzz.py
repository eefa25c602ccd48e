"""The outbound SMTP client against remote servers nobody wrote by hand: seeded random hostile,
broken or merely unusual MTAs.

In memory, :class:`ReplyParser` gets random byte streams cut at random places (valid multi-line
replies mixed with garbage, bare LF and CR, NUL, 8-bit text, endless lines and endless
continuations, codes out of range, codes changing inside a reply, malformed enhanced codes): it
yields well-formed replies or raises :class:`BadReply`, never anything else, and what it holds is
bounded. :func:`parse_ehlo` takes any reply; :func:`message_bytes` always frames the message so the
receiver reads back exactly what was meant.

Over loopback sockets (asyncio and uvloop), every case is a scripted remote server whose replies at
each step (greeting, EHLO, MAIL, each RCPT, DATA, after the dot) may be valid, refusals, out of
place, malformed, trickled a byte at a time, multi-megabyte, sent before the command or in surplus,
or never come, and which may close at any point. For every delivery attempt: it ends within a bound,
every recipient gets a well-formed result, no unexpected exception escapes (none is logged by the
transport's catch-all or reaches the loop's handler), no task is left, and a message is reported
delivered only when the server said 2xx after it had read the whole message. Where the script makes
the outcome deterministic, the outcome for each recipient is the one a reference model predicts
(RFC 5321 §4.2: decided by the reply code's first digit; a 5xx to the dot is permanent, a 4xx or a
lost connection after the dot defers), and a second message on the same destination then goes
through.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import uvloop

import mailrelayd.delivery.transport as transport_mod
from mailrelayd.config import parse_config
from mailrelayd.delivery.mx import MxResolver
from mailrelayd.delivery.smtpclient import (
    MAX_LINE,
    MAX_LINES,
    BadReply,
    Reply,
    ReplyParser,
    message_bytes,
    parse_ehlo,
)
from mailrelayd.delivery.transport import RcptResult, Transport
from tests.conftest import base_config, deep_merge, write_config
from tests.test_smtpclient import LOOPS

SEED = 20250611

# --- in memory: the reply parser ---------------------------------------------------------------------
CODES = [200, 211, 214, 220, 221, 235, 250, 251, 252, 300, 334, 354, 400, 421, 450, 451, 452, 454, 500, 501, 502,
         503, 504, 530, 535, 550, 551, 552, 553, 554, 599]
ENHANCED_OK = ["2.0.0", "2.1.5", "4.2.1", "4.7.0", "4.3.2", "5.1.1", "5.7.1", "5.5.1", "5.0.0", "4.999.999"]
ENHANCED_BAD = ["5.1", "6.1.1", "5.1000.1", "5.x.1", "5.1.1x", "51.1.1", "4.7.", ".5.1", "2..0"]
TEXT = [b"ok", b"mx.test says hi", b"PIPELINING", b"SIZE 10240000", b"AUTH=LOGIN PLAIN", b"AUTH", b"\xc3\xa9t\xc3\xa9",
        b"\xff\xfe\xfd", b"\x00", b"nul\x00inside", b"tab\there", b"bare\rcr", b"  spaced  ", b"-", b"250 250-",
        b"\x7f", b"<a@dest.test>", b"\xe6\x97\xa5\xe6\x9c\xac", b"\xed\xa0\x80", b"x" * 700]


def _text(rng: random.Random) -> bytes:
    """A reply line's text: anything but LF, and no CR last (it would merge with a bare-LF end)."""
    parts = [rng.choice(TEXT) for _ in range(rng.choice([0, 1, 1, 2, 4]))]
    if rng.random() < 0.3:
        parts.insert(0, rng.choice(ENHANCED_OK + ENHANCED_BAD).encode())
    t = b" ".join(parts)
    return t + b"." if t.endswith(b"\r") else t


def _valid(rng: random.Random) -> tuple[bytes, Reply]:
    """One well-formed reply (RFC 5321 §4.2.1), its lines ended by CRLF or a bare LF, and the Reply it is."""
    code = rng.choice(CODES)
    texts = [_text(rng) for _ in range(rng.choice([1, 1, 1, 2, 3, 8, 40]))]
    raw = b""
    for i, t in enumerate(texts):
        last = i == len(texts) - 1
        line = b"%d" % code if last and not t and rng.random() < 0.5 else b"%d%s%s" % (code, b" " if last else b"-", t)
        raw += line + rng.choice([b"\r\n", b"\r\n", b"\n"])
    return raw, Reply(code, "\n".join(t.decode("utf-8", "replace") for t in texts))


def _invalid(rng: random.Random) -> bytes:
    """Bytes that start a reply no parser may accept."""
    return rng.choice([
        lambda: b"HTTP/1.1 400 Bad Request\r\n",
        lambda: b"hello there\n",
        lambda: b"25 short\r\n",
        lambda: b"2\r\n",
        lambda: b"\r\n",                                       # an empty line
        lambda: b"250x junk\r\n",
        lambda: b"250\tjunk\r\n",
        lambda: b"\x00\x00\x00 nul code\r\n",
        lambda: b"\xd9\xa2\xd9\xa5\xd9\xa0 arabic digits\r\n",
        lambda: b"+25 sign\r\n",
        lambda: b"%03d out of range\r\n" % rng.choice([0, 1, 99, 100, 199, 600, 699, 999]),  # RFC 5321 §4.2
        lambda: b"%03d-first\r\n%03d next\r\n" % rng.choice([(0, 0), (150, 150), (650, 650)]),
        lambda: b"250-first\r\n%d changed code\r\n" % rng.choice([251, 550, 220]),  # RFC 5321 §4.2.1
        lambda: b"550-a\r\n550-b\r\n450 c\r\n",
        lambda: b"250 " + b"L" * MAX_LINE + rng.choice([b"\r\n", b"\n", b""]),  # overlong, ended or not
        lambda: b"250-x\r\n" * (MAX_LINES + 1),                # a continuation that never ends
    ])()


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random places: all at once, a byte at a time (short streams), or random sizes."""
    style = rng.choice(["whole", "bytes", "small", "large"])
    if style == "whole":
        return [data]
    if style == "bytes" and len(data) < 3000:
        return [data[i:i + 1] for i in range(len(data))]
    sizes = [1, 2, 3, 5, 8, 13] if style == "small" and len(data) < 20000 else [1, 7, 64, 1000, 4096, 20000]
    out, i = [], 0
    while i < len(data):
        n = rng.choice(sizes)
        out.append(data[i:i + n])
        i += n
    return out


def _check_reply(r: object) -> None:
    assert isinstance(r, Reply), r
    assert isinstance(r.code, int) and 200 <= r.code <= 599, r  # RFC 5321 §4.2: first digit 2 to 5
    assert isinstance(r.text, str)
    assert isinstance(r.line(), str)
    ext = parse_ehlo(r)
    assert all(isinstance(k, str) and k and k == k.lower() and isinstance(v, str) for k, v in ext.items()), ext


def _feed_all(chunks: list[bytes]) -> tuple[list[Reply], BadReply | None]:
    """Feed every chunk; the replies got (with those the BadReply carries) and the BadReply that ended
    it, if one did. The parser's state stays bounded after every call: one partial line, at most
    MAX_LINES lines of one reply."""
    p = ReplyParser()
    got: list[Reply] = []
    for c in chunks:
        try:
            out = p.feed(c)
        except BadReply as e:
            for r in e.replies:
                _check_reply(r)
            return got + e.replies, e
        for r in out:
            _check_reply(r)
        got += out
        assert len(p.buf) <= MAX_LINE
        assert len(p.lines) <= MAX_LINES and sum(map(len, p.lines)) <= MAX_LINES * MAX_LINE
    return got, None


def test_reply_parser_takes_valid_streams_cut_anywhere() -> None:
    rng = random.Random(SEED)
    for case in range(250):
        pieces = [_valid(rng) for _ in range(rng.randrange(1, 6))]
        data = b"".join(raw for raw, _ in pieces)
        got, err = _feed_all(_chunks(rng, data))
        assert err is None, (case, data[:200], err)
        assert got == [r for _, r in pieces], case


def test_reply_parser_refuses_garbage_with_its_own_error_only() -> None:
    """Valid replies, then something that is not one, then anything: every reply before it comes out,
    however the bytes were cut (those of the feed that raises ride on the BadReply), then BadReply,
    never another exception."""
    rng = random.Random(SEED + 1)
    for case in range(300):
        pieces = [_valid(rng) for _ in range(rng.randrange(0, 4))]
        bad = _invalid(rng)
        tail = rng.choice([b"", rng.randbytes(rng.randrange(50)), _valid(rng)[0]])
        data = b"".join(raw for raw, _ in pieces) + bad + tail
        got, err = _feed_all(_chunks(rng, data))
        assert isinstance(err, BadReply), (case, bad[:80], got)
        assert got == [r for _, r in pieces], case


def test_reply_parser_on_random_bytes() -> None:
    """Random bytes rich in CR, LF, digits and separators: well-formed replies or BadReply."""
    rng = random.Random(SEED + 2)
    alphabet = b"\r\n\r\n0123456789 - \x00\xff\xe9abc"
    for _ in range(300):
        n = rng.choice([10, 100, 2000])
        if rng.random() < 0.5:
            data = bytes(rng.choice(alphabet) for _ in range(n))
        else:  # valid replies with random bytes flipped
            data = bytearray(b"".join(_valid(rng)[0] for _ in range(5)))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.choice(alphabet)
            data = bytes(data)
        _feed_all(_chunks(rng, data))


@pytest.mark.parametrize("line", [b"250-" + b"m" * 100 + b"\r\n", b"250-" + b"m" * 8000 + b"\r\n",
                                  b"250-\n", b"250-" + b"w" * (MAX_LINE - 4) + b"\r\n"])
def test_an_endless_continuation_is_cut_off(line: bytes) -> None:
    """A reply whose continuation lines never end is refused after MAX_LINES lines, whatever their
    size: memory is bounded by MAX_LINES * MAX_LINE, never by what the server chooses to send."""
    p = ReplyParser()
    fed = 0
    with pytest.raises(BadReply):
        while fed < 100 * 1024 * 1024:
            p.feed(line * 16)
            fed += len(line) * 16
            assert len(p.lines) <= MAX_LINES
    assert fed <= (MAX_LINES + 16) * len(line)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_an_endless_line_is_cut_off(chunk: int) -> None:
    p = ReplyParser()
    fed = 0
    with pytest.raises(BadReply):
        while fed < 10 * 1024 * 1024:
            p.feed(b"2" * chunk)
            fed += chunk
            assert len(p.buf) <= MAX_LINE
    assert fed <= MAX_LINE + chunk


def _trickle_seconds(n: int) -> float:
    """CPU time to parse an ``n``-byte line fed a byte at a time (best of three)."""
    data = b"250 " + b"t" * (n - 6) + b"\r\n"
    best = float("inf")
    for _ in range(3):
        p = ReplyParser()
        t0 = time.process_time()
        for i in range(len(data)):
            p.feed(data[i:i + 1])
        best = min(best, time.process_time() - t0)
    return best


def test_a_line_trickled_a_byte_at_a_time_costs_linear_time() -> None:
    """A server that sends its reply one byte per segment must not cost the event loop (shared by
    every session of the daemon) time quadratic in the line: 8 times the bytes, about 8 times the
    time, not 64."""
    small, big = _trickle_seconds(MAX_LINE // 8), _trickle_seconds(MAX_LINE)
    assert big < 24 * max(small, 1e-4), (small, big)


def test_parse_ehlo_takes_any_reply() -> None:
    rng = random.Random(SEED + 3)
    words = ["AUTH", "auth=", "AUTH=LOGIN", "PLAIN", "SIZE", "pipelining", "\x00", "İ", "ß", "\u2028", "\t", " ",
             "=", "-", "\ufffd", "X" * 300, "STARTTLS", "8bitmime", "\r"]
    for _ in range(500):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randrange(4))) for _ in range(rng.randrange(6))]
        _check_reply(Reply(250, "\n".join(lines)))


# --- in memory: message framing ----------------------------------------------------------------------
def test_message_bytes_frames_any_message() -> None:
    """Whatever the bytes, the wire form has only CRLF line ends, no line that is a lone dot before
    the terminator, and the receiver's dot-unstuffing gives back the message with its line ends
    made CRLF (RFC 5321 §4.5.2, §2.3.8)."""
    rng = random.Random(SEED + 4)
    pieces = [b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"\x00", b"\xff", b"\r\n.\r\n", b"\n.\n", b" ", b"x" * 70]
    for _ in range(500):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(30)))
        body, end = message_bytes(data)
        wire = body + end
        assert wire.endswith(b".\r\n")
        content = wire[:-3]
        assert content == b"" or content.endswith(b"\r\n"), wire
        assert b"\r" not in content.replace(b"\r\n", b"") and b"\n" not in content.replace(b"\r\n", b""), wire
        assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3, wire
        assert _unstuff(content) == _normalised(data), (data, wire)


def _normalised(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data + b"\r\n" if data and not data.endswith(b"\r\n") else data


def _unstuff(content: bytes) -> bytes:
    lines = content.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


# --- over sockets: scripted hostile servers -----------------------------------------------------------
T = 0.8
"""Every reply timeout of the client, in seconds (the cases run concurrently: wall time ~ one of them)."""
CASES = 32
TRICKLE_DELAY = 0.002

# Kinds of step. "reply" writes a well-formed reply; "trickle" writes it a byte at a time; "extra"
# writes it and one more nobody asked for; "junk" writes it and then what is not a reply, both in
# one write; "early" writes it and the next step's reply before that command; "bad" writes what is
# not a reply; "close" writes part of a reply (or nothing) and closes; "hang" writes part of a reply
# (or nothing) and says nothing more.
REPLYING = ("reply", "trickle", "extra", "junk", "early")
TERMINAL = ("bad", "close", "hang")


@dataclass
class Step:
    kind: str
    code: int = 0
    lines: tuple[bytes, ...] = ()
    raw: bytes = b""
    """What is written: the reply, or for bad/close/hang the bytes sent before giving up."""
    surplus: bytes = b""
    """Written with the reply: for extra a reply to no command, for junk what is no reply, for early
    the next step's reply, ahead of its command."""
    close_after: bool = False
    abort: bool = False
    violation: bool = False
    """The surplus ends the session as it arrives: junk, or a reply before the command it would
    answer was sent (RFC 5321 §4.3.1)."""
    prepaid: bool = False
    """Its reply went out with the previous step's (early)."""

    def reply(self) -> Reply:
        return Reply(self.code, "\n".join(t.decode("utf-8", "replace") for t in self.lines))

    def enhanced(self) -> str:
        m = re.match(r"([245])\.\d{1,3}\.\d{1,3}(?![\w.])", self.lines[0].decode("latin-1")) if self.lines else None
        return m.group(0) if m else ""

    def describe(self) -> str:
        flags = "".join(f" {k}" for k in ("close_after", "abort", "violation", "prepaid") if getattr(self, k))
        what = f"{self.code}" if self.kind in REPLYING else repr(self.raw[:40]) + (f"+{len(self.raw)}" if
                                                                                     len(self.raw) > 40 else "")
        return f"{self.kind}({what}{flags})"


@dataclass
class Plan:
    pipelining: bool
    greeting: Step
    ehlo: Step
    mail: Step
    rcpts: list[Step]
    data: Step
    dot: Step
    ambiguous: bool = False
    """A surplus reply inside a pipelined group: which reply answers which command is unknowable
    until the surplus arrives, so only the safety invariants are checked."""

    def describe(self) -> str:
        steps = [("greeting", self.greeting), ("ehlo", self.ehlo), ("mail", self.mail),
                 *((f"rcpt{i}", s) for i, s in enumerate(self.rcpts)), ("data", self.data), ("dot", self.dot)]
        return (f"pipelining={self.pipelining} ambiguous={self.ambiguous} "
                + " ".join(f"{n}={s.describe()}" for n, s in steps))


def _reply_bytes(rng: random.Random, code: int, lines: tuple[bytes, ...]) -> bytes:
    out = b""
    for i, t in enumerate(lines):
        last = i == len(lines) - 1
        line = b"%d" % code if last and not t else b"%d%s%s" % (code, b" " if last else b"-", t)
        out += line + (b"\n" if rng.random() < 0.1 else b"\r\n")
    return out


def _step(rng: random.Random, code: int, *more: bytes, kind: str = "reply") -> Step:
    first = rng.choice([b"", b"", rng.choice(ENHANCED_OK + ENHANCED_BAD).encode() + b" "]) + \
        rng.choice([b"ok", b"go ahead", b"\xc3\xa9t\xc3\xa9", b"nul\x00", b"bare\rcr", b"x" * 300, b""])
    lines = (first.rstrip(b"\r"), *more)
    return Step(kind, code, lines, _reply_bytes(rng, code, lines))


def _ehlo_step(rng: random.Random, pipelining: bool) -> Step:
    ext = [b"SIZE 10485760", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"AUTH=LOGIN", b"X-\xff\x00 junk", b"=", b""]
    lines = [b"mx.test greets you", *rng.sample(ext, rng.randrange(len(ext)))]
    if pipelining:
        lines.insert(rng.randrange(1, len(lines) + 1), rng.choice([b"PIPELINING", b"pipelining"]))
    if rng.random() < 0.05:  # a valid but multi-megabyte EHLO reply: 300 lines of 8 KB
        lines += [b"X" * 8000] * 300
    t = tuple(lines)
    return Step("reply", 250, t, _reply_bytes(rng, 250, t))


BAD = [
    lambda rng: b"HTTP/1.1 400 Bad Request\r\n",
    lambda rng: b"%03d out of range\r\n" % rng.choice([0, 99, 150, 199, 600, 699, 999]),  # RFC 5321 §4.2
    lambda rng: b"250-first\r\n550 5.0.0 changed code\r\n",
    lambda rng: b"25\r\n",
    lambda rng: b"\r\n",
    lambda rng: b"250x\r\n",
    lambda rng: b"\x00\x00\x00 nul code\r\n",
    lambda rng: b"\xff\xfe" + rng.randbytes(30) + b"\n",
    lambda rng: b"250 " + b"A" * (MAX_LINE + 10) + b"\r\n",
    lambda rng: b"250 " + b"B" * (MAX_LINE + 10),                       # no line end at all
    lambda rng: (b"250-" + b"c" * 100 + b"\r\n") * 40000,                # 4 MB that never ends
    lambda rng: (b"250-" + b"d" * 8000 + b"\r\n") * 600 + b"250 end\r\n",  # 4.8 MB, too many lines
]
PARTIAL = [b"", b"2", b"250", b"250-mx.test\r\n", b"250 ok", b"354 go\r", b"550-5.1.1 no\r\n"]

# For each step: the usual success, refusals, and codes out of place (in range, wrong for the step).
SUCCESS = {"greeting": [220], "mail": [250], "rcpt": [250, 250, 251, 252], "data": [354], "dot": [250, 250, 251]}
ODD = {"greeting": [250, 354, 221, 235], "ehlo": [220, 251, 354], "mail": [251, 220, 354, 334],
       "rcpt": [354, 334], "data": [250, 220, 334, 351], "dot": [354, 334, 221]}
TEMP = [421, 450, 451, 452, 454, 499]
PERM = [500, 501, 503, 550, 551, 552, 553, 554, 599]


def _hostile(rng: random.Random, name: str, base: Step) -> Step:
    kind = rng.choices(["temp", "perm", "421", "odd", "trickle", "extra", "junk", "early", "bad", "close", "hang",
                        "close_after"], [3, 3, 2, 3, 2, 2, 2, 2, 3, 2, 1, 1])[0]
    if kind == "temp":
        return _step(rng, rng.choice(TEMP))
    if kind == "perm":
        return _step(rng, rng.choice(PERM))
    if kind == "421":
        return replace(_step(rng, 421), close_after=rng.random() < 0.8)
    if kind == "odd":
        return _step(rng, rng.choice(ODD[name]))
    if kind in ("trickle", "extra", "junk", "early"):
        if kind == "trickle" and len(base.raw) > 120:
            return base  # trickled, a long reply would take longer than the client's timeout T
        surplus = {"extra": _reply_bytes(rng, rng.choice([250, 354, 550, 221]), (b"surplus",)),
                   "junk": rng.choice(BAD[:8])(rng)}.get(kind, b"")
        return replace(base, kind=kind, surplus=surplus)
    if kind == "bad":
        return Step("bad", raw=rng.choice(BAD)(rng))
    if kind == "close":
        return Step("close", raw=rng.choice(PARTIAL), abort=rng.random() < 0.5)
    if kind == "hang":
        return Step("hang", raw=rng.choice([b"", b"250-still thinking\r\n", b"2"]))
    return replace(base, close_after=True)


def make_plan(rng: random.Random) -> Plan:
    pipelining = rng.random() < 0.6
    n = rng.choice([1, 1, 2, 3])
    steps: dict[str, Step] = {
        "greeting": _step(rng, 220), "ehlo": _ehlo_step(rng, pipelining), "mail": _step(rng, 250),
        **{f"rcpt{i}": _step(rng, rng.choice(SUCCESS["rcpt"])) for i in range(n)},
        "data": _step(rng, 354), "dot": _step(rng, rng.choice(SUCCESS["dot"]))}
    names = list(steps)
    for name in rng.sample(names, rng.choice([0, 1, 1, 1, 2, 2, 3])):
        steps[name] = _hostile(rng, "rcpt" if name.startswith("rcpt") else name, steps[name])
    for i, name in enumerate(names):  # an early reply is the next step's, which must be a plain one
        s = steps[name]
        if s.kind != "early":
            continue
        nxt = steps[names[i + 1]] if i + 1 < len(names) else None
        if nxt is None or nxt.kind != "reply" or nxt.close_after:
            steps[name] = replace(s, kind="reply")
            continue
        steps[name] = replace(s, surplus=nxt.raw)
        steps[names[i + 1]] = replace(nxt, prepaid=True)
    ambiguous = False
    for name in names:
        s = steps[name]
        if s.kind == "junk":  # the reply is read, then the session fails
            steps[name] = replace(s, violation=True)
        elif s.kind == "extra":
            # Inside a pipelined group (MAIL and the RCPTs; DATA's reply is its last) a surplus can only
            # be told apart when it arrives, after the client may have read the replies it displaced.
            ambiguous |= pipelining and (name == "mail" or name.startswith("rcpt"))
            steps[name] = replace(s, violation=True)
        elif s.kind == "early":
            # Ahead of its command, unless that command was already sent in the same pipelined group.
            in_group = pipelining and (name == "mail" or name.startswith("rcpt"))
            steps[name] = replace(s, violation=not in_group)
    if ambiguous:  # after the surplus, replies only (it must arrive: see Plan.ambiguous)
        for name in names[names.index("mail"):]:
            if steps[name].kind not in ("reply", "extra", "junk", "early") or steps[name].close_after:
                steps[name] = _step(rng, steps[name].code if steps[name].kind in REPLYING else 250)
    return Plan(pipelining, steps["greeting"], steps["ehlo"], steps["mail"], [steps[f"rcpt{i}"] for i in range(n)],
                steps["data"], steps["dot"], ambiguous)


# --- the reference model: what the client must report when the script decides it --------------------
@dataclass(frozen=True)
class Want:
    code: int
    enhanced: str
    remote_reply: str


class _Fails(Exception):
    """The session fails at this step (no reply, a malformed one, a closed or out-of-step connection)."""


class _Session:
    def __init__(self) -> None:
        self.dead = False

    def send(self) -> None:
        if self.dead:
            raise _Fails()

    def read(self, s: Step) -> Step:
        if self.dead or s.kind in TERMINAL:
            raise _Fails()
        self.dead = s.close_after or s.violation
        return s


def _decided(s: Step, *, final: bool = False) -> Want:
    """A recipient's result from reply ``s``: its code when a refusal (4xx, 5xx) or, after the dot, an
    acceptance (2xx); any other code is out of place for its command and defers (RFC 5321 §4.2)."""
    code = s.code if 400 <= s.code < 600 or (final and 200 <= s.code < 300) else 451
    enh = s.enhanced()
    return Want(code, enh if enh[:1] == str(code)[0] else f"{code // 100}.0.0", s.reply().line())


def expect(plan: Plan) -> list[Want]:
    n = len(plan.rcpts)
    sess = _Session()
    try:
        g = sess.read(plan.greeting)
    except _Fails:
        # Silence is a greeting timeout (4.4.2); a drop or garbage, a failed connection (4.4.1).
        return [Want(451, "4.4.2" if plan.greeting.kind == "hang" else "4.4.1", "")] * n
    if g.code != 220:
        return [_decided(g)] * n
    try:
        sess.send()
        e = sess.read(plan.ehlo)
    except _Fails:
        return [Want(451, "4.4.2", "")] * n
    if e.code != 250:
        return [_decided(e)] * n
    done: dict[int, Want] = {}

    def finish(s: Step, *, final: bool = False) -> list[Want]:
        return [done.get(i) or _decided(s, final=final) for i in range(n)]

    try:
        sess.send()  # MAIL, or the whole group
        m = sess.read(plan.mail)
        if m.code // 100 != 2:
            if plan.pipelining and m.code != 421:  # the rest of the group is read, a 354 ended at once
                done.update(dict.fromkeys(range(n), _decided(m)))  # decided, whatever the rest does
                for r in plan.rcpts:
                    sess.read(r)
                if sess.read(plan.data).code == 354:
                    sess.send()
                    sess.read(plan.dot)
            return finish(m)
        accepted = []
        for i, step in enumerate(plan.rcpts):
            if not plan.pipelining:
                sess.send()
            r = sess.read(step)
            if r.code // 100 == 2:
                accepted.append(i)
            elif r.code == 421:
                return finish(r)
            else:
                done[i] = _decided(r)
        if plan.pipelining:
            d = sess.read(plan.data)
            if not accepted and d.code == 354:
                sess.send()
                sess.read(plan.dot)
        if not accepted:
            return [done[i] for i in range(n)]
        if not plan.pipelining:
            sess.send()
            d = sess.read(plan.data)
        if d.code != 354:
            return finish(d)
        sess.send()
        return finish(sess.read(plan.dot), final=True)
    except _Fails:
        return [done.get(i) or Want(451, "4.4.2", "") for i in range(n)]


# --- the scripted server ---------------------------------------------------------------------------
OK = Step("reply", 250, (b"ok",), b"250 ok\r\n")
GO = Step("reply", 354, (b"go",), b"354 go\r\n")
QUEUED = Step("reply", 250, (b"2.0.0 queued",), b"250 2.0.0 queued\r\n")


class _Done(Exception):
    """The script ended the session."""


@dataclass
class Tx:
    """What the server saw and said in one transaction (by sender)."""

    mail: int = 0
    rcpts: dict[str, int] = field(default_factory=dict)
    body: bytes | None = None
    final: int | None = None
    """The code of a well-formed reply written after the whole message (the dot) had been read."""


class Server:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.sessions = 0
        self.tx: dict[str, Tx] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.on_client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5)
            for t in pending:  # a server stuck: the harness's fault, not the client's; reported below
                t.cancel()
                self.errors.append(TimeoutError("server handler still running"))
            if pending:
                await asyncio.wait(pending)

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        first = self.sessions == 0
        self.sessions += 1
        abort = False
        try:
            await self.session(reader, writer, first)
        except _Done as e:
            abort = bool(e.args and e.args[0])
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # ValueError: readline() past its limit (a client writing garbage)
        except Exception as e:  # a bug in the script: failed on below
            self.errors.append(e)
        finally:
            if abort:
                writer.transport.abort()
            else:
                writer.close()

    async def play(self, s: Step, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if s.prepaid:
            return
        if s.kind == "trickle":
            for i in range(len(s.raw)):
                if writer.is_closing():  # the client has gone (a pipelined group it no longer reads)
                    return
                writer.write(s.raw[i:i + 1])
                await asyncio.sleep(TRICKLE_DELAY)
        else:
            writer.write(s.raw + s.surplus)  # one write: the surplus arrives with the reply
        if s.kind in TERMINAL:
            if s.kind == "bad":
                await writer.drain()
            if s.kind in ("bad", "hang"):
                while await reader.read(65536):
                    pass
            raise _Done(s.abort)
        await writer.drain()
        if s.close_after:
            raise _Done(False)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool) -> None:
        plan = self.plan
        await self.play(plan.greeting if first else _plain(220), reader, writer)
        ehlo_done = False
        tx: Tx | None = None
        scripted = False
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"HELO" and first and ehlo_done and plan.ehlo.code // 100 == 5:
                step = plan.ehlo  # the client's HELO fallback (RFC 5321 §4.1.4): refused the same way
            elif verb in (b"EHLO", b"HELO"):
                step = plan.ehlo if first and not ehlo_done else _ehlo_plain(plan.pipelining)
                ehlo_done = True
            elif verb == b"MAIL":
                tag = line.split(b"<", 1)[1].split(b"@", 1)[0].decode()
                scripted = first and tag == "m1"
                tx = self.tx.setdefault(tag, Tx())
                step = plan.mail if scripted else OK
                tx.mail = step.code
            elif verb == b"RCPT" and tx is not None:
                i = len(tx.rcpts)
                step = plan.rcpts[i] if scripted and i < len(plan.rcpts) else OK
                tx.rcpts[line.split(b"<", 1)[1].split(b">", 1)[0].decode()] = step.code
            elif verb == b"DATA" and tx is not None:
                step = plan.data if scripted else GO
                await self.play(step, reader, writer)
                if step.code == 354 and step.kind in REPLYING:
                    await self.message(reader, writer, tx, plan.dot if scripted else QUEUED)
                scripted = False
                continue
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif verb in (b"RSET", b"NOOP"):
                step, scripted = OK, False
            else:
                step = Step("reply", 500, (b"what?",), b"500 5.5.2 what?\r\n")
            await self.play(step, reader, writer)

    async def message(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tx: Tx, dot: Step) -> None:
        lines = []
        while (line := await reader.readline()) != b".\r\n":
            if not line.endswith(b"\r\n"):
                return  # closed mid-message
            lines.append(line[1:] if line.startswith(b".") else line)
        tx.body = b"".join(lines)
        if dot.kind in REPLYING and not dot.prepaid:
            tx.final = dot.code
        await self.play(dot, reader, writer)


def _plain(code: int) -> Step:
    return Step("reply", code, (b"mx.test ESMTP",), b"%d mx.test ESMTP\r\n" % code)


def _ehlo_plain(pipelining: bool) -> Step:
    raw = b"250-mx.test\r\n" + (b"250-PIPELINING\r\n" if pipelining else b"") + b"250 8BITMIME\r\n"
    return Step("reply", 250, (), raw)


def _r(code: int, text: bytes = b"ok") -> Step:
    return Step("reply", code, (text,), b"%d %s\r\n" % (code, text))


def _named(pipelining: bool, **steps: Step) -> Plan:
    """A plain session in which ``steps`` replace the named steps."""
    plain: dict[str, Any] = {"greeting": _r(220), "ehlo": _ehlo_plain(pipelining), "mail": _r(250, b"2.1.0 ok"),
                             "rcpts": [_r(250, b"2.1.5 ok")], "data": _r(354, b"go"), "dot": _r(250, b"2.0.0 queued")}
    return Plan(pipelining, **{**plain, **steps})


JUNK = b"HTTP/1.1 400 Bad Request\r\n"
NAMED: dict[str, tuple[Plan, int]] = {
    # What each bug found by the fuzz looked like, with the code the first recipient must get.
    "252 to RCPT, pipelined (was delivered, with only a lone dot sent)":
        (_named(True, rcpts=[_r(252, b"2.1.5 cannot VRFY, will accept")]), 250),
    "250 to DATA (was delivered, with no message sent)": (_named(False, data=_r(250, b"2.0.0 ok")), 451),
    "251 to MAIL (was delivered, with no message sent)": (_named(True, mail=_r(251, b"2.1.0 ok")), 250),
    "354 to the dot (was code 354: neither delivered, deferred nor bounced)": (_named(True, dot=_r(354, b"more")), 451),
    "334 to RCPT (was code 334 with enhanced 3.0.0)": (_named(False, rcpts=[_r(334, b"VXNlcm5hbWU6")]), 451),
    "250 greeting (was 451 with enhanced 2.0.0)": (_named(True, greeting=_r(250, b"hi")), 451),
    "greeting 600 (was bounced with code 600, enhanced 6.0.0)":
        (_named(True, greeting=Step("bad", raw=b"600 6.0.0 hello\r\n")), 451),
    "the dot's 250 sent with the 354 (was delivered before the message was sent)":
        (_named(True, data=replace(_r(354, b"go"), kind="early", surplus=b"250 2.0.0 queued\r\n", violation=True),
                dot=replace(_r(250, b"2.0.0 queued"), prepaid=True)), 451),
    "a surplus 250 after EHLO (was read as MAIL's reply, and each reply as the next command's)":
        (_named(False, ehlo=replace(_ehlo_plain(False), kind="extra", surplus=b"250 ok\r\n", violation=True)), 451),
    "a surplus 250 after the dot's (was left for the next message's MAIL)":
        (_named(True, dot=replace(_r(250, b"2.0.0 queued"), kind="extra", surplus=b"250 ok\r\n", violation=True)),
         250),
    "junk after the dot's 250 in one write (was deferred: the 250 was dropped)":
        (_named(True, dot=replace(_r(250, b"2.0.0 queued"), kind="junk", surplus=JUNK, violation=True)), 250),
    "junk after the dot's 550 in one write (was deferred: the 550 was dropped)":
        (_named(False, dot=replace(_r(550, b"5.7.1 spam"), kind="junk", surplus=JUNK, violation=True)), 550),
    "421 to RCPT in a group, DATA never answered (was held 5 s more waiting for a reply to QUIT)":
        (_named(True, rcpts=[_r(421, b"4.3.2 busy")], data=Step("hang")), 421),
    "550 to MAIL in a group, then no reply to RCPT (was deferred: the 550 was dropped)":
        (_named(True, mail=_r(550, b"5.7.1 sender refused"), rcpts=[Step("bad", raw=JUNK)]), 550),
    "553 to MAIL in a group, then a close (was deferred: the 553 was dropped)":
        (_named(True, mail=_r(553, b"5.1.8 bad sender domain"), rcpts=[_r(503), Step("close", raw=b"503-")]), 553),
    "550 to MAIL and junk in one write, in a group (was deferred: the 550 was dropped)":
        (_named(True, mail=replace(_r(550, b"5.7.1 no"), kind="junk", surplus=JUNK, violation=True)), 550),
    "550 to MAIL in a group, the dot after a stray 354 unanswered (was deferred: the 550 was dropped)":
        (_named(True, mail=_r(550, b"5.7.1 no"), rcpts=[_r(503)], dot=Step("hang")), 550),
    "450 to MAIL in a group, then a close (was 451 without the server's reply)":
        (_named(True, mail=_r(450, b"4.7.1 try later"), rcpts=[Step("close", raw=b"")]), 450),
}


def test_the_model_agrees_with_the_named_scripts() -> None:
    for name, (plan, code) in NAMED.items():
        assert expect(plan)[0].code == code, name


# --- the socket fuzz ---------------------------------------------------------------------------------
MSG_PIECES = [b"line\r\n", b".leading dot\r\n", b"..two\r\n", b".\r\n", b"bare lf\n", b"bare cr\r",
              b"\xc3\xa9t\xc3\xa9\r\n", b"x" * 998 + b"\r\n", b"\r\n", b"no end"]
ENHANCED_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _message(rng: random.Random, tag: str) -> bytes:
    return b"From: a@example.com\r\nSubject: %s\r\n\r\n" % tag.encode() + \
        b"".join(rng.choice(MSG_PIECES) for _ in range(rng.randrange(1, 12)))


@dataclass
class Outcome:
    rcpts: list[str]
    data: bytes
    results: list[RcptResult]
    seconds: float


class _Log:
    """Stands in for the transport's logger: keeps what its catch-all logs (an unexpected exception)."""

    def __init__(self) -> None:
        self.exceptions: list[tuple[str, dict[str, Any]]] = []

    def exception(self, event: str, **kw: Any) -> None:
        self.exceptions.append((event, kw))

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **kw: None


def _config_for(tmp_path: Path, tls_files: tuple[Path, Path], ports: list[int]) -> Any:
    write_config(tmp_path, {})
    t = f"{T}s"
    data = deep_merge(base_config(tls_files), {
        "routes": [{"domain": f"case{i}.test", "host": f"127.0.0.1:{p}", "tls": "none"} for i, p in enumerate(ports)],
        "delivery": {"connect_timeout": "2s", "greeting_timeout": t, "mail_timeout": t, "rcpt_timeout": t,
                     "data_init_timeout": t, "data_block_timeout": t, "data_done_timeout": t}})
    return parse_config(data, tmp_path / "mailrelayd.toml")


async def _fuzz(seed: int, tmp_path: Path, tls_files: tuple[Path, Path], log: _Log) -> None:
    """CASES random scripts and the named ones, all at once, each with its own server and route."""
    before = asyncio.all_tasks()
    rng = random.Random(seed)
    plans = [make_plan(rng) for _ in range(CASES)] + [plan for plan, _ in NAMED.values()]
    labels = [f"seed {seed} case {i}" for i in range(CASES)] + list(NAMED)
    servers = [Server(p) for p in plans]
    for s in servers:
        await s.start()
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    cfg = _config_for(tmp_path, tls_files, [s.port for s in servers])
    t = Transport(cfg, MxResolver(cfg.dns))
    messages = [(_message(rng, f"m1 case {i}"), _message(rng, f"m2 case {i}")) for i in range(len(plans))]

    async def attempt(i: int, tag: str, data: bytes) -> Outcome:
        rcpts = [f"{tag}r{j}@case{i}.test" for j in range(len(plans[i].rcpts))]
        t0 = time.monotonic()
        results = await t.deliver(f"case{i}.test", f"{tag}@example.com", rcpts, data)
        return Outcome(rcpts, data, results, time.monotonic() - t0)

    async def case(i: int) -> tuple[Outcome, Outcome]:
        first = await attempt(i, "m1", messages[i][0])
        return first, await attempt(i, "m2", messages[i][1])

    try:
        outcomes = await asyncio.gather(*(case(i) for i in range(len(plans))))
        await t.close()
    finally:
        for s in servers:
            await s.stop()
    for _ in range(3):
        await asyncio.sleep(0)
    left = asyncio.all_tasks() - before
    assert not left, f"tasks left pending: {left}"
    assert log.exceptions == [], log.exceptions
    assert loop_errors == [], loop_errors

    failed: list[str] = []
    for label, plan, server, (one, two) in zip(labels, plans, servers, outcomes, strict=True):
        where = f"{label}: {plan.describe()}"
        try:
            assert server.errors == [], server.errors
            _check(one, server.tx.get("m1"), "first message", exact=not plan.ambiguous)
            _check(two, server.tx.get("m2"), "second message", exact=not plan.ambiguous)
            # One reply timeout at most per attempt (a session fails at its first), plus trickled replies.
            assert one.seconds < T + 1.5 or plan.ambiguous, ("first message took", one.seconds)
            assert two.seconds < T + 1.5 or plan.ambiguous, ("second message took", two.seconds)
            if not plan.ambiguous:
                got = [Want(r.code, r.enhanced, r.remote_reply) for r in one.results]
                assert got == expect(plan), ("first message", got, "want", expect(plan))
                assert all(r.ok for r in two.results), ("second message", two.results)
        except AssertionError as e:
            failed.append(f"{where}\n    {e}")
    assert not failed, f"{len(failed)} of {len(plans)} cases failed:\n" + "\n".join(failed)


def _check(o: Outcome, tx: Tx | None, where: str, *, exact: bool) -> None:
    """The safety invariants, whatever the script; with ``exact``, which replies answered which
    command is known, and so is what the dot's reply decides."""
    assert [r.address for r in o.results] == o.rcpts, where
    for r in o.results:
        assert r.ok or r.temporary or r.permanent, (where, r)
        assert ENHANCED_RE.fullmatch(r.enhanced) and r.enhanced[0] == str(r.code)[0], (where, r)
        if r.ok:  # delivered: the server took the whole message intact and said 2xx after the dot
            assert tx is not None and tx.final is not None and 200 <= tx.final < 300, (where, r, tx)
            assert 200 <= tx.mail < 300 and 200 <= tx.rcpts.get(r.address, 0) < 300, (where, r, tx)
            assert tx.body == _normalised(o.data), (where, tx.body, o.data)
    if not exact or tx is None or tx.body is None or not 200 <= tx.mail < 300 or not tx.body:
        return
    accepted = [r for r in o.results if 200 <= tx.rcpts.get(r.address, 0) < 300]
    if tx.final is not None and tx.final >= 500:  # a 5xx to the dot is permanent for every accepted recipient
        assert all(r.code == tx.final for r in accepted), (where, o.results)
    elif tx.final is None or 400 <= tx.final < 500:  # a 4xx, or nothing, after the dot: deferred
        assert all(r.temporary for r in accepted), (where, o.results)


@pytest.mark.parametrize("loop", LOOPS)
def test_hostile_servers(loop: str, tmp_path: Path, tls_files: tuple[Path, Path],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    log = _Log()
    monkeypatch.setattr(transport_mod, "log", log)
    seed = SEED + 100 + LOOPS.index(loop)
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(asyncio.wait_for(_fuzz(seed, tmp_path, tls_files, log), 60))
