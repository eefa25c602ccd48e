"""Accept cost with a big, partly suspended queue: commits/s of new messages (commit + hand-off to
the scheduler, 20 concurrent writers, instant fake transport) with an empty queue, and with N
deferred messages across D destinations of which S are suspended and their mail coming due during
the measurement (the loop reads and re-defers it meanwhile). Same process, alternating runs.

    .venv/bin/python bench/held_queue.py [--preload 100000] [--destinations 1000] [--suspended 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailrelayd.config import parse_config
from mailrelayd.delivery.dsn import build_dsn
from mailrelayd.delivery.scheduler import Scheduler
from mailrelayd.log import configure_logging
from mailrelayd.spool.store import NewMessage, Spool

BODY = b"Subject: x\r\n\r\n" + b"x" * 2000 + b"\r\n"


class _Res:
    def __init__(self, address: str) -> None:
        self.address, self.code, self.enhanced, self.text, self.remote_mta = address, 250, "2.0.0", "ok", "mx"
        self.remote_reply, self.stage = "250 2.0.0 ok", "end of DATA"
        self.ok, self.permanent = True, False


class _Instant:
    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes, **_: Any
                      ) -> list[_Res]:
        return [_Res(r) for r in recipients]


async def run(base: Path, preload: int, dests: int, suspended: int, accept: int, window: float
              ) -> tuple[float, float]:
    d = Path(tempfile.mkdtemp(dir=base))
    cfg = parse_config({"server": {"hostname": "relay.bench", "spool_dir": str(d / "spool")},
                        "listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "tls": "none"}]},
                       d / "mailrelayd.toml")
    spool = Spool(cfg.server.spool_dir)
    await spool.open()
    now = time.time()
    load_s = 0.0
    if preload:
        for i in range(0, preload, 2000):
            await asyncio.gather(*(spool.commit(NewMessage(spool.new_queue_id(), "app@example.com",
                                                           (f"u{j}@d{j % dests}.example",), BODY, now))
                                   for j in range(i, min(preload, i + 2000))))
        rows = await spool.active_schedule()
        soon = [q for k, (_, q) in enumerate(rows) if k % dests < suspended]
        later = [q for k, (_, q) in enumerate(rows) if k % dests >= suspended]
        await spool.reschedule_many(later, now + 3600)
        step = max(1, len(soon) // 100)
        for k in range(0, len(soon), step):  # their retries come due spread over `window` seconds
            await spool.reschedule_many(soon[k:k + step], now + 5 + window * k / max(1, len(soon)))
    sched = Scheduler(cfg, spool, _Instant(), dsn_builder=build_dsn)
    t0 = time.perf_counter()
    await sched.start()
    load_s = time.perf_counter() - t0
    for i in range(suspended):
        sched.destinations.get(f"d{i}.example").suspended_until = time.time() + 3600
    await asyncio.sleep(5)  # measure while the suspended destinations' mail comes due
    done = 0

    async def writer(w: int) -> None:
        nonlocal done
        while done < accept:
            done += 1
            m = NewMessage(spool.new_queue_id(), "app@example.com", (f"n{done}@new{done % 50}.example",), BODY,
                           time.time())
            await spool.commit(m)
            sched.submit(m)
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(20)))
    rate = accept / (time.perf_counter() - t0)
    await sched.stop(5)
    await spool.close()
    return rate, load_s


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preload", type=int, default=100_000)
    ap.add_argument("--destinations", type=int, default=1000)
    ap.add_argument("--suspended", type=int, default=100)
    ap.add_argument("--accept", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--due-window", type=float, default=300.0,
                    help="the suspended destinations' mail comes due spread over this many seconds (their "
                         "retry schedule; 10 = a worst case where all of it is due during the measurement)")
    a = ap.parse_args()
    configure_logging("json", "warning")
    empty: list[float] = []
    full: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            empty.append((await run(Path(tmp), 0, a.destinations, 0, a.accept, a.due_window))[0])
            r, load = await run(Path(tmp), a.preload, a.destinations, a.suspended, a.accept, a.due_window)
            full.append(r)
            print(f"  queue of {a.preload} loaded in {load:.2f} s")
    e, f = statistics.median(empty), statistics.median(full)
    print(f"accept, empty queue:                        {e:7.0f} msg/s ({', '.join(f'{x:.0f}' for x in empty)})")
    print(f"accept, {a.preload} queued / {a.suspended} of {a.destinations} suspended: {f:7.0f} msg/s "
          f"({', '.join(f'{x:.0f}' for x in full)})")
    print(f"ratio: {f / e:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
