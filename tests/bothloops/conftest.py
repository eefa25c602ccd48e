"""Every asyncio test in this folder runs twice: under asyncio's own loop and under uvloop, the loop
production runs (the daemon's in-process servers are then driven by that loop).

pytest-asyncio parametrizes a test over the factories this hook returns (pytest-asyncio 1.4+). The
hook is per folder: pytest asks the conftest files above a test, so the rest of the suite keeps one
loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
