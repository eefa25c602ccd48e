"""Local ``sendmail`` submissions in the daemon: the admin-socket request and the maildrop.

``mailrelayd sendmail`` sends its request (arguments plus the message, base64) to the admin
socket (``POST /sendmail``). When no daemon answers, it writes the same request as a file into the
maildrop directory (like Postfix's maildrop): written to a temporary name, fsynced, renamed, the
directory fsynced, so a file under its final name is always complete. The daemon submits every
file there at start and every few seconds, and deletes a file only once its message is durable in
the spool. A file the daemon refuses for good (sender not allowed, no recipients, unreadable, not a
plain file: a symlink, a FIFO, a directory, too large) is moved to ``failed/`` and logged: never lost
silently. Temporary failures (rate limit, disk full)
leave the file for the next pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from mailrelayd import metrics
from mailrelayd.config import Config
from mailrelayd.errors import DkimSignError, MessageRefused, SpoolError, reply_for
from mailrelayd.log import get_logger
from mailrelayd.sendmail import EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_TEMPFAIL, PrepareError, prepare
from mailrelayd.submit import LocalSubmitter, NoRecipients, to_crlf
from mailrelayd.users import User

log = get_logger()

EX_CONFIG = 78
PICKUP_EVERY = 5.0
REQUEST_OVERHEAD = 1024**2
"""Room for the JSON around the base64 message (recipients...) in a maildrop file's size cap."""


def write_drop(directory: Path, request: dict[str, Any]) -> Path:
    """Leave ``request`` in the maildrop, durably (see module docstring). Raises OSError."""
    body = json.dumps(request).encode()
    name = f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        final = directory / f"{name}.json"
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def ensure_dir(directory: Path) -> None:
    """The maildrop: group-writable, sticky, not listable by others (mode 1730)."""
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chmod(directory, 0o1730)
    (directory / "failed").mkdir(exist_ok=True)


class SendmailService:
    """Turns a sendmail request into a queued message (one per runtime; rebuilt on reload)."""

    def __init__(self, cfg: Config, user: User | None, submitter: LocalSubmitter | None) -> None:
        self.cfg = cfg
        self.user = user
        self.submitter = submitter

    async def handle(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, result). Errors carry ``exit`` (sysexits) and, for refusals, the SMTP reply."""
        if self.user is None or self.submitter is None:
            return 503, {"error": "sendmail is not enabled: set [sendmail] user in the config", "exit": EX_CONFIG}
        try:
            _check_types(req)
            data = to_crlf(base64.b64decode(req["data"], validate=True))
            rcpts = req.get("recipients") or []
            if not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts):
                raise ValueError("recipients must be a list of strings")
            sm = self.cfg.sendmail
            domain = sm.domain or self.cfg.server.hostname
            login = str(req.get("login") or "root")
            p = prepare(data, recipients=rcpts, extract=bool(req.get("extract")), sender=req.get("sender"),
                        full_name=req.get("full_name"), domain=domain, default_sender=sm.default_from,
                        fallback_sender=f"{login}@{domain}")
        except PrepareError as e:
            return 400, {"error": str(e), "exit": e.exit_code}
        except (KeyError, ValueError, TypeError, binascii.Error) as e:
            return 400, {"error": f"bad request: {e}", "exit": EX_DATAERR}
        try:
            res = await self.submitter.submit(self.user, p.mail_from, p.recipients, p.data)
        except (MessageRefused, SpoolError, DkimSignError) as e:
            r = reply_for(e)
            code = EX_TEMPFAIL if r.code < 500 else exit_code_for_refusal(e)
            return (503 if r.code < 500 else 403), {"error": str(r), "reply": _reply_json(r), "exit": code}
        return 200, {"queue_id": res.queue_id,
                     "refused": [{"recipient": x.recipient, **_reply_json(x.reply)} for x in res.refused]}


def exit_code_for_refusal(e: Exception) -> int:
    """The sysexits code for a permanent refusal, the same with the daemon up or down (the CLI's own
    checks while it is down use these codes too): no recipient left (bad address syntax, suppressed)
    is EX_NOUSER, "addressee unknown", as sendmail exits for recipients it cannot use; a sender the
    user may not use is EX_NOPERM; anything else wrong with the message or its sender is EX_DATAERR."""
    if isinstance(e, NoRecipients):
        return EX_NOUSER
    r = reply_for(e)
    return EX_NOPERM if r.enhanced.startswith("5.7") else EX_DATAERR


def _check_types(req: dict[str, Any]) -> None:
    """A maildrop file or admin request may hold anything: a field of the wrong type is a ValueError
    naming it (not an AttributeError deep in prepare(), which would stop the pickup at that file)."""
    if not isinstance(req.get("data"), str):
        raise ValueError("data must be the message, base64-encoded")
    for k in ("sender", "full_name", "login"):
        if req.get(k) is not None and not isinstance(req[k], str):
            raise ValueError(f"{k} must be a string")
    if not isinstance(req.get("extract", False), bool):
        raise ValueError("extract must be true or false")


def _read_drop(path: Path, limit: int) -> bytes:
    """The bytes of a maildrop file. Raises OSError, or ValueError for what is not a plain file of a
    plausible size: a symlink (to another drop: sent twice; to a file the sender may not read), a
    FIFO (a plain read blocks the pickup forever), a directory, or more than ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError("a symbolic link, not a file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes: more than any acceptable message")
    return data


def _reply_json(r: Any) -> dict[str, Any]:
    return {"code": r.code, "enhanced": r.enhanced, "message": r.text}


async def pickup(directory: Path, service: SendmailService) -> int:
    """Submit every complete file in the maildrop. Returns how many were queued."""
    try:
        names = sorted(p for p in await asyncio.to_thread(lambda: list(directory.glob("*.json"))))
    except OSError as e:
        log.warning("maildrop.scan_failed", directory=str(directory), error=str(e))
        return 0
    queued = 0
    limit = service.cfg.limits.max_message_size * 4 // 3 + REQUEST_OVERHEAD  # base64: 4 bytes per 3
    for path in names:
        try:
            req = json.loads(await asyncio.to_thread(_read_drop, path, limit))
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            continue
        except RecursionError:  # json.loads on deeply nested arrays
            await _fail(path, "unreadable: JSON nested too deeply")
            continue
        except (OSError, ValueError) as e:
            await _fail(path, f"unreadable: {e}")
            continue
        status, result = await service.handle(req)
        if status == 200:
            await asyncio.to_thread(path.unlink)  # only now: the message is durable in the spool
            queued += 1
            metrics.MAILDROP_MESSAGES.labels("queued").inc()
            log.info("maildrop.queued", file=path.name, queue_id=result["queue_id"],
                     refused=result["refused"] or None)
        elif result.get("exit") in (EX_TEMPFAIL, EX_CONFIG):
            log.warning("maildrop.deferred", file=path.name, error=result["error"])
            break  # try again on the next pass, in order
        else:
            await _fail(path, result["error"])
    return queued


async def _fail(path: Path, why: str) -> None:
    metrics.MAILDROP_MESSAGES.labels("failed").inc()
    dest = path.parent / "failed" / path.name
    try:
        await asyncio.to_thread(os.replace, path, dest)
    except OSError as e:
        log.error("maildrop.move_failed", file=str(path), error=str(e))
    log.error("maildrop.refused", file=str(dest), error=why)
