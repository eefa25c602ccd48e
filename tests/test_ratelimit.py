"""Per-user sending limits: the pure sliding window with a hand-moved clock, the policy hook, and
SMTP sessions over real sockets (451 4.7.1 at MAIL, metric, one log line per window), plus the
`user add/set --rate` CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import aiosmtplib
import pytest
from prometheus_client import REGISTRY

from mailrelayd.ratelimit import MemoryRateLimiter, Rate, SlidingWindow, parse_rate
from mailrelayd.users import load_users
from tests.conftest import TEST_PASSWORD, base_config, mailrelayd_cmd, write_config


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_parse_rate() -> None:
    assert parse_rate("500/h") == Rate(500, 3600)
    assert parse_rate(" 20 / min ") == Rate(20, 60)
    assert parse_rate("5000/d") == Rate(5000, 86400)
    assert parse_rate("3/s") == Rate(3, 1)
    assert parse_rate("unlimited") is None
    assert str(Rate(500, 3600)) == "500/h" and str(Rate(20, 60)) == "20/min"
    for bad in ("500", "0/h", "-1/h", "10/week", "ten/h", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_sliding_window_with_clock() -> None:
    rate = Rate(10, 3600)
    w = SlidingWindow()
    t = 3600.0 * 100  # start of a window
    assert all(w.take(rate, t + i).allowed for i in range(10))
    v = w.take(rate, t + 10)
    assert not v.allowed and v.first_refusal
    v2 = w.take(rate, t + 20)
    assert not v2.allowed and not v2.first_refusal  # logged once per window
    # Half-way through the next window half of the previous ten still count: 5 more allowed.
    t2 = t + 3600 + 1800
    assert [w.take(rate, t2 + i).allowed for i in range(6)] == [True] * 5 + [False]
    assert w.take(rate, t2 + 10).first_refusal is False
    # Two windows of silence: a full budget again.
    t3 = t + 4 * 3600
    assert all(w.take(rate, t3 + i).allowed for i in range(10))
    assert w.take(rate, t3 + 11).retry_after > 0


def test_memory_limiter_counts_per_user_and_forgets() -> None:
    clock = Clock()
    lim = MemoryRateLimiter(clock)
    r = Rate(2, 60)
    assert [lim.take("a", r).allowed for _ in range(3)] == [True, True, False]
    assert lim.take("b", r).allowed
    clock.t += 120
    assert lim.take("a", r).allowed
    lim.forget({"b"})
    assert [lim.take("a", r).allowed for _ in range(2)] == [True, True]


def _metric(user: str) -> float:
    return REGISTRY.get_sample_value("mailrelayd_user_rate_limited_total", {"user": user}) or 0.0


async def _mail(port: int, tls, user: str, sender: str) -> tuple[int, str]:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login(user, TEST_PASSWORD)
    try:
        resp = await c.execute_command(f"MAIL FROM:<{sender}>".encode())
        return resp.code, resp.message
    finally:
        c.close()


async def test_smtp_user_over_limit_gets_451_at_mail(start_daemon, client_tls, capfd) -> None:
    d = await start_daemon({"auth": {"default_rate": "3/h"}})
    clock = Clock(3600.0 * 500)
    d.daemon.rate_limiter.clock = clock  # the limiter takes its time from here
    port = d.port("submission")
    before = _metric("alice")
    codes = [(await _mail(port, client_tls, "alice", "a@example.com"))[0] for _ in range(3)]
    assert codes == [250, 250, 250]
    code, text = await _mail(port, client_tls, "alice", "a@example.com")
    assert code == 451 and text.startswith("4.7.1") and "rate limit" in text and "3/h" in text
    code, _ = await _mail(port, client_tls, "alice", "a@example.com")
    assert code == 451
    assert _metric("alice") - before == 2
    # Another user has their own budget.
    assert (await _mail(port, client_tls, "bob", "bob@example.org"))[0] == 250
    # Logged once for the window, not per message.
    out = capfd.readouterr().out
    lines = [json.loads(x) for x in out.splitlines() if '"user.rate_limited"' in x]
    assert len(lines) == 1 and lines[0]["user"] == "alice" and lines[0]["rate"] == "3/h"
    # Two hours later the budget is back.
    clock.t += 7200
    assert (await _mail(port, client_tls, "alice", "a@example.com"))[0] == 250


async def test_per_user_rate_from_users_file(start_daemon, client_tls) -> None:
    from mailrelayd.users import User, save_users
    from tests.conftest import TEST_HASH

    d = await start_daemon({"auth": {"default_rate": "unlimited"}})
    save_users(d.config.parent / "users.toml", {
        "alice": User("alice", TEST_HASH, ("@example.com",), "1/min"),
        "bob": User("bob", TEST_HASH, ("bob@example.org",))})
    assert await d.daemon.reload()
    d.daemon.rate_limiter.clock = Clock(60.0 * 10_000)
    port = d.port("submission")
    assert [(await _mail(port, client_tls, "alice", "x@example.com"))[0] for _ in range(2)] == [250, 451]
    assert [(await _mail(port, client_tls, "bob", "bob@example.org"))[0] for _ in range(3)] == [250] * 3


def test_user_add_and_set_rate_cli(tmp_path: Path, tls_files, cli_env) -> None:
    cfg = write_config(tmp_path, base_config(tls_files))
    env = {**cli_env, "MAILRELAYD_CONFIG": str(cfg)}

    def run(*args: str, stdin: str = "pw-of-carol\n") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*mailrelayd_cmd(), "user", *args], input=stdin, capture_output=True, text=True,
                              env=env, timeout=60)

    r = run("add", "carol", "--allow-from", "@example.com", "--rate", "500/h")
    assert r.returncode == 0, r.stderr
    assert load_users(tmp_path / "users.toml")["carol"].rate == "500/h"
    r = run("set", "carol", "--rate", "20/min")
    assert r.returncode == 0, r.stderr
    u = load_users(tmp_path / "users.toml")["carol"]
    assert u.rate == "20/min" and u.allowed_from == ("@example.com",)
    key = run("apikey", "carol").stdout.strip().splitlines()[-1]
    # Changing the password keeps rate and API keys.
    assert run("add", "carol").returncode == 0
    u = load_users(tmp_path / "users.toml")["carol"]
    assert u.rate == "20/min" and len(u.api_keys) == 1 and key not in (tmp_path / "users.toml").read_text()
    assert run("set", "carol", "--rate", "default").returncode == 0
    assert load_users(tmp_path / "users.toml")["carol"].rate is None
    r = run("set", "carol", "--rate", "lots")
    assert r.returncode != 0 and "--rate" in r.stderr
    r = run("set", "nobody", "--rate", "1/h")
    assert r.returncode == 1
    assert os.path.exists(tmp_path / "users.toml")
