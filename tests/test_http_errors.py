"""What the HTTP listeners answer for requests that never reach a handler: the API's router errors are
JSON and counted like its other errors."""

from __future__ import annotations

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
