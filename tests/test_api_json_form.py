"""The JSON form of the HTTP API against what SMTP and the message/rfc822 form already do: each mailbox
delivered once, bad addresses listed in "rejected" and kept out of To/Cc, the header fields a client may
not forge refused, and long values folded so that no line passes 998 octets."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

import aiohttp

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
