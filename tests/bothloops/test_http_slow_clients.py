"""Slow and stuck clients on the HTTP listeners (the API and the sidecar; mailrelayd/httpguard.py): a
request head that never ends, an idle keep-alive connection and a client that never reads its
responses are closed, over real sockets against an in-process daemon, while clients that are merely
slow (keep-alive with pauses, an upload within ``limits.data_timeout``, a handler waiting for the
spool) are served. Each test also shows the guard at work, so each fails without it.

Each test runs under asyncio's loop and under uvloop (this folder's conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TextIO

import pytest
import uvloop

import mailrelayd.daemon
from mailrelayd.api import ApiServer
from mailrelayd.sidecar import Sidecar
from mailrelayd.users import load_users, new_api_key, save_users
from tests.conftest import RunningDaemon

HEADER = 0.5  # header_timeout in these tests
WRITE = 0.25  # write_timeout; shorter than HEADER, so the two reasons can be told apart
SLACK = 3.0  # scheduling slack on a loaded machine
API = {"api": {"address": "127.0.0.1:0", "tls": False}}
API_TLS = {"api": {"address": "127.0.0.1:0", "tls": True}, "limits": {"tls_handshake_timeout": "1s"}}

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon builds its HTTP servers with the test's timeouts (a constructor argument each)."""
    for name, cls in (("ApiServer", ApiServer), ("Sidecar", Sidecar)):
        monkeypatch.setattr(mailrelayd.daemon, name, functools.partial(cls, header_timeout=HEADER,
                                                                       write_timeout=WRITE))


async def with_api(start_daemon: Callable[..., Awaitable[RunningDaemon]], overrides: dict[str, Any]) -> RunningDaemon:
    """start_daemon, then the API (started after the sidecar, which is all start_daemon waits for)."""
    d = await start_daemon(overrides)
    for _ in range(500):
        if d.daemon.api is not None and d.daemon.api.bound:
            return d
        await asyncio.sleep(0.01)
    raise AssertionError("the API did not start")


@pytest.fixture
async def daemon(start_daemon: Callable[..., Awaitable[RunningDaemon]], short_timeouts: None,
                 request: pytest.FixtureRequest) -> RunningDaemon:
    """A daemon with the API (plain HTTP) and the sidecar; its log also kept for :func:`aborts`."""
    d = await with_api(start_daemon, API)
    d.daemon.log_stream.stream = Tee(d.daemon.log_stream.stream)
    # The loop is the one the test's id names (conftest.py's factories).
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == ("[uvloop" in request.node.name)
    return d


def api_port(d: RunningDaemon) -> int:
    assert d.daemon.api is not None and d.daemon.api.bound is not None
    return int(d.daemon.api.bound[1])


def port_of(d: RunningDaemon, listener: str) -> int:
    return d.http_port if listener == "sidecar" else api_port(d)


# --- a raw HTTP/1.1 client ------------------------------------------------------------------
class Conn:
    """One connection on asyncio streams: exactly the bytes we mean, and what the server does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=tls))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, bytes]:
        """(status, body) of the next response (Content-Length framed: all ours are)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length")
        return int(lines[0].split()[1]), await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def get(self, path: str) -> tuple[int, bytes]:
        await self.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await self.response()

    async def closed_within(self, limit: float) -> float:
        """Seconds until the server closes (EOF or reset); fails if it is still open after ``limit``."""
        return await closed_within(self.reader.read, limit)

    def close(self) -> None:
        self.writer.close()


async def closed_within(read: Callable[[int], Awaitable[bytes]], limit: float) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with asyncio.timeout(limit):
            while await read(65536):
                pass
    except (ConnectionError, ssl.SSLError):  # the abort's reset
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {limit:g} s")
    return loop.time() - t0


