"""DKIM signing in a helper process, so that signing does not hold the event loop's GIL.

Signing a 2 KB message with RSA-2048 and Ed25519 costs about 1.5 ms of CPU, against about 2.5 ms
for everything else the daemon does with a message. In a thread it would not help: OpenSSL releases
the GIL for the key operation, but dkimpy's header work holds it, and every hand-over between the
signing thread and the busy event loop costs both (measured: a signing thread took as much of the
loop's time as signing inline). A helper process has its own interpreter and runs on another core.

The parent (:class:`SignWorker`) writes requests to the helper's stdin and reads results from its
stdout, framed below; the helper (:func:`main`, ``python -m mailrelayd.signworker``) builds the same
:class:`~mailrelayd.dkim.DkimSigner` from the same key files and runs :meth:`DkimSigner.compute`.
The parent counts and logs each result (:meth:`DkimSigner.record`), so metrics and logs are the
daemon's own.

Nothing depends on the helper: until it is ready, after it exits, when a request waits longer than
``timeout``, and for messages over ``max_size``, the message is signed in the daemon as before. A
helper that exits is started again after a pause. The helper ignores SIGINT and SIGTERM (a Ctrl-C
in a terminal reaches the whole process group while the daemon still signs the mail it is
finishing) and exits when its stdin closes, which includes the daemon's death, even by SIGKILL.

Frames (little-endian): request ``id u32, now i64 (-1: the current time), length u32, message``;
response ``id u32, meta length u32, headers length u32, meta (JSON), headers``. The first line
the parent writes is the signer's configuration, as JSON; the helper answers it with a response
of id 0 once its keys are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import structlog

from mailrelayd.dkim import INLINE_SIGN_MAX_BYTES, DkimKeyError, DkimKeySpec, DkimSigner, SignResult, load_keys

__all__ = ["SignWorker", "SignerSpec", "main"]

_log = structlog.get_logger()

_REQUEST = struct.Struct("<IqI")
_RESPONSE = struct.Struct("<III")
_READY = 0
#: Pauses before starting an exited helper again: 1 s, doubling up to a minute.
_RESTART_MIN, _RESTART_MAX = 1.0, 60.0


@dataclass(frozen=True)
class SignerSpec:
    """What the helper needs to build the daemon's signer: plain values, sent as JSON."""

    keys: tuple[tuple[str, str, str, str], ...]  # domain, selector, key file, algorithm
    headers: tuple[str, ...]
    parent_domains: bool
    expire: float | None
    public_keys: tuple[str, ...] = ()
    """The ``p=`` values of the keys the daemon loaded, in order (empty: not checked). A helper
    started again after its key files changed without a successful reload must not sign with them."""

    @classmethod
    def of(cls, specs: Sequence[DkimKeySpec], headers: Sequence[str], parent_domains: bool,
           expire: float | None, public_keys: Sequence[str] = ()) -> SignerSpec:
        return cls(tuple((s.domain, s.selector, str(s.key_file), s.algorithm) for s in specs), tuple(headers),
                   parent_domains, expire, tuple(public_keys))

    def build(self) -> DkimSigner:
        """Raises DkimKeyError for a key file that cannot be used, or holds another key than the daemon's."""
        keys = load_keys([DkimKeySpec(d, s, Path(f), a) for d, s, f, a in self.keys])
        if self.public_keys and tuple(k.public_key_b64 for k in keys) != self.public_keys:
            raise DkimKeyError("a key file changed since the daemon loaded it; the daemon signs with the "
                               "keys it loaded until a reload succeeds")
        return DkimSigner(keys, headers=self.headers, parent_domains=self.parent_domains, expire=self.expire)


class _Gone(Exception):
    """The helper exited, timed out or is not running: sign in the daemon."""


class _Pipes(asyncio.SubprocessProtocol):
    """The parent's end of the helper's pipes: parses response frames as they arrive."""

    def __init__(self, owner: SignWorker) -> None:
        self.owner = owner
        self.buf = bytearray()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        self.buf += data
        buf = self.buf
        while len(buf) >= _RESPONSE.size:
            rid, meta_len, hdr_len = _RESPONSE.unpack_from(buf)
            end = _RESPONSE.size + meta_len + hdr_len
            if len(buf) < end:
                break
            meta = bytes(buf[_RESPONSE.size:_RESPONSE.size + meta_len])
            headers = bytes(buf[_RESPONSE.size + meta_len:end])
            del buf[:end]
            try:
                self.owner.answered(rid, meta, headers)
            except Exception:  # a frame we cannot read: stop trusting this helper
                _log.exception("dkim.worker_bad_frame")
                self.owner.replace()
                return

    def process_exited(self) -> None:
        self.owner.exited(self)


