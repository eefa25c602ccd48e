"""The delivery loop's own cost: messages/s through the scheduler and queue manager with an instant
fake transport and a real spool, without shaping and with [[shaping]] configured but not binding
(domain and MX-suffix entries whose limits are never reached). Same process, alternating runs.

    .venv/bin/python bench/delivery_loop.py [--messages 3000] [--domains 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailrelayd.config import parse_config
from mailrelayd.delivery.dsn import build_dsn
from mailrelayd.delivery.scheduler import Scheduler
from mailrelayd.log import configure_logging
from mailrelayd.spool.store import NewMessage, Spool

SHAPING = [{"match": ".google.test", "max_connections": 500, "max_rate": "100000/s"},
           {"match": ".outlook.test", "max_connections": 500},
           {"match": "d0.example", "max_connections": 500, "max_rate": "100000/s"},
           {"match": "d1.example", "throttle_backoff": "1m"}]


@dataclass
class _Res:
    address: str
    code: int = 250
    enhanced: str = "2.0.0"
    text: str = "ok"
    remote_mta: str = "mx"
    remote_reply: str = "250 2.0.0 ok"
    stage: str = "end of DATA"
    ok: bool = True
    permanent: bool = False


class _Instant:
    def __init__(self) -> None:
        self.n = 0

    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes, **_: Any
                      ) -> list[_Res]:
        self.n += 1
        return [_Res(r) for r in recipients]


async def run(n: int, domains: int, shaping: bool, base: Path) -> float:
    d = Path(tempfile.mkdtemp(dir=base))
    data: dict[str, Any] = {"server": {"hostname": "relay.bench", "spool_dir": str(d / "spool")},
                            "listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "tls": "none"}]}
    if shaping:
        data["shaping"] = SHAPING
    if shaping is None:
        shaping = False
    cfg = parse_config(data, d / "mailrelayd.toml")
    spool = Spool(cfg.server.spool_dir)
    await spool.open()
    transport = _Instant()

    async def mx(domain: str) -> list[str]:
        return [f"mx{hash(domain) % 3}.google.test"] if hash(domain) % 2 else ["mx.other.test"]
    try:
        sched = Scheduler(cfg, spool, transport, dsn_builder=build_dsn, mx_names=mx)
    except TypeError:  # an older tree (PYTHONPATH=../main) without shaping: the baseline
        sched = Scheduler(cfg, spool, transport, dsn_builder=build_dsn)
    await sched.start()
    msgs = [NewMessage(spool.new_queue_id(), "app@example.com", (f"u{i}@d{i % domains}.example",),
                       b"Subject: x\r\n\r\n" + b"x" * 2000 + b"\r\n", time.time()) for i in range(n)]
    await asyncio.gather(*(spool.commit(m) for m in msgs))
    t0 = time.perf_counter()
    for m in msgs:
        sched.submit(m)
    while transport.n < n or sched.queued_count():
        await asyncio.sleep(0.005)
    dt = time.perf_counter() - t0
    await sched.stop(5)
    await spool.close()
    return n / dt


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--domains", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    configure_logging("json", "warning")
    plain: list[float] = []
    shaped: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            plain.append(await run(a.messages, a.domains, False, Path(tmp)))
            shaped.append(await run(a.messages, a.domains, True, Path(tmp)))
    p, s = statistics.median(plain), statistics.median(shaped)
    print(f"no shaping:            {p:8.0f} msg/s  (runs: {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"shaping, not binding:  {s:8.0f} msg/s  (runs: {', '.join(f'{x:.0f}' for x in shaped)})")
    print(f"ratio shaped/plain:    {s / p:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
