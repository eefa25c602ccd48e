"""The log pipeline in-process: JSON lines, secrets redacted, a reconfiguration (reload) reaching
loggers already in use, and the LineBatcher's one write per 10 ms (or per 64 KB)."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Iterator

import pytest

from mailrelayd.log import LineBatcher, configure_logging, get_logger


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    configure_logging("json", "info", stream=sys.__stderr__)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_reconfigure_reaches_loggers_already_in_use() -> None:
    log = get_logger()
    first = io.StringIO()
    configure_logging("json", "info", stream=first)
    log.info("one", password="hunter2")
    log.debug("hidden")
    second = io.StringIO()
    configure_logging("json", "debug", stream=second)  # a reload: new level and stream
    log.debug("two")
    log.bind(session="s1").warning("three")
    got = _lines(first)
    assert [e["event"] for e in got] == ["one"] and got[0]["password"] == "[redacted]"
    assert [(e["event"], e["level"]) for e in _lines(second)] == [("two", "debug"), ("three", "warning")]
    assert _lines(second)[1]["session"] == "s1"
    # The timestamp keeps structlog's ISO form (UTC, microseconds, Z).
    ts = str(_lines(second)[0]["ts"])
    assert len(ts) == len("2026-11-29T16:59:06.123456Z") and ts.endswith("Z") and ts[10] == "T"
    configure_logging("console", "warning", stream=second)
    log.info("not shown")
    log.error("shown")
    assert "not shown" not in second.getvalue() and "shown" in second.getvalue().splitlines()[-1]


async def test_line_batcher_writes_once_per_delay() -> None:
    raw = CountingStream()
    configure_logging("json", "info", stream=LineBatcher(raw, delay=0.05))
    log = get_logger()
    for i in range(50):
        log.info("burst", n=i)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert raw.writes == 0  # not at the end of the loop turn: a timer joins the next turns' lines
    log.info("burst", n=50)
    await asyncio.sleep(0.1)
    assert raw.writes == 1
    assert [e["n"] for e in _lines(raw)] == list(range(51))


async def test_line_batcher_writes_at_once_past_max_bytes() -> None:
    raw = CountingStream()
    configure_logging("json", "info", stream=LineBatcher(raw, delay=60, max_bytes=2000))
    log = get_logger()
    for i in range(40):  # about 80 bytes a line
        log.info("burst", n=i)
    assert raw.writes >= 1  # memory stays bounded whatever the delay
    assert len(raw.getvalue()) >= 2000
    assert [e["n"] for e in _lines(raw)] == list(range(len(_lines(raw))))


def test_line_batcher_without_a_loop_writes_at_once() -> None:
    raw = CountingStream()
    configure_logging("json", "info", stream=LineBatcher(raw))
    get_logger().info("now")
    assert raw.writes == 1 and _lines(raw)[0]["event"] == "now"
