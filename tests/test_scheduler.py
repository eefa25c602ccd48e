"""The delivery loop and the queue manager with a fake transport and a fake clock: shaping
(connections, rate, suspension after throttling, MX groups), holds, bulk actions. A real spool in a
temporary directory; no sockets and no timing: the clock only moves when the test moves it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mailrelayd.config import parse_config, parse_rate
from mailrelayd.delivery.dsn import build_dsn
from mailrelayd.delivery.mx import MxHost, _prefer_across, order_addresses
from mailrelayd.delivery.queuemanager import Hooks, QueueManager
from mailrelayd.delivery.scheduler import Scheduler
from mailrelayd.delivery.shaping import is_throttling
from mailrelayd.spool.store import NewMessage, QueueFilter, Spool

T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@dataclass
class Res:
    address: str
    code: int
    enhanced: str
    text: str
    remote_mta: str = "mx.fake"
    remote_reply: str = ""
    stage: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class FakeTransport:
    """Records every call with the fake time; replies from ``replies[domain]`` (default 250); a
    domain in ``block`` waits until the test sets its event."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, str, list[str]]] = []
        self.replies: dict[str, tuple[int, str, str]] = {}
        self.ours: set[str] = set()  # domains whose replies are the transport's own (no remote_reply)
        self.block: dict[str, asyncio.Event] = {}
        self.active = 0
        self.max_active = 0

    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes, *,
                      max_messages: int | None = None, max_connections: int | None = None,
                      max_recipients: int | None = None) -> list[Res]:
        self.calls.append((self.clock(), domain, list(recipients)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if domain in self.block:
                await self.block[domain].wait()
            code, enh, text = self.replies.get(domain, (250, "2.0.0", "ok"))
            remote = "" if domain in self.ours else f"{code} {enh} {text}"  # ours: a verdict of our own
            return [Res(r, code, enh, text, remote_reply=remote, stage="RCPT TO") for r in recipients]
        finally:
            self.active -= 1


def make_cfg(tmp: Path, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test.example", "spool_dir": str(tmp / "spool")},
        "listeners": [{"name": "relay", "address": "127.0.0.1:0", "mode": "relay", "tls": "none"}],
        "delivery": {"retry_initial": "60s", "retry_max": "600s", "retry_jitter": 0.0},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return parse_config(data, tmp / "mailrelayd.toml")


@dataclass
class Rig:
    sched: Scheduler
    transport: FakeTransport
    clock: FakeClock
    spool: Spool
    n: int = 0

    async def submit(self, *rcpts: str, sender: str = "app@example.com", user: str = "") -> str:
        self.n += 1
        qid = self.spool.new_queue_id()
        msg = NewMessage(qid, sender, rcpts, b"Subject: t\r\n\r\nx\r\n", self.clock(), listener="test",
                         sender_domain="example.com", user=user)
        await self.spool.commit(msg)
        self.sched.submit(msg)
        return qid

    async def settle(self) -> None:
        """Let the loop run until nothing is in flight and nothing is due (bounded)."""
        self.sched.poke()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20  # a bound for a loaded machine, not a timing assumption
        while loop.time() < deadline:
            await asyncio.sleep(0.001)  # spool reads and writes hop to threads
            if self.sched.quiescent():
                await asyncio.sleep(0.002)
                if self.sched.quiescent():
                    return
        raise AssertionError("scheduler did not settle")

    async def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        await self.settle()

    async def states(self, qid: str) -> dict[str, str]:
        return {a: st for a, (st, _) in (await self.spool.recipient_outcomes(qid)).items()}

    def delivered_to(self, domain: str) -> int:
        return sum(1 for _, d, _ in self.transport.calls if d == domain)


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Rig] = []

    async def make(mx: dict[str, list[str]] | None = None, hooks: Any = None, **cfg_extra: Any) -> Rig:
        clock = FakeClock()
        cfg = make_cfg(tmp_path, **cfg_extra)
        spool = Spool(cfg.server.spool_dir)
        await spool.open()
        transport = FakeTransport(clock)

        async def mx_names(domain: str) -> list[str]:
            return (mx or {}).get(domain, [])
        sched = Scheduler(cfg, spool, transport, dsn_builder=build_dsn, clock=clock, mx_names=mx_names, hooks=hooks)
        await sched.start()
        rig = Rig(sched, transport, clock, spool)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        for ev in rig.transport.block.values():
            ev.set()
        await rig.sched.stop(5)
        await rig.spool.close()


# --- pure pieces ----------------------------------------------------------------------------
@pytest.mark.parametrize("code,enh,text,want", [
    (421, "4.7.0", "rate limited", True),
    (421, "4.3.2", "closing", True),
    (451, "4.7.1", "greylisted", True),
    (450, "4.7.1", "policy", True),
    (452, "4.7.0", "Too many messages from your IP", True),
    (454, "4.7.0", "please try again later", True),
    (452, "4.7.0", "temporary policy decision", False),
    (451, "4.3.0", "rate limited", False),  # not a 4.7.x policy status
    (452, "4.2.2", "mailbox full", False),
    (450, "4.7.1", "", True),
    (454, "4.7.0", "message generated by a separate process", False),
])
def test_throttling_replies(code: int, enh: str, text: str, want: bool) -> None:
    assert is_throttling(code, enh, text) is want


def test_parse_rate() -> None:
    assert parse_rate("600/min") == (600, 60.0)
    assert parse_rate("20/s") == (20, 1.0)
    assert parse_rate("10000/h") == (10000, 3600.0)
    for bad in ("600", "0/s", "x/min", "5/fortnight", "-1/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_address_order_by_family() -> None:
    addrs = ("2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2")
    assert order_addresses(addrs, "ipv4") == ("192.0.2.1", "192.0.2.2")
    assert order_addresses(addrs, "ipv6") == ("2001:db8::1", "2001:db8::2")
    assert order_addresses(addrs, "prefer-ipv4") == ("192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2")
    assert order_addresses(addrs, "prefer-ipv6")[:2] == ("2001:db8::1", "2001:db8::2")
    assert order_addresses(addrs, "any") == addrs
    hosts = [MxHost("mx1", ("2001:db8::1",), 10, 25), MxHost("mx2", ("2001:db8::2", "192.0.2.2"), 20, 25)]
    ordered = _prefer_across(hosts, "prefer-ipv4")
    assert [(h.name, h.addresses) for h in ordered] == [("mx2", ("192.0.2.2",)), ("mx1", ("2001:db8::1",)),
                                                         ("mx2", ("2001:db8::2",))]


def test_shaping_config_errors(tmp_path: Path) -> None:
    from mailrelayd.config import ConfigError
    for shaping, key in (([{"match": "not a domain!"}], "shaping[0].match"),
                         ([{"match": ".google.com", "max_rate": "fast"}], "shaping[0].max_rate"),
                         ([{"match": "a.example"}, {"match": "A.example."}], "shaping[1].match"),
                         ([{"match": "a.example", "max_connections": 0}], "shaping[0].max_connections")):
        with pytest.raises(ConfigError) as e:
            make_cfg(tmp_path, shaping=shaping)
        assert f"mailrelayd.toml: {key}:" in str(e.value)
    with pytest.raises(ConfigError, match=r"delivery\.source_address: "):
        make_cfg(tmp_path, delivery={"source_address": "::1"})
    with pytest.raises(ConfigError, match=r"delivery\.ip_family: must be one of"):
        make_cfg(tmp_path, delivery={"ip_family": "ipv5"})


# --- the delivery loop ------------------------------------------------------------------------
async def test_plain_delivery_groups_by_domain(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    qid = await rig.submit("a@x.example", "b@x.example", "c@y.example")
    await rig.settle()
    assert sorted((d, len(r)) for _, d, r in rig.transport.calls) == [("x.example", 2), ("y.example", 1)]
    assert await rig.spool.get(qid) is None  # finished and removed


async def test_rate_is_a_schedule_not_a_burst(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(shaping=[{"match": "x.example", "max_rate": "10/s"}])
    for _ in range(20):
        await rig.submit("a@x.example")
    await rig.settle()
    assert rig.delivered_to("x.example") == 1
    for step in range(1, 20):
        await rig.advance(0.1)
        assert rig.delivered_to("x.example") == step + 1
    times = [t for t, d, _ in rig.transport.calls]
    assert all(b - a >= 0.1 - 1e-6 for a, b in itertools.pairwise(times))
    # After a stall (the loop woke late), reservations that fell due together still go one
    # interval apart.
    for _ in range(5):
        await rig.submit("a@x.example")
    await rig.advance(1.0)
    assert rig.delivered_to("x.example") == 21
    for step in range(1, 5):
        await rig.advance(0.1)
        assert rig.delivered_to("x.example") == 21 + step
    # An unshaped domain is not slowed by the shaped one's backlog.
    await rig.submit("a@other.example")
    await rig.settle()
    assert rig.delivered_to("other.example") == 1


async def test_max_connections_queues_in_fifo(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(shaping=[{"match": "x.example", "max_connections": 2}])
    rig.transport.block["x.example"] = gate = asyncio.Event()
    for _ in range(5):
        await rig.submit("a@x.example")
    for _ in range(50):
        await asyncio.sleep(0.001)
    assert rig.transport.active == 2
    gate.set()
    await rig.settle()
    assert rig.delivered_to("x.example") == 5 and rig.transport.max_active == 2


async def test_a_freed_slot_passes_over_waiting_mail_that_no_longer_needs_it(
        rig_factory: Callable[..., Any]) -> None:
    """A slot freed at a busy destination was handed to the first waiting message even when it had
    been deleted, or was held meanwhile: that one did not take it, and the rest of the backlog waited
    WAIT_RECHECK (5 minutes) with every connection idle (seen with `queue delete` under load)."""
    rig = await rig_factory(shaping=[{"match": "x.example", "max_connections": 1}])
    rig.transport.block["x.example"] = gate = asyncio.Event()
    qids = [await rig.submit(f"a{i}@x.example") for i in range(4)]
    for _ in range(50):
        await asyncio.sleep(0.001)
    assert rig.transport.active == 1  # qids[0] in flight; the others wait for its slot
    qm = rig.sched.queue
    assert (await qm.delete(QueueFilter(queue_ids=(qids[1],)))).messages == 1
    assert (await qm.hold(QueueFilter(queue_ids=(qids[2],)))).messages == 1
    gate.set()
    await rig.settle()
    assert await rig.states(qids[3]) == {"a3@x.example": "delivered"}  # at once, not 5 minutes later
    assert rig.delivered_to("x.example") == 2


class _Verp(Hooks):
    def verp_enabled(self, msg: Any) -> bool:
        return True


async def test_a_messages_own_transactions_do_not_postpone_its_other_recipients(
        rig_factory: Callable[..., Any]) -> None:
    # With VERP each recipient is a transaction of its own: 25 recipients at a destination that
    # takes 4 connections went out 4 at a time, then the rest waited WAIT_RECHECK (5 min) for the
    # slots this message itself held. Now the rest follow in the slots as they free.
    rig = await rig_factory(hooks=_Verp(), shaping=[{"match": "x.example", "max_connections": 4}])
    rig.transport.block["x.example"] = gate = asyncio.Event()
    qid = await rig.submit(*(f"r{i}@x.example" for i in range(25)))
    for _ in range(200):
        if rig.transport.active == 4:
            break
        await asyncio.sleep(0.005)
    gate.set()
    await rig.settle()  # the clock does not move: nothing may wait for a recheck
    assert set((await rig.states(qid)).values()) == {"delivered"}
    assert rig.delivered_to("x.example") == 25 and rig.transport.max_active == 4


async def test_domains_sharing_a_destination_in_one_message_do_not_wait(rig_factory: Callable[..., Any]) -> None:
    mx = {"a.example": ["aspmx.l.google.test"], "b.example": ["alt1.aspmx.l.google.test."]}
    rig = await rig_factory(mx=mx, shaping=[{"match": ".google.test", "max_connections": 1}])
    qid = await rig.submit("u@a.example", "u@b.example")
    await rig.settle()
    assert set((await rig.states(qid)).values()) == {"delivered"}
    assert rig.transport.max_active == 1


async def test_mx_suffix_groups_domains_into_one_destination(rig_factory: Callable[..., Any]) -> None:
    mx = {"a.example": ["aspmx.l.google.test"], "b.example": ["alt1.aspmx.l.google.test."],
          "c.example": ["mx.c.example"]}
    rig = await rig_factory(mx=mx, shaping=[{"match": ".google.test", "max_connections": 1}])
    rig.transport.block["a.example"] = gate_a = asyncio.Event()
    rig.transport.block["b.example"] = asyncio.Event()
    await rig.submit("u@a.example")
    await rig.submit("u@b.example")
    await rig.submit("u@c.example")
    for _ in range(50):
        await asyncio.sleep(0.001)
    assert rig.transport.active == 1 + 0  # a.example blocked; b waits for the shared slot; c done
    assert rig.delivered_to("c.example") == 1 and rig.delivered_to("b.example") == 0
    assert rig.sched.destination_name("b.example") == ".google.test"
    rig.transport.block.pop("b.example").set()
    gate_a.set()
    await rig.settle()
    assert rig.delivered_to("b.example") == 1


async def test_throttling_reply_suspends_the_destination(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(shaping=[{"match": "x.example", "throttle_backoff": "10m"}])
    rig.transport.replies["x.example"] = (421, "4.7.0", "rate limited")
    q1 = await rig.submit("a@x.example")
    await rig.settle()
    assert rig.delivered_to("x.example") == 1
    assert REGISTRY.get_sample_value("mailrelayd_destination_suspended",
                                             {"destination": "x.example"}) == 1
    rig.transport.replies.pop("x.example")
    q2 = await rig.submit("b@x.example")  # later mail to the destination waits too, uncontacted
    await rig.submit("c@y.example")  # other destinations are not affected
    await rig.settle()
    assert rig.delivered_to("x.example") == 1 and rig.delivered_to("y.example") == 1
    rec = await rig.spool.get(q1)  # the throttled recipient: deferred to the end of the suspension
    assert rec is not None and rec.recipients[0].state == "deferred"
    assert rec.recipients[0].next_attempt >= T0 + 600 and "rate limited" in rec.recipients[0].last_reply
    rec = await rig.spool.get(q2)  # later mail: not attempted, not written, waiting in memory
    assert rec is not None and (rec.recipients[0].state, rec.recipients[0].attempts) == ("pending", 0)
    await rig.advance(599)
    assert rig.delivered_to("x.example") == 1
    await rig.advance(40)  # backoff plus its spread
    assert rig.delivered_to("x.example") == 3
    assert await rig.spool.get(q1) is None and await rig.spool.get(q2) is None
    assert REGISTRY.get_sample_value("mailrelayd_destination_suspended",
                                             {"destination": "x.example"}) == 0
    assert await rig.states(q1) == {"a@x.example": "delivered"}


async def test_hold_by_domain_holds_later_mail_and_release_delivers(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    qm: QueueManager = rig.sched.queue
    res = await qm.hold(QueueFilter(domain="X.Example."), reason="provider 421s")
    assert res.rules and res.rules[0].value == "x.example"
    q1 = await rig.submit("a@x.example", "b@y.example")
    await rig.settle()
    assert rig.delivered_to("x.example") == 0 and rig.delivered_to("y.example") == 1
    rec = await rig.spool.get(q1)
    assert rec is not None and qm.recipient_state(rec, rec.recipients[0], frozenset()) == "held"
    assert q1 in rig.sched.parked
    # Held mail never expires while held: far past the queue lifetime, then released.
    await rig.advance(10 * 86400)
    assert await rig.states(q1) == {"a@x.example": "pending", "b@y.example": "delivered"}
    dry = await qm.release(QueueFilter(domain="x.example"), dry_run=True)
    assert (dry.messages, dry.dry_run) == (1, True) and qm.is_held(rec, rec.recipients[0])
    await qm.release(QueueFilter(domain="x.example"))
    await rig.settle()
    assert await rig.states(q1) == {"a@x.example": "delivered", "b@y.example": "delivered"}


async def test_hold_rules_survive_restart_and_expire(rig_factory: Callable[..., Any], tmp_path: Path) -> None:
    rig = await rig_factory()
    await rig.sched.queue.hold(QueueFilter(sender="@example.com"), until=T0 + 3600, reason="breaker")
    qid = await rig.submit("a@x.example")
    await rig.settle()
    assert rig.delivered_to("x.example") == 0
    # A second queue manager on the same spool (what the offline CLI uses) sees the rule.
    qm2 = QueueManager(rig.sched.cfg, rig.spool, dsn_builder=build_dsn, clock=rig.clock)
    await qm2.load()
    assert [(r.kind, r.value, r.reason) for r in qm2.rules] == [("sender", "@example.com", "breaker")]
    await rig.advance(3601)
    assert await rig.states(qid) == {"a@x.example": "delivered"}
    assert rig.sched.queue.rules == []


async def test_hold_by_user_and_queue_id(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    qm = rig.sched.queue
    rig.transport.replies["x.example"] = (451, "4.3.0", "later")
    a = await rig.submit("a@x.example", user="app1")
    b = await rig.submit("b@x.example", user="app2")
    await rig.settle()
    assert (await qm.hold(QueueFilter(user="app1"))).messages == 1
    assert (await qm.hold(QueueFilter(queue_ids=(b.lower(),)))).messages == 1
    c = await rig.submit("c@x.example", user="app1")  # arrives later: held by the user rule
    rig.transport.replies.pop("x.example")
    await rig.advance(3600)
    assert rig.delivered_to("x.example") == 2  # only the first attempts of a and b
    for q in (a, b, c):
        assert await rig.spool.get(q) is not None
    await qm.release(QueueFilter(queue_ids=(b,)))
    await rig.settle()
    assert await rig.spool.get(b) is None and await rig.spool.get(a) is not None
    await qm.release()
    await rig.settle()
    assert await rig.spool.get(a) is None and await rig.spool.get(c) is None


async def test_bulk_actions_dry_run_then_real(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    rig.transport.replies["x.example"] = (451, "4.3.0", "later")
    qids = [await rig.submit(f"u{i}@x.example", "v@y.example") for i in range(3)]
    await rig.settle()
    qm = rig.sched.queue
    dry = await qm.delete(QueueFilter(domain="x.example"), dry_run=True)
    assert (dry.messages, dry.recipients, dry.dry_run) == (3, 3, True)
    for q in qids:
        assert await rig.spool.get(q) is not None
    with pytest.raises(ValueError):
        await qm.delete(QueueFilter())
    with pytest.raises(ValueError, match="one of"):  # two rules would hold either, not both
        await qm.hold(QueueFilter(domain="x.example", user="app1"))
    stamped = await qm.hold(QueueFilter(domain="x.example", user="", older_than=0, sender="app@example.com"))
    assert (stamped.messages, stamped.rules) == (3, ())  # with an age: only what is queued now
    await qm.release(QueueFilter(queue_ids=tuple(qids)))
    await rig.settle()  # the release's attempts end: a message being delivered is not bounced nor deleted
    rig.clock.t += 7200
    assert (await qm.bounce(QueueFilter(older_than=3600, queue_ids=(qids[0],)))).messages == 1
    await rig.settle()  # the clock moved: the others were due, and are attempted once more
    assert (await qm.delete(QueueFilter(domain="x.example"))).recipients == 2
    await rig.settle()
    for q in qids:
        assert await rig.spool.get(q) is None
    # One DSN for the bounced message, to its sender.
    dsn_calls = [c for c in rig.transport.calls if c[1] == "example.com"]
    assert [c[2] for c in dsn_calls] == [["app@example.com"]]


def test_shipped_shaping_file_is_valid_when_uncommented(tmp_path: Path) -> None:
    """config/shaping.toml is all comments; its entries, uncommented, load and validate."""
    import re
    import tomllib

    src = (Path(__file__).resolve().parents[1] / "config" / "shaping.toml").read_text()
    assert tomllib.loads(src) == {}  # shipped commented out
    lines = [m.group(1) for m in re.finditer(r"(?m)^# (\[\[shaping\]\]|[a-z_]+ = (?:\"[^\"]*\"|\d+))\s*$", src)]
    entries = tomllib.loads("\n".join(lines))["shaping"]
    assert len(entries) >= 8 and {".google.com", ".olc.protection.outlook.com"} <= {e["match"] for e in entries}
    cfg = make_cfg(tmp_path, shaping=entries)
    assert len(cfg.shaping) == len(entries)


def test_source_address_choice(tmp_path: Path) -> None:
    from mailrelayd.delivery.transport import _source_for

    cfg = make_cfg(tmp_path, delivery={"source_address": "192.0.2.25", "source_address6": "2001:db8::25"},
                   routes=[{"domain": "v6.example", "host": "[2001:db8::99]:25", "source_address": "2001:db8::7"}])
    route = cfg.route_for("V6.Example")
    assert route is not None
    assert _source_for(cfg, None, "198.51.100.1") == "192.0.2.25"
    assert _source_for(cfg, None, "2001:db8::1") == "2001:db8::25"
    assert _source_for(cfg, route, "2001:db8::99") == "2001:db8::7"
    assert _source_for(cfg, route, "198.51.100.1") is False  # cannot bind an IPv6 source for IPv4
    assert _source_for(make_cfg(tmp_path), None, "198.51.100.1") is None


async def test_reload_changes_limits_of_live_destinations(rig_factory: Callable[..., Any], tmp_path: Path) -> None:
    rig = await rig_factory(shaping=[{"match": "x.example", "max_rate": "1/min"}])
    await rig.submit("a@x.example")
    await rig.submit("b@x.example")
    await rig.settle()
    assert rig.delivered_to("x.example") == 1  # the second waits a minute
    rig.sched.reconfigure(make_cfg(tmp_path, shaping=[{"match": "x.example", "max_rate": "100/s"}]))
    q = await rig.submit("c@x.example")
    await rig.settle()
    assert await rig.spool.get(q) is None  # the new rate applies at once to new mail
    await rig.advance(60)
    assert rig.delivered_to("x.example") == 3


async def test_admin_action_before_the_first_attempt_wins_over_the_fresh_record(
        rig_factory: Callable[..., Any]) -> None:
    """A just-committed message's first attempt uses the record the scheduler was handed, not a
    spool read; a hold or partial delete in between must still take effect."""
    rig = await rig_factory()
    qm = rig.sched.queue
    later = rig.clock() + 5  # not due yet: the admin actions land before its first attempt
    msgs = [NewMessage(rig.spool.new_queue_id(), "app@example.com", (f"a{i}@x.example", f"b{i}@y.example"),
                       b"Subject: t\r\n\r\nx\r\n", later, listener="test", sender_domain="example.com")
            for i in range(2)]
    for m in msgs:
        await rig.spool.commit(m)
        rig.sched.submit(m)
    assert (await qm.delete(QueueFilter(domain="y.example", queue_ids=(msgs[0].queue_id,)))).recipients == 1
    assert (await qm.hold(QueueFilter(queue_ids=(msgs[1].queue_id,)))).messages == 1
    await rig.advance(10)
    assert [c[2] for c in rig.transport.calls] == [["a0@x.example"]]
    assert await rig.spool.get(msgs[0].queue_id) is None
    assert await rig.states(msgs[1].queue_id) == {"a1@x.example": "pending", "b1@y.example": "pending"}


async def test_our_own_verdicts_never_suspend_a_destination(rig_factory: Callable[..., Any]) -> None:
    # "451 4.7.5 TLS ... failed" is ours, not the receiver's word about its load: with a shaping
    # group (".google.com"), it would have suspended every domain there.
    rig = await rig_factory(shaping=[{"match": "x.example", "throttle_backoff": "10m"}])
    rig.transport.replies["x.example"] = (451, "4.7.5", "TLS with mx.x.example failed: WRONG_VERSION_NUMBER")
    rig.transport.ours.add("x.example")
    await rig.submit("a@x.example")
    await rig.settle()
    assert REGISTRY.get_sample_value("mailrelayd_destination_suspended", {"destination": "x.example"}) in (None, 0)
    rig.transport.replies.pop("x.example")
    await rig.submit("b@x.example")
    await rig.settle()
    assert rig.delivered_to("x.example") == 2  # the next message went at once


async def test_mail_coming_due_for_a_suspended_destination_is_not_read(rig_factory: Callable[..., Any],
                                                                         tmp_path: Path) -> None:
    """A queued message whose only destination is suspended goes back to wait without a spool
    read, also after a restart (the domain comes with the start-up load)."""
    rig = await rig_factory(shaping=[{"match": "x.example", "throttle_backoff": "10m"}])
    rig.transport.replies["x.example"] = (451, "4.3.0", "try later")  # not throttling: a plain retry
    waiting = await rig.submit("w@x.example")
    await rig.settle()
    rig.transport.replies["x.example"] = (421, "4.7.0", "rate limited")
    await rig.submit("a@x.example")  # suspends x.example for 10 minutes
    await rig.settle()
    reads: list[str] = []
    real_get = rig.spool.get

    async def counting_get(qid: str) -> Any:
        reads.append(qid)
        return await real_get(qid)
    rig.spool.get = counting_get  # type: ignore[method-assign]
    await rig.advance(120)  # the plain retry of `waiting` comes due inside the suspension
    assert reads == [] and rig.delivered_to("x.example") == 2
    rig.transport.replies.pop("x.example")
    await rig.advance(600 + 60)
    assert await rig.states(waiting) == {"w@x.example": "delivered"}
    assert waiting in reads  # read once the suspension is over

    # Restarted: the start-up load tells the scheduler each message's domain.
    rig.transport.replies["x.example"] = (451, "4.3.0", "try later")
    loaded = await rig.submit("v@x.example", "v2@x.example")
    await rig.settle()
    await rig.sched.stop(5)
    rig.sched = Scheduler(rig.sched.cfg, rig.spool, rig.transport, dsn_builder=build_dsn, clock=rig.clock)
    await rig.sched.start()
    rig.transport.replies["x.example"] = (421, "4.7.0", "rate limited")
    await rig.submit("b@x.example")  # suspends x.example again, in the new scheduler
    await rig.settle()
    reads.clear()
    await rig.advance(120)  # `loaded` comes due inside the suspension
    assert loaded not in reads
    assert (await rig.states(loaded)) == {"v@x.example": "deferred", "v2@x.example": "deferred"}


# --- destination state in the spool: suspensions across a restart, held mail in the stats ------
def _suspended_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("mailrelayd_destination_suspended", {"destination": name})


async def _restart(rig: Rig) -> Rig:
    """Stop the rig's scheduler and start a new one (new transport, same spool and clock): what a
    daemon restart or crash leaves is the spool and nothing else."""
    await rig.sched.stop(5)
    transport = FakeTransport(rig.clock)
    sched = Scheduler(rig.sched.cfg, rig.spool, transport, dsn_builder=build_dsn, clock=rig.clock,
                      mx_names=rig.sched.mx_names)
    await sched.start()
    rig.sched, rig.transport = sched, transport
    return rig


async def test_suspension_survives_a_restart(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(shaping=[{"match": "x.example", "throttle_backoff": "10m"}])
    rig.transport.replies["x.example"] = (421, "4.7.0", "rate limited")
    q1 = await rig.submit("a@x.example")
    await rig.settle()
    q2 = await rig.submit("b@x.example")  # waits in memory only (no spool write per message)
    await rig.settle()
    stored = await rig.spool.suspensions(rig.clock())
    assert [(s.destination, s.until, s.since) for s in stored] == [("x.example", T0 + 600, T0)]
    assert "421 4.7.0 rate limited" in stored[0].reply
    rig.clock.t += 60
    await _restart(rig)  # the new transport would accept everything
    await rig.settle()
    assert rig.transport.calls == []  # q2 was due, but its destination is still suspended
    assert _suspended_gauge("x.example") == 1
    (d,) = [x for x in rig.sched.destinations_json() if x["destination"] == "x.example"]
    assert d["suspended_until"] == T0 + 600 and "rate limited" in d["suspend_reply"]
    await rig.advance(600 - 60 - 1)
    assert rig.transport.calls == []
    await rig.advance(1 + 60)  # the end of the suspension plus the spread of its backlog
    assert rig.delivered_to("x.example") == 2
    assert await rig.states(q1) == {"a@x.example": "delivered"}
    assert await rig.states(q2) == {"b@x.example": "delivered"}
    assert _suspended_gauge("x.example") == 0
    assert await rig.spool.suspensions(0) == []  # removed once it ended


async def test_ended_suspensions_are_ignored_and_removed_at_start(rig_factory: Callable[..., Any]) -> None:
    from mailrelayd.spool.store import Suspension

    rig = await rig_factory()
    await rig.spool.save_suspension(Suspension("x.example", T0 + 30, "421 busy", T0 - 10))
    await rig.spool.save_suspension(Suspension("y.example", T0 + 3600, "421 4.7.0 rate limited", T0 - 10))
    rig.clock.t += 60  # x.example's ended while the daemon was down
    q = await rig.submit("a@x.example", "b@y.example")
    await _restart(rig)
    await rig.settle()
    assert [d for _, d, _ in rig.transport.calls] == ["x.example"]
    assert [s.destination for s in await rig.spool.suspensions(0)] == ["y.example"]
    assert await rig.states(q) == {"a@x.example": "delivered", "b@y.example": "pending"}


async def test_queue_flush_lifts_suspensions(rig_factory: Callable[..., Any], tmp_path: Path) -> None:
    mx = {"a.example": ["aspmx.l.google.test"], "b.example": ["alt1.aspmx.l.google.test"]}
    rig = await rig_factory(mx=mx, shaping=[{"match": "x.example", "throttle_backoff": "1h"},
                                            {"match": ".google.test", "throttle_backoff": "1h"}])
    qm: QueueManager = rig.sched.queue
    for dom in ("x.example", "a.example"):
        rig.transport.replies[dom] = (421, "4.7.0", "rate limited")
    await rig.submit("u@x.example")
    await rig.submit("u@a.example")
    await rig.settle()
    rig.transport.replies.clear()
    qx = await rig.submit("v@x.example")
    qb = await rig.submit("v@b.example")  # another domain of the suspended MX group
    await rig.settle()
    assert rig.sched.suspended() == [".google.test", "x.example"]
    assert rig.sched.suspended(["b.example"]) == [".google.test"]
    # A flush of one sender's mail does not lift a provider's suspension for everyone.
    assert (await qm.flush(QueueFilter(sender="app@example.com"))).resumed == ()
    dry = await qm.flush(QueueFilter(domain="X.Example."), dry_run=True)
    assert (dry.resumed, dry.to_json()["resumed"]) == (("x.example",), ["x.example"])
    assert rig.sched.suspended() == [".google.test", "x.example"]
    # Offline (the CLI on a stopped daemon's spool) the stored suspensions are seen too.
    offline = QueueManager(rig.sched.cfg, rig.spool, dsn_builder=build_dsn, clock=rig.clock)
    assert (await offline.flush(None, dry_run=True)).resumed == (".google.test", "x.example")
    res = await qm.flush(QueueFilter(domain="x.example"))
    assert res.resumed == ("x.example",)
    await rig.settle()  # no time passes: x.example's mail goes at once, the group's still waits
    assert await rig.spool.get(qx) is None and await rig.spool.get(qb) is not None
    assert _suspended_gauge("x.example") == 0 and _suspended_gauge(".google.test") == 1
    assert [s.destination for s in await rig.spool.suspensions(0)] == [".google.test"]
    # A flush by the group's name lifts it and sends the group's waiting mail at once.
    assert (await qm.flush(QueueFilter(domain=".google.test"))).resumed == (".google.test",)
    await rig.settle()
    assert await rig.spool.get(qb) is None
    assert await rig.spool.suspensions(0) == [] and rig.sched.suspended() == []


async def test_stats_count_held_recipients_apart(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    qm: QueueManager = rig.sched.queue
    for dom in ("x.example", "y.example"):
        rig.transport.replies[dom] = (451, "4.3.0", "later")
    await qm.hold(QueueFilter(domain="held.example"))
    await qm.hold(QueueFilter(sender="@hold-sender.example"))
    await qm.hold(QueueFilter(sender="one@example.org"))
    await qm.hold(QueueFilter(user="app9"))
    qids = [await rig.submit("a@held.example", "b@x.example"),  # one held by domain, one deferred
            await rig.submit("c@x.example", sender="Me@Hold-Sender.example"),
            await rig.submit("d@y.example", sender="one@example.org"),
            await rig.submit("e@y.example", sender="one@sub.example.org"),  # not held: another address
            await rig.submit("f@y.example", sender="x@nothold-sender.example"),  # not the same domain
            await rig.submit("g@x.example", user="app9"),
            await rig.submit("h@x.example")]
    await rig.settle()
    await qm.hold(QueueFilter(queue_ids=(qids[-1],)))  # deferred first, then held as a whole
    st = await rig.spool.stats()
    want: dict[str, int] = {}
    for m in await rig.spool.get_many(qids):
        for r in m.active_recipients():
            if qm.recipient_state(m, r, frozenset()) == "held":
                want[r.state] = want.get(r.state, 0) + 1
    assert want == {"pending": 4, "deferred": 1}  # a, c, d, g never tried; h
    assert st.held == want
    assert st.recipients == {"pending": 4, "deferred": 4}  # held or not, as before
    await qm.release()
    assert (await rig.spool.stats()).held == {}
    await rig.settle()  # the released mail is tried (and deferred) first
    await qm.hold(QueueFilter(queue_ids=(qids[1],)))  # no rule at all: a message held as a whole
    assert (await rig.spool.stats()).held == {"deferred": 1}
