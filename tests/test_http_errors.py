"""What the HTTP listeners answer and log for requests that never reach a handler: the API's router
errors are JSON and counted like its other errors, and malformed requests (refused by aiohttp's parser)
or clients gone mid-request are one INFO/DEBUG line, not an ERROR with a traceback, on the API and the
sidecar alike."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
from typing import Any, TextIO

import aiohttp
from prometheus_client import REGISTRY

from tests.test_api import _daemon_with_key

API = {"api": {"address": "127.0.0.1:0", "tls": False}}


def _count(status: str) -> float:
    return REGISTRY.get_sample_value("mailrelayd_api_requests_total", {"status": status}) or 0.0


async def test_router_errors_are_json_and_counted(start_daemon, tmp_path, tls_files) -> None:
    d, _, url = await _daemon_with_key(start_daemon, tmp_path, tls_files, API)
    base = url.removesuffix("/v1/messages")
    try:
        before = {s: _count(s) for s in ("404", "405")}
        async with aiohttp.ClientSession() as http:
            for method, path, status in (("GET", "/v1/messages", 405), ("PUT", "/v1/messages", 405),
                                         ("GET", "/", 404), ("POST", "/v1/messages/x", 404),
                                         ("POST", "/v2/messages", 404)):
                async with http.request(method, base + path, json={}) as r:
                    assert (r.status, r.content_type) == (status, "application/json"), (method, path)
                    err = (await r.json())["error"]
                    assert set(err) == {"code", "enhanced", "message"} and err["enhanced"] == "5.5.1", err
                    if status == 405:
                        assert "POST" in r.headers["Allow"]
        assert {s: _count(s) - before[s] for s in before} == {"404": 3, "405": 2}
    finally:
        await d.stop()


class Tee(io.StringIO):
    """The daemon's log stream, kept for the test as well."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


MALFORMED = [
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    b"POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"s" * 9000 + b"\r\n\r\n",
]


async def _send(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), 5)  # aiohttp closes after a parser error
    finally:
        writer.close()


async def _reset_mid_body(port: int, key: str) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"from\"")
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler is reading the body
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    writer.transport.abort()


async def test_malformed_requests_are_not_errors_in_the_log(start_daemon, tmp_path, tls_files) -> None:
    d, key, _ = await _daemon_with_key(start_daemon, tmp_path, tls_files, API)
    try:
        d.daemon.log_stream.stream = tee = Tee(d.daemon.log_stream.stream)
        for port in (d.daemon.api.bound[1], d.http_port):
            for raw in MALFORMED:
                status_line = (await _send(port, raw)).split(b"\r\n", 1)[0]
                assert status_line.endswith(b" 400 Bad Request"), (port, raw[:60], status_line)
        await _reset_mid_body(d.daemon.api.bound[1], key)
        await asyncio.sleep(0.3)  # the daemon writes its log up to 10 ms late
        events: list[dict[str, Any]] = []
        for line in tee.getvalue().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        server = [e for e in events if e.get("logger") == "aiohttp.server"]
        assert [e for e in server if e["level"] != "info"] == [], server
        assert len(server) == 2 * len(MALFORMED), server  # one line each; the reset is DEBUG
        for e in server:
            assert "exception" not in e and "exc_info" not in e, e
            assert e["event"].startswith("Error handling request from 127.0.0.1: "), e
        assert "s" * 20 not in tee.getvalue()  # nor any of the request's bytes (an Authorization header)
    finally:
        await d.stop()
