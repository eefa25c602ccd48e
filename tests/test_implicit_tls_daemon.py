"""Implicit TLS (465) in the real daemon process, under uvloop.

uvloop starts reading a new connection only after connection_made() returns, so a client that sends
its ClientHello at once could have it land in the plaintext buffer, and the handshake then hung until
its timeout (68 of 100 connections before the fix). In-process tests run on asyncio's loop and cannot
see this; this one uses the subprocess daemon."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path

from tests.conftest import TEST_PASSWORD, base_config, write_config
from tests.support.proc import DaemonProcess


def test_implicit_tls_handshake_never_hangs(tmp_path: Path, tls_files, client_tls: ssl.SSLContext) -> None:
    d = DaemonProcess(write_config(tmp_path, base_config(tls_files))).wait_ready()

    async def one(i: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", d.ports["submissions"], ssl=client_tls,
                                             ssl_handshake_timeout=5)
        try:
            assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"220 ")
            if i % 10 == 0:  # and the session works after it
                w.write(b"EHLO client.test.example\r\n")
                while not (line := await asyncio.wait_for(r.readline(), 5)).startswith(b"250 "):
                    assert line.startswith(b"250-")
                w.write(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()) + b"\r\n")
                assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"235 ")
        finally:
            w.close()

    async def run() -> None:
        for i in range(60):
            await one(i)
        await asyncio.gather(*(one(i) for i in range(1, 20)))

    try:
        asyncio.run(run())
    finally:
        assert d.stop() == 0
