"""Promise 1 under kill -9: every message that got a 250 is in the spool after the crash, intact,
and nothing half-written survives."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from mailrelayd.spool.store import Spool
from tests.conftest import base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess
from tests.support.smtptalk import SmtpTalk

CLIENTS = 8


def _message(client: int, n: int) -> bytes:
    payload = f"client {client} message {n} ".encode() * 40
    digest = hashlib.sha256(payload).hexdigest()
    return (f"From: load@example.com\r\nSubject: burst {client}/{n}\r\nX-Digest: {digest}\r\n\r\n").encode() + \
        payload + b"\r\nEND-OF-MESSAGE\r\n"


async def _burst(port: int, acked: dict[str, bytes], stop: asyncio.Event) -> None:
    async def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                t = await SmtpTalk.connect(port)
                await t.ehlo()
                await t.cmd("MAIL FROM:<load@example.com>")
                await t.cmd(f"RCPT TO:<rcpt{i}@unreachable.example>")
                await t.cmd("DATA")
                msg = _message(i, n)
                code, text = await t.cmd(msg + b".")
                if code == 250:
                    acked[text.rsplit(" ", 1)[1]] = msg
                n += 1
                await t.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError, AssertionError):
                return  # the daemon died under us: expected

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


def test_kill9_mid_burst_loses_nothing_acknowledged(tmp_path: Path, tls_files) -> None:
    # Deliveries go to a closed port, so everything stays queued (deferred) for inspection.
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
        "routes": [{"domain": "*", "host": "127.0.0.1:9"}], "delivery": {"retry_initial": "1h", "retry_max": "2h"}}))
    d = DaemonProcess(cfg).wait_ready()
    acked: dict[str, bytes] = {}

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(_burst(d.ports["relay"], acked, stop))
        deadline = time.monotonic() + 20
        while len(acked) < 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        d.kill9()  # mid-burst: sessions are in every state, DATA included
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert len(acked) >= 150, "the burst was too slow to test anything"

    async def inspect() -> tuple[set[str], int]:
        spool = Spool(tmp_path / "spool")
        await spool.open()
        try:
            msgs = await spool.list_messages(limit=100_000)
            ids = {m.queue_id for m in msgs}
            for qid, sent in acked.items():
                body = await spool.body(qid)
                assert body is not None, f"acknowledged {qid} lost"
                assert body.endswith(sent.split(b"\r\n\r\n", 1)[1]), f"{qid} damaged"
            # Nothing half-written: every spooled message is complete.
            for m in msgs:
                body = await spool.body(m.queue_id)
                assert body is not None and body.endswith(b"END-OF-MESSAGE\r\n")
                assert len(m.recipients) == 1 and m.recipients[0].state in ("pending", "deferred")
            return ids, len(msgs)
        finally:
            await spool.close()

    ids, n = asyncio.run(inspect())
    assert set(acked) <= ids
    # A commit whose 250 was lost in the crash is the only kind of extra (RFC 1047): at most one per client.
    assert n - len(acked) <= CLIENTS

    # After restart, the scheduler picks every one of them up again.
    d2 = DaemonProcess(cfg).wait_ready()
    try:
        ev = d2.wait_event("scheduler.started")
        assert ev["queued"] == n
    finally:
        assert d2.stop() == 0
