"""The DATA payload reader (RFC 5321 §4.5.2 dot-stuffing, §2.3.8 line endings), incremental and
free of I/O: feed it bytes as they arrive; it says where the payload ended.

The rules it enforces, in the order they are decided once the terminator has arrived:

- size: past ``max_size`` nothing more is kept, but reading goes on to the terminator, because the
  reply comes after the data (RFC 5321 §4.2.5) -> 552 5.3.4;
- memory: every byte kept is charged to a process-wide :class:`MemoryBudget`; when it runs out the
  payload is read and dropped -> 451 4.3.2, so memory stays bounded whatever the clients do;
- smuggling (CVE-2023-51764 family): a bare CR or LF anywhere, including ``\\n.\\n`` or
  ``\\r.\\n`` meant as an end of data by some other server, rejects the whole message -> 550 5.6.0;
- line length (RFC 5321 §4.5.3.1.6) -> 500 5.5.2.

The terminator is searched for in the accumulated buffer with ``bytes.find`` (C speed), from just
before the newly added bytes; a virtual CRLF in front lets the same search find it for an empty body.
"""

from __future__ import annotations

from mailrelayd.errors import Reply

TERMINATOR = b"\r\n.\r\n"
CRLF = b"\r\n"

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
NO_MEMORY = Reply(451, "4.3.2", "Too much mail in progress, try again later")
BARE_CR_LF = Reply(550, "5.6.0", "Bare CR or LF in message data is not allowed (RFC 5321 §2.3.8)")


class MemoryBudget:
    """Bytes of message data held in memory, across all connections (``limits.max_data_memory``).

    Connections take bytes as they read DATA and give them back once the message is committed or
    dropped: the edge reports the commit's outcome from the intake task's last step, so a message
    stays counted while its stored form and its DKIM-signed copy exist. It is counted once, although
    it exists twice for a moment while the payload is copied into the stored message.
    Single-threaded (the event loop), so plain integers suffice."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def admits(self, declared: int = 0) -> bool:
        """May a new DATA start (``declared``: the MAIL SIZE= value, or 0)?"""
        return self.used + declared < self.limit

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class DotReader:
    """One DATA payload. ``feed()`` until it returns the number of bytes it used (the terminator was
    in them; the rest belongs to the next command), then ``result()``; ``release()`` once the message
    is no longer held (it gives the bytes back to the budget)."""

    __slots__ = ("_buf", "_charged", "_dropped", "_result", "_tail", "budget", "done", "max_line", "max_size")

    def __init__(self, max_size: int, max_line: int, budget: MemoryBudget | None = None) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.budget = budget
        self._buf: bytearray | None = bytearray(CRLF)  # the virtual CRLF (see module doc)
        self._tail = b""  # last bytes seen while dropping, to find a terminator split across feeds
        self._dropped: Reply | None = None
        self._charged = 0
        self._result: tuple[bytes | None, Reply | None] | None = None
        self.done = False

    @property
    def held(self) -> int:
        return self._charged

    def feed(self, data: bytes | bytearray | memoryview) -> int | None:
        """Consume ``data``. Returns None if the terminator has not arrived yet (all of ``data`` was
        used), else how many bytes of ``data`` belong to the payload (through the terminator)."""
        if self.done:
            raise RuntimeError("payload already complete")
        buf = self._buf
        if buf is not None:
            start = max(0, len(buf) - 4)
            buf += data
            i = buf.find(TERMINATOR, start)
            if i >= 0:
                end = i + 5
                extra = len(buf) - end
                if extra:
                    del buf[end:]
                self.done = True
                if not self._charge(len(data) - extra):
                    self._buf = None
                    self._dropped = NO_MEMORY
                    self.release()
                return len(data) - extra
            if len(buf) > self.max_size + 4096:  # our dot-stuffing slack; exact check in result()
                self._drop(TOO_BIG)
            elif not self._charge(len(data)):
                self._drop(NO_MEMORY)
            return None
        # Dropping: only look for the terminator, keep nothing but the last four bytes.
        n = len(data)
        head = self._tail + bytes(data[:4])
        i = head.find(TERMINATOR)
        if i >= 0:
            self.done = True
            return i + 5 - len(self._tail)
        j = bytes(data).find(TERMINATOR) if n > 4 else -1
        if j >= 0:
            self.done = True
            return j + 5
        self._tail = (self._tail + bytes(data[-4:]))[-4:]
        return None

    def _charge(self, n: int) -> bool:
        if self.budget is None:
            return True
        if not self.budget.take(n):
            return False
        self._charged += n
        return True

    def _drop(self, why: Reply) -> None:
        assert self._buf is not None
        self._tail = bytes(self._buf[-4:])
        self._buf = None
        self._dropped = why
        self.release()

    def result(self) -> tuple[bytes | None, Reply | None]:
        """(message with dot-stuffing removed, None) or (None, refusal). The message is handed over
        once: the reader keeps no reference to it (a 25 MB body must not stay alive through the
        commit twice, once here and once in the intake); a refusal can be asked for again."""
        if self._result is not None:
            if self._result[1] is None:
                raise RuntimeError("payload already handed over")
            return self._result
        body, problem = self._decide()
        self._result = (None, problem)
        return body, problem

    def _decide(self) -> tuple[bytes | None, Reply | None]:
        if self._dropped is not None or self._buf is None:
            return None, self._dropped or TOO_BIG
        wire = self._buf
        self._buf = None
        n_crlf = wire.count(CRLF)
        if wire.count(b"\n") != n_crlf or wire.count(b"\r") != n_crlf:
            self.release()
            return None, BARE_CR_LF
        size = len(wire) - 5 - wire.count(b"\r\n.", 0, len(wire) - 3)  # the body's, unstuffed
        if size > self.max_size:
            self.release()
            return None, TOO_BIG
        # One copy of the payload, whatever its size: slices of a memoryview, not of the bytearray.
        del wire[-3:]  # ".\r\n": the CRLF before the dot ends the message's last line
        if wire.find(b"\r\n.") >= 0:  # dot-stuffed lines (rare): one more transient copy
            wire = wire.replace(b"\r\n.", CRLF)
        # Lines as the message has them (a stuffed dot is not the message's), CRLF counted.
        if size > self.max_line - 2 and _longest_line(wire) > self.max_line - 2:
            self.release()
            return None, Reply(500, "5.5.2", f"Line too long (RFC 5321 §4.5.3.1.6: "
                                             f"{self.max_line} octets with CRLF)")
        with memoryview(wire) as view:
            body = bytes(view[2:])  # without the virtual CRLF
        return body, None

    def release(self) -> None:
        """Give the bytes held back to the budget (idempotent)."""
        if self._charged and self.budget is not None:
            self.budget.give(self._charged)
        self._charged = 0


def _longest_line(wire: bytearray, window: int = 1 << 20) -> int:
    """Length of the longest CRLF-separated line of ``wire``, without splitting it all at once (that
    would allocate one object per line: more memory than the message for short lines). Windows of
    ``window`` bytes never end between a CR and its LF."""
    longest = carry = 0
    n, pos = len(wire), 0
    while pos < n:
        end = min(pos + window, n)
        while end < n and wire[end - 1] == 13:  # keep a CRLF in one window
            end += 1
        lengths = list(map(len, wire[pos:end].split(CRLF)))
        lengths[0] += carry
        if len(lengths) > 1:
            longest = max(longest, max(lengths[:-1]))
        carry = lengths[-1]
        pos = end
    return max(longest, carry)
