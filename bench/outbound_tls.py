#!/usr/bin/env python3
"""Outbound delivery throughput by TLS mode, and the DATA path (aiosmtplib public ``data()`` against
the old private ``_drain_helper`` loop), through the real Transport.

The receiving MTA is an aiosmtpd sink with STARTTLS in a separate process (so it does not share our
event loop); MX, A and the ``_mta-sts`` TXT record come from the loopback DNS stub of the tests;
the MTA-STS policy is fetched once over HTTPS from 127.0.0.1:443 (test CA made here) and then served
from the cache, as in production. Modes are run in alternating order, several pairs.

  .venv/bin/python bench/outbound_tls.py --messages 2000 --pairs 3
  .venv/bin/python bench/outbound_tls.py --data-path --messages 300      # issue 11's measurement

Needs the test extras (it uses tests/support) and root for port 443.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from aiohttp import web  # noqa: E402

from mailrelayd.config import parse_config  # noqa: E402
from mailrelayd.delivery.mx import MxResolver  # noqa: E402
from mailrelayd.delivery.transport import Transport  # noqa: E402
from tests.conftest import base_config, deep_merge, write_config  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402
from tests.support.testca import TestCA  # noqa: E402

SINK = r"""
import asyncio, ssl, sys
from aiosmtpd.smtp import SMTP
class H:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok"
async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(H(), tls_context=ctx, hostname="mx.bench.test", decode_data=False,
                                                data_size_limit=0), "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

MX = "mx.bench.test"


def message(size: int) -> bytes:
    head = b"From: a@example.com\r\nTo: b@bench.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class OldDataTransport(Transport):
    """The pre-issue-11 DATA path: DATA by execute_command, then the body in 64 KiB blocks waiting on
    aiosmtplib's private _drain_helper (kept here only to measure against)."""

    async def _data(self, smtp: Any, data: bytes) -> Any:
        import re

        import aiosmtplib
        resp = await smtp.execute_command(b"DATA", timeout=self.cfg.delivery.data_init_timeout)
        if resp.code != 354:
            return resp
        proto = smtp.protocol
        body = re.sub(rb"(?m)^\.", b"..", data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        drain = getattr(proto, "_drain_helper", None)
        for i in range(0, len(body), 65536):
            proto.write(body[i:i + 65536])
            if drain is not None:
                await drain()
        proto.write(b".\r\n")
        try:
            return await proto.read_response(timeout=self.cfg.delivery.data_done_timeout)
        except aiosmtplib.SMTPTimeoutError:
            smtp.close()
            raise


async def run_mode(tmp: Path, ca: TestCA, dns_port: int, sink_port: int, tls: str, mta_sts: bool, n: int,
                   size: int, per_conn: int, cls: type[Transport] = Transport) -> float:
    d = tmp / f"{tls}-{mta_sts}-{cls.__name__}-{time.monotonic_ns()}"
    d.mkdir()
    write_config(d, {})
    cfg = parse_config(deep_merge(base_config((ca.dir / "relay.pem", ca.dir / "relay.key")), {
        "delivery": {"port": sink_port, "tls": tls, "mta_sts": mta_sts, "ca_file": str(ca.ca_file),
                     "max_messages_per_connection": per_conn, "domain_concurrency": 20},
        "routes": [], "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "5s"},
    }), d / "mailrelayd.toml")
    t = cls(cfg, MxResolver(cfg.dns))
    data = message(size)
    r = await t.deliver("bench.test", "a@example.com", ["b@bench.test"], data)  # warm: MX, policy fetch
    assert r[0].ok, r[0].text
    sem = asyncio.Semaphore(20)

    async def one() -> None:
        async with sem:
            (res,) = await t.deliver("bench.test", "a@example.com", ["b@bench.test"], data)
            assert res.ok, res.text
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    rate = n / (time.perf_counter() - t0)
    await t.close()
    return rate


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--per-conn", type=int, default=100, help="max_messages_per_connection")
    ap.add_argument("--data-path", action="store_true", help="compare the DATA implementations instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpd, DnsServer() as dns_srv:
        tmp = Path(tmpd)
        ca = TestCA(tmp)
        mx = ca.issue("mx", [MX])
        pol = ca.issue("policy", ["mta-sts.bench.test"])
        relay = ca.issue("relay", ["relay.test.example"])
        assert relay
        dns_srv.add("bench.test.", "MX", f"10 {MX}.")
        dns_srv.add(f"{MX}.", "A", "127.0.0.1")
        dns_srv.add("mta-sts.bench.test.", "A", "127.0.0.1")
        dns_srv.add("_mta-sts.bench.test.", "TXT", '"v=STSv1; id=1"')
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(mx.cert_file), str(mx.key_file)],
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        app = web.Application()

        async def policy(_: web.Request) -> web.Response:
            return web.Response(text=f"version: STSv1\nmode: enforce\nmx: {MX}\nmax_age: 86400\n",
                                content_type="text/plain")
        app.router.add_get("/.well-known/mta-sts.txt", policy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 443, ssl_context=pol.server_context()).start()
        try:
            results: dict[str, list[float]] = {}
            if args.data_path:
                modes: list[tuple[str, str, bool, type[Transport]]] = [
                    ("public data()", "none", False, Transport), ("old _drain_helper", "none", False, OldDataTransport)]
            else:
                modes = [("may (opportunistic)", "may", False, Transport),
                         ("may + MTA-STS enforce (cached)", "may", True, Transport)]
            for i in range(args.pairs):
                for name, tls, sts, cls in (modes if i % 2 == 0 else modes[::-1]):
                    rate = await run_mode(tmp, ca, dns_srv.port, port, tls, sts, args.messages, args.size,
                                          args.per_conn, cls)
                    results.setdefault(name, []).append(rate)
                    print(f"pair {i + 1}: {name:<34} {rate:8.1f} msg/s", flush=True)
            base = statistics.median(results[modes[0][0]])
            for name, rates in results.items():
                med = statistics.median(rates)
                print(f"{name:<34} median {med:8.1f} msg/s  ({med / base:.3f}x of {modes[0][0]})")
        finally:
            await runner.cleanup()
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    asyncio.run(main())
