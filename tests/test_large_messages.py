"""Fewer copies of a message on its way to the spool (issue 11: peak RSS growth <= 2x the bytes in
flight), and not a byte different: the DATA reader, the header assembly, the intake with and without
DKIM, the spool's blob I/O for large bodies, and the memory budget held until the commit is done."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from mailrelayd.config import Config, load_config
from mailrelayd.errors import Reply
from mailrelayd.intake import Intake, Origin
from mailrelayd.malloc import fix_mmap_threshold
from mailrelayd.smtp import headers as hdr
from mailrelayd.smtp.dataread import BARE_CR_LF, DotReader, MemoryBudget, _longest_line
from mailrelayd.smtp.policy import Policy
from mailrelayd.smtp.protocol import MessageReceived
from mailrelayd.spool.store import BLOB_IO_MIN, NewMessage, Spool
from mailrelayd.users import User
from tests.conftest import base_config, write_config
from tests.test_smtp_protocol import Harness

ALICE = User("alice", "x", ("@example.com",))
BIG = (b"line of text\r\n..stuffed\r\n" * (BLOB_IO_MIN // 20))  # > 1 MB, dot-stuffed lines on the wire

SHAPES = {
    "normal": b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n",
    "no header block": b"just a body line\r\nand another\r\n",
    "header only": b"From: a@example.com\r\nSubject: s\r\n",
    "empty": b"",
    "stuffed first line": b"..dot first\r\n",
    "large": b"From: a@example.com\r\n\r\n" + BIG,
}


def old_body(wire: bytes) -> bytes:
    """The DATA reader's result before this change: the reference."""
    buf = b"\r\n" + wire
    return buf[:buf.find(b"\r\n.\r\n") + 5][:-3].replace(b"\r\n.", b"\r\n")[2:]


def stuff(body: bytes) -> bytes:
    """What a client sends for ``body`` (RFC 5321 §4.5.2), with the terminator."""
    wire = b"\r\n" + body
    return wire.replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def read(wire: bytes, chunk: int = 65536, max_size: int = 30 << 20, max_line: int = 1000,
         budget: MemoryBudget | None = None) -> tuple[bytes | None, Reply | None]:
    r = DotReader(max_size, max_line, budget)
    for i in range(0, len(wire), chunk):
        used = r.feed(wire[i:i + chunk])
        if used is not None:
            break
    return r.result()


@pytest.mark.parametrize("name", SHAPES)
def test_dot_reader_same_bytes_as_before(name: str) -> None:
    body = SHAPES[name]
    wire = stuff(body)
    got, problem = read(wire)
    assert problem is None and got == body == old_body(wire)
    assert type(got) is bytes


def test_dot_reader_hands_the_body_over_once() -> None:
    r = DotReader(1000, 1000)
    assert r.feed(b"x\r\n.\r\n") == 6
    assert r.result() == (b"x\r\n", None)
    with pytest.raises(RuntimeError):
        r.result()
    bad = DotReader(1000, 1000)
    bad.feed(b"a\nb\r\n.\r\n")
    assert bad.result() == (None, BARE_CR_LF) == bad.result()  # a refusal can be asked for again


