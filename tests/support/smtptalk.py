"""A raw SMTP conversation for tests that must send exactly the bytes they mean (hostile input,
pipelining, smuggling), which real client libraries refuse to send."""

from __future__ import annotations

import asyncio
import ssl


class SmtpTalk:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer

    @classmethod
    async def connect(cls, port: int, *, host: str = "127.0.0.1", source: str | None = None,
                      tls: ssl.SSLContext | None = None, greeting: bool = True) -> SmtpTalk:
        r, w = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None, ssl=tls)
        t = cls(r, w)
        if greeting:
            code, text = await t.reply()
            assert code == 220, text
        return t

    async def reply(self, timeout: float = 10) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text of the last line without the code)."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.r.readuntil(b"\r\n"), timeout)
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        last = lines[-1]
        return int(last[:3]), last[4:]

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def cmd(self, line: str | bytes, timeout: float = 10) -> tuple[int, str]:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply(timeout)

    async def ehlo(self, name: str = "client.test.example") -> tuple[int, str]:
        return await self.cmd(f"EHLO {name}")

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        code, text = await self.cmd("STARTTLS")
        assert code == 220, text
        await self.w.start_tls(ctx)

    async def closed(self, timeout: float = 5) -> bool:
        """True once the server has closed the connection."""
        try:
            data = await asyncio.wait_for(self.r.read(), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            return True
        return data == b"" or self.r.at_eof()

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def deliver(port: int, source: str, mail_from: str, rcpt: str, body: bytes, *,
                  helo: str = "client.test.example") -> None:
    """One message from ``source``, as a remote MTA would send it; asserts every reply (250 at the end)."""
    t = await SmtpTalk.connect(port, source=source)
    await t.ehlo(helo)
    assert (await t.cmd(f"MAIL FROM:<{mail_from}>"))[0] == 250
    code, text = await t.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 250, text
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(body + b".")
    await t.close()
    assert code == 250, text


async def rcpt_code(port: int, rcpt: str, mail_from: str = "app@example.com") -> int:
    """The reply code the listener gives ``RCPT TO:<rcpt>`` (a suppressed recipient gets 550)."""
    t = await SmtpTalk.connect(port)
    await t.ehlo()
    assert (await t.cmd(f"MAIL FROM:<{mail_from}>"))[0] == 250
    code, _ = await t.cmd(f"RCPT TO:<{rcpt}>")
    await t.close()
    return code