class SignWorker:
    """Signs through a helper process (see the module docstring); one per signer, rebuilt on reload.

    ``sign()`` returns what :meth:`DkimSigner.sign` would, and has counted it the same way.
    """

    def __init__(self, signer: DkimSigner, spec: SignerSpec, *, timeout: float = 5.0,
                 max_size: int = INLINE_SIGN_MAX_BYTES, command: Sequence[str] | None = None) -> None:
        self.signer = signer
        self.spec = spec
        self.timeout = timeout
        self.max_size = max_size
        self.command = list(command or [sys.executable, "-m", "mailrelayd.signworker"])
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._protocol: _Pipes | None = None
        self._pending: dict[int, tuple[asyncio.Future[SignResult], float]] = {}
        self._next_id = _READY
        self._ready = False
        self._closed = False
        self._restart_delay = _RESTART_MIN
        self._watchdog: asyncio.TimerHandle | None = None
        self._starting: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True while requests go to the helper."""
        return self._ready

    @property
    def pid(self) -> int | None:
        """The helper's process id while it runs."""
        return self._transport.get_pid() if self._transport is not None else None

    def start(self) -> None:
        """Start the helper in the background; until it is ready, messages are signed in the daemon."""
        if self._closed or self._starting is not None:
            return
        self._starting = asyncio.get_running_loop().create_task(self._spawn())

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Pipes(self), *self.command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=None)
        except Exception as e:  # OSError, or a loop without subprocess support: sign in the daemon
            _log.error("dkim.worker_start_failed", error=f"{e.__class__.__name__}: {e}")
            self._starting = None
            self._schedule_restart()
            return
        if self._closed:
            transport.close()
            return
        self._transport, self._protocol = transport, protocol
        # uvloop's pipe transports do not subclass asyncio's, but have the same methods.
        stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
        self._stdin = stdin
        stdin.write(json.dumps(asdict(self.spec)).encode() + b"\n")
        self._starting = None
        self._arm_watchdog()

    async def sign(self, message: bytes, *, now: int | None = None) -> SignResult:
        """:meth:`DkimSigner.sign_async`, in the helper when it is ready (``now``: as there)."""
        if self._ready and len(message) <= self.max_size and self._stdin is not None:
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            rid = self._next_id
            fut: asyncio.Future[SignResult] = asyncio.get_running_loop().create_future()
            self._pending[rid] = (fut, time.monotonic())
            self._stdin.write(_REQUEST.pack(rid, -1 if now is None else now, len(message)) + message)
            try:
                result = await fut
            except _Gone:
                pass
            else:
                self.signer.record(result, len(message))
                return result
        return await self.signer.sign_async(message, now=now)

    def answered(self, rid: int, meta: bytes, headers: bytes) -> None:
        if rid == _READY:
            self._ready = True
            self._restart_delay = _RESTART_MIN
            _log.info("dkim.worker_ready", pid=self.pid)
            return
        entry = self._pending.pop(rid, None)
        if entry is None or entry[0].done():
            return
        try:
            fields: dict[str, Any] = json.loads(meta)
            for name in ("algorithms", "signed_by", "failed_by"):
                fields[name] = tuple(fields[name])
            result = SignResult(headers=headers, **fields)
        except Exception:
            entry[0].set_exception(_Gone())  # this one is signed in the daemon
            raise
        entry[0].set_result(result)

    def exited(self, protocol: _Pipes) -> None:
        if protocol is not self._protocol:
            return
        code = self._transport.get_returncode() if self._transport else None
        self._drop()
        if not self._closed:
            _log.error("dkim.worker_exited", returncode=code)
            self._schedule_restart()

    def _drop(self) -> None:
        """Forget the helper; whatever waits for it signs in the daemon."""
        self._ready = False
        if self._transport is not None:
            self._transport.close()
        self._transport = self._stdin = self._protocol = None
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(_Gone())

    def _schedule_restart(self) -> None:
        if self._closed:
            return
        delay, self._restart_delay = self._restart_delay, min(self._restart_delay * 2, _RESTART_MAX)
        asyncio.get_running_loop().call_later(delay, self.start)

    def _arm_watchdog(self) -> None:
        # One timer for all requests, not one per message: checks the oldest every timeout / 4.
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout / 4, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self._transport is None:
            return
        oldest = min((t for _, t in self._pending.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > self.timeout:
            _log.error("dkim.worker_timeout", waiting=len(self._pending), timeout=self.timeout)
            self.replace()
            return
        self._arm_watchdog()

    def replace(self) -> None:
        """Kill the helper and start another after a pause; whatever waits for it signs in the daemon."""
        transport = self._transport
        if transport is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it may have exited just now
            transport.kill()
        self._drop()
        self._schedule_restart()

    def close(self) -> None:
        """Stop using the helper; it exits when its stdin closes. Requests in flight sign in the daemon."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._starting is not None:
            self._starting.cancel()
        self._drop()


# --- the helper process ----------------------------------------------------------------------


def _read_exactly(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def main() -> int:
    """``python -m mailrelayd.signworker``: the helper's loop (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    try:
        return _serve(inp, out)
    except DkimKeyError as e:
        # One line for the journal, not a traceback at every restart: the daemon signs meanwhile.
        print(f"mailrelayd signworker: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The daemon is gone (it exited, or replaced us): nobody reads the answer, and a traceback
        # on its terminal or in its journal after its own last words would only mislead. The pipe
        # is pointed at /dev/null so that the interpreter's final flush of stdout stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0


def _serve(inp: Any, out: Any) -> int:
    line = inp.readline()
    if not line:
        return 0
    raw = json.loads(line)
    spec = SignerSpec(tuple(tuple(k) for k in raw["keys"]), tuple(raw["headers"]), raw["parent_domains"],
                      raw["expire"], tuple(raw.get("public_keys", ())))
    signer = spec.build()
    out.write(_RESPONSE.pack(_READY, 0, 0))
    out.flush()
    while True:
        head = _read_exactly(inp, _REQUEST.size)
        if head is None:
            return 0
        rid, now, length = _REQUEST.unpack(head)
        message = _read_exactly(inp, length)
        if message is None:
            return 0
        result = signer.compute(message, now=None if now < 0 else now)
        meta = json.dumps({"status": result.status, "domain": result.domain, "algorithms": result.algorithms,
                           "duration": result.duration, "reason": result.reason, "error": result.error,
                           "signed_by": result.signed_by, "failed_by": result.failed_by}).encode()
        out.write(_RESPONSE.pack(rid, len(meta), len(result.headers)) + meta + result.headers)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