@pytest.mark.parametrize("offset", [-3, -2, -1, 0, 1, 2])
def test_line_limit_across_the_scan_windows(offset: int) -> None:
    """The longest-line check works in 1 MB windows: a line at the limit that straddles a window
    boundary (or has its CRLF split by it) is judged exactly as a whole-buffer split would."""
    max_line = 1000
    head = b"x" * 78 + b"\r\n"
    filler = head * ((1 << 20) // len(head))
    # The long line starts so that the window edge (at 1 MB of the reader's buffer) falls inside it
    # or on its CRLF.
    pad = (1 << 20) - 2 - len(filler) - (max_line - 2) + offset
    filler += b"y" * max(pad, 0) + b"\r\n" if pad > 0 else b""
    # max_line octets with the CRLF: max_line - 2 before it.
    ok = filler + b"z" * (max_line - 2) + b"\r\n" + head
    too_long = filler + b"z" * (max_line - 1) + b"\r\n" + head
    assert read(stuff(ok), max_line=max_line) == (ok, None)
    got, problem = read(stuff(too_long), max_line=max_line)
    assert got is None and problem is not None and problem.code == 500


@pytest.mark.parametrize("stuffed", [False, True])
def test_line_limit_is_the_messages_own_lines_with_crlf(stuffed: bool) -> None:
    # RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF; a stuffed dot is the transport's, not the line's.
    lead = b"." if stuffed else b"z"
    assert read(stuff(b"a\r\n" + lead + b"z" * 997 + b"\r\n")) == (b"a\r\n" + lead + b"z" * 997 + b"\r\n", None)
    got, problem = read(stuff(b"a\r\n" + lead + b"z" * 998 + b"\r\n"))
    assert got is None and problem is not None and problem.code == 500


def test_longest_line_matches_a_full_split() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        parts = [bytes(rng.choice(b"ab.\r\n") for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(1, 8))]
        wire = bytearray(b"\r\n".join(parts))
        for window in (1, 2, 3, 5, 64):
            assert _longest_line(wire, window) == max(map(len, wire.split(b"\r\n")))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("fields", [b"", b"Date: x\r\nMessage-ID: <y@z>\r\n"])
def test_assemble_is_trace_plus_insert_fields(name: str, fields: bytes) -> None:
    body = SHAPES[name]
    scan = hdr.scan_headers(body)
    trace = b"Received: from c\r\n\tby r; now\r\n"
    got = hdr.assemble(trace, body, scan, fields)
    assert got == trace + hdr.insert_fields(body, scan, fields)
    assert type(got) is bytes


# --- through the intake into the spool ------------------------------------------------------
def split_trace(data: bytes) -> tuple[bytes, bytes]:
    """(our Received field, the rest)."""
    assert data.startswith(b"Received: ")
    i = 0
    while True:
        i = data.index(b"\r\n", i) + 2
        if data[i:i + 1] not in (b" ", b"\t"):
            return data[:i], data[i:]


@pytest.fixture
def cfg(tmp_path: Path, tls_files: tuple[Path, Path]) -> Config:
    return load_config(write_config(tmp_path / "cfg", base_config(tls_files)))


ORIGIN = Origin(listener="submission", peer_ip="192.0.2.7", helo="client.example", protocol="ESMTPSA",
                tls="using TLSv1.3", user=ALICE)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("outbound", [False, True], ids=["inbound", "outbound"])
@pytest.mark.parametrize("name", [n for n in SHAPES if n != "empty"])
async def test_stored_bytes(cfg: Config, tmp_path: Path, name: str, outbound: bool, signed: bool) -> None:
    body = SHAPES[name]
    spool = Spool(tmp_path / "spool")
    await spool.open()
    accepted: list[NewMessage] = []
    seen: list[bytes] = []

    async def signer(data: bytes, domain: str) -> bytes:
        seen.append(data)
        return b"DKIM-Signature: v=1; d=example.com; b=test\r\n"

    policy = Policy(cfg, cfg.listeners[1], lambda a: False)
    intake = Intake(cfg, check_headers=policy.check_headers, signer=signer if signed else None, spool=spool,
                    on_accepted=accepted.append)
    try:
        qid = await intake.accept(ORIGIN, "a@example.com", ["r@example.net"], body, outbound=outbound)
        stored = await spool.body(qid)
    finally:
        await spool.close()
    assert stored is not None and accepted[0].data == stored
    if signed and outbound:
        sig, _, unsigned = stored.partition(b"\r\n")
        assert sig == b"DKIM-Signature: v=1; d=example.com; b=test" and seen == [unsigned]
    else:
        unsigned = stored
        assert seen == []
    trace, rest = split_trace(unsigned)
    assert qid.encode() in trace
    scan = hdr.scan_headers(body)
    no_header_block = scan.needs_separator and scan.end == 0
    assert no_header_block == (name in ("no header block", "stuffed first line"))
    if not outbound:
        # Inbound mail gets the trace field only (and the blank line a message without header needs).
        assert rest == (b"\r\n" + body if no_header_block else body)
        return
    if no_header_block:
        # Headers first, then a blank line, then the body (issue 11).
        head, _, tail = rest.partition(b"\r\n\r\n")
        assert tail == body and head.startswith(b"From: <a@example.com>\r\nMessage-ID: <")
        assert b"\r\nDate: " in head
    elif name == "header only":
        assert rest.startswith(body) and rest[len(body):].startswith(b"Message-ID: <")
        assert rest.endswith(b"\r\n") and b"\r\n\r\n" not in rest
    else:
        head, _, tail = body.partition(b"\r\n\r\n")
        assert rest.startswith(head + b"\r\nMessage-ID: <") and rest.endswith(b"\r\n\r\n" + tail)


async def test_spool_body_round_trip_around_the_blob_threshold(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        sizes = [0, 1, BLOB_IO_MIN - 1, BLOB_IO_MIN, BLOB_IO_MIN + 1, 3 * BLOB_IO_MIN + 12345]
        bodies = {}
        for n in sizes:
            data = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
            msg = NewMessage(spool.new_queue_id(), "a@example.com", ("r@example.net",), data, 0.0)
            await spool.commit(msg)
            bodies[msg.queue_id] = data
        for qid, data in bodies.items():
            got = await spool.body(qid)
            assert got == data and type(got) is bytes
        assert await spool.body("no-such-id") is None
    finally:
        await spool.close()


# --- the memory budget ----------------------------------------------------------------------
def test_budget_held_until_the_commit_has_finished(cfg: Config) -> None:
    """The DATA reader's reservation is not given back when the payload is complete but when the
    edge reports the commit's outcome (Intake.submit's on_done, the intake task's last step): the
    copies made for the commit live until then."""
    budget = MemoryBudget(1 << 20)
    h = Harness(cfg, budget=budget)
    h.cmd("EHLO c.example")
    assert h.cmd("MAIL FROM:<a@example.com>").startswith("250")
    assert h.cmd("RCPT TO:<b@example.net>").startswith("250")
    assert h.cmd("DATA").startswith("354")
    assert h.send(b"x" * 98 + b"\r\n") == []
    assert h.send(b"y" * 98 + b"\r\n" * 2 + b".\r\n") == []
    assert [type(e) for e in h.events] == [MessageReceived]
    assert budget.used == 205
    h.events = []
    # Meanwhile a new DATA elsewhere sees the bytes still taken.
    assert not budget.admits(budget.limit - 200)
    h.p.message_result(Reply(250, "2.0.0", "Ok: queued as X"))
    assert budget.used == 0
    assert h.out()[-1].startswith("250 2.0.0")


# --- glibc's mmap threshold -------------------------------------------------------------------
def test_mmap_threshold_fixed_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert fix_mmap_threshold() is False  # the administrator's setting stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except ValueError:
        glibc = False
    assert fix_mmap_threshold() is glibc