@contextlib.asynccontextmanager
async def raw_socket(port: int, rcvbuf: int | None = None) -> AsyncIterator[socket.socket]:
    """A non-blocking socket (a small receive buffer makes a non-reader's backlog reach the server)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        yield sock
    finally:
        sock.close()


async def pipeline_and_never_read(sock: socket.socket, path: str = "/metrics", count: int = 1000) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * count)


class Tee(io.StringIO):
    """The daemon's log stream, kept for the test as well."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


async def aborts(d: RunningDaemon) -> list[dict[str, Any]]:
    """The daemon's ``http.connection_aborted`` log lines so far."""
    await asyncio.sleep(0.1)  # the daemon writes its log up to 10 ms late
    stream = d.daemon.log_stream.stream
    assert isinstance(stream, Tee)
    out = []
    for line in stream.getvalue().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "http.connection_aborted":
                out.append(event)
    return out


async def with_api_key(d: RunningDaemon, user: str = "alice") -> str:
    """A key for ``user``, taken by a reload (start_daemon writes users.toml without keys)."""
    path = d.config.parent / "users.toml"
    users = load_users(path)
    key, stored = new_api_key()
    users[user] = dataclasses.replace(users[user], api_keys=(stored,))
    save_users(path, users)
    assert await d.daemon.reload()
    return key


# --- closed ---------------------------------------------------------------------------------
@pytest.mark.parametrize("listener", ["sidecar", "api"])
async def test_a_head_that_never_ends_is_closed(daemon: RunningDaemon, listener: str) -> None:
    """Slowloris: a request line and one header, then nothing (and then a byte now and then, which
    must not buy more time): aborted ``header_timeout`` after the connection, and logged without
    anything of the request."""
    c = await Conn.open(port_of(daemon, listener))
    await c.send(b"GET /v1/messages?secret=hunter2 HTTP/1.1\r\nHost: x\r\n")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(3):
        await asyncio.sleep(HEADER / 4)
        await c.send(b"X")
    await c.closed_within(HEADER + SLACK)
    assert HEADER - 0.15 < loop.time() - t0 < HEADER + SLACK
    c.close()
    (event,) = await aborts(daemon)
    assert event["reason"] == "header_timeout" and event["peer"] == "127.0.0.1", event
    assert event["listener"] == ("http" if listener == "sidecar" else "api")
    assert "hunter2" not in json.dumps(event) and "/v1/messages" not in json.dumps(event)


async def test_a_head_that_never_ends_over_tls_is_closed(start_daemon: Any, short_timeouts: None,
                                                         client_tls: ssl.SSLContext) -> None:
    """The same after the TLS handshake on the TLS API; and a client that never starts the handshake
    is closed after ``limits.tls_handshake_timeout`` (asyncio's default would be 60 s)."""
    d = await with_api(start_daemon, API_TLS)
    c = await Conn.open(api_port(d), tls=client_tls)
    await c.send(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
    assert HEADER - 0.15 < await c.closed_within(HEADER + SLACK) < HEADER + SLACK
    c.close()
    silent = await Conn.open(api_port(d))  # plain TCP: no ClientHello ever comes
    assert await silent.closed_within(1.0 + SLACK) > 0.7
    silent.close()


@pytest.mark.parametrize("listener", ["sidecar", "api"])
async def test_an_idle_keepalive_connection_is_closed(daemon: RunningDaemon, listener: str) -> None:
    """After a complete exchange (/health on the sidecar, an unauthenticated POST on the API: 401) the
    connection stays open for keep-alive, and is closed once idle for ``header_timeout``."""
    c = await Conn.open(port_of(daemon, listener))
    if listener == "sidecar":
        assert (await c.get("/health"))[0] == 200
    else:
        await c.send(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert (await c.response())[0] == 401
    assert HEADER - 0.15 < await c.closed_within(HEADER + SLACK) < HEADER + SLACK
    c.close()
    assert [e["reason"] for e in await aborts(daemon)] == ["header_timeout"]


async def test_a_client_that_never_reads_is_closed(daemon: RunningDaemon) -> None:
    """Many pipelined GET /metrics and never a byte read: once the responses back up to the server,
    its writing pauses, and ``write_timeout`` later the connection is aborted, well before it has
    answered them all."""
    async with raw_socket(daemon.http_port, rcvbuf=4096) as sock:
        await pipeline_and_never_read(sock)
        for _ in range(100):  # nothing read meanwhile: until the responses back up and the guard acts
            if await aborts(daemon):
                break
        loop = asyncio.get_running_loop()
        got = bytearray()

        async def read(n: int) -> bytes:
            data = await loop.sock_recv(sock, n)
            got.extend(data)
            return data

        assert await closed_within(read, 5.0) < 5.0
        assert got.count(b"HTTP/1.1 200 OK") < 1000
    assert [e["reason"] for e in await aborts(daemon)] == ["write_timeout"]


# --- served ---------------------------------------------------------------------------------
async def test_keepalive_requests_with_pauses_are_served(daemon: RunningDaemon) -> None:
    """Requests on one connection with pauses shorter than ``header_timeout`` between them, longer than
    it in all: each response restarts the clock. Then idle: closed ``header_timeout`` after the last."""
    c = await Conn.open(daemon.http_port)
    for path in ("/health", "/metrics", "/health"):
        status, body = await c.get(path)
        assert status == 200 and body, path
        await asyncio.sleep(HEADER * 0.6)
    # The last pause was idle time already: what is left of header_timeout follows.
    assert HEADER * 0.4 - 0.15 < await c.closed_within(HEADER + SLACK) < HEADER * 0.4 + SLACK
    c.close()


async def test_a_slow_upload_and_a_slow_commit_are_not_idle(daemon: RunningDaemon,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 MB message/rfc822 upload sent steadily over longer than ``header_timeout`` (and
    ``write_timeout``), within ``limits.data_timeout``, and a spool commit that takes longer than
    ``header_timeout`` as well: 202. The connection is closed once idle afterwards."""
    key = await with_api_key(daemon)
    submitter = daemon.daemon.api.context.submitter
    submit = submitter.submit

    async def slow_submit(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(HEADER * 1.5)
        return await submit(*args, **kwargs)

    monkeypatch.setattr(submitter, "submit", slow_submit)
    body = b"From: app@example.com\r\nTo: big@dest.test\r\nSubject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2000
    c = await Conn.open(api_port(daemon))
    await c.send(f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: message/rfc822\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    chunks = 20
    step = len(body) // chunks + 1
    for i in range(0, len(body), step):
        await c.send(body[i:i + step])
        await asyncio.sleep(HEADER * 2 / chunks)  # twice header_timeout in all
    status, answer = await c.response()
    assert status == 202, answer
    assert json.loads(answer)["queue_id"]
    assert HEADER - 0.15 < await c.closed_within(HEADER + SLACK) < HEADER + SLACK
    c.close()


# --- shutdown -------------------------------------------------------------------------------
async def test_shutdown_with_stuck_clients_is_prompt(start_daemon: Any) -> None:
    """Default timeouts (none fires here): a slowloris client on each listener, an idle keep-alive
    connection and a client that never reads on the sidecar. Stop completes promptly (aiohttp would
    wait its shutdown_timeout, 60 s on the sidecar, for the handler blocked on the non-reader) and
    every connection is closed."""
    d = await with_api(start_daemon, API)
    loris = [await Conn.open(port) for port in (d.http_port, api_port(d))]
    for c in loris:
        await c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    idle = await Conn.open(d.http_port)
    assert (await idle.get("/health"))[0] == 200
    loop = asyncio.get_running_loop()
    async with raw_socket(d.http_port, rcvbuf=4096) as sock:
        await pipeline_and_never_read(sock)
        await asyncio.sleep(0.5)  # the responses back up
        t0 = loop.time()
        assert await d.stop() == 0
        assert loop.time() - t0 < 8.0
        for c in (*loris, idle):
            await c.closed_within(2.0)
            c.close()
        await closed_within(functools.partial(loop.sock_recv, sock), 5.0)
