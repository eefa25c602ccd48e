"""Config loader fuzzing: any TOML input gets a loaded Config or a ConfigError naming the file and
the key, never another exception, never a hang ("bad input gets a clear answer").

Seeded and deterministic: valid configs (``base_config`` and a richer one touching every section)
are mutated with plain ``random.Random(seed)`` -- values of other types, out-of-range numbers,
wrong units, bad addresses/domains/paths, deleted required keys, unknown keys, duplicated list
entries -- written with tomli_w and loaded. A failure message carries the seed and mutations.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import random
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mailrelayd.config import Config, ConfigError, load_config
from tests.conftest import base_config, write_config

NAME = "mailrelayd.toml"
CASES_PER_SEED = 100
SEEDS = range(4)
SLOW = 2.0
"""Seconds one load may take before it counts as a hang."""


def rich_config(d: Path, tls_files: tuple[Path, Path]) -> dict[str, Any]:
    """A valid config that sets (nearly) every key of every section."""
    cert, key = tls_files
    for name in ("dkim-a.pem", "dkim-b.pem", "route.pw", "verp.secret", "pg.pw", "hook.secret"):
        (d / name).write_text("secret-value-long-enough\n")
    return {
        "server": {"hostname": "relay.test.example", "spool_dir": "spool", "state_dir": "state",
                   "shutdown_timeout": "5s", "min_free_space": "1MB", "admin_socket": "admin.sock"},
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "listeners": [
            {"name": "relay", "address": "127.0.0.1:2525", "mode": "relay", "tls": "starttls", "auth": True,
             "greet_delay": "1s"},
            {"name": "submission", "address": "[::1]:2587", "mode": "submission", "tls": "starttls"},
            {"name": "submissions", "address": "127.0.0.1:2465", "mode": "submission", "tls": "implicit"},
            {"name": "behind-lb", "address": "0.0.0.0:2526", "mode": "relay", "tls": "none",
             "proxy_protocol": True, "proxy_networks": ["10.0.0.0/8", "fd00::/8"]},
        ],
        "http": {"address": "127.0.0.1:9025", "enabled": True},
        "auth": {"users_file": "users.toml", "max_failures": 3, "failure_window": "1m", "lockout": "15m",
                 "received_show_user": False, "default_rate": "500/h"},
        "relay": {"local_domains": ["bounces.test.example", "Bücher.example."],
                  "trusted_networks": ["127.0.0.1/32", "192.0.2.0/24", "2001:db8::/32"]},
        "limits": {"max_message_size": "10MB", "max_recipients": 50, "max_line_length": 1000,
                   "command_timeout": "5m", "data_timeout": "10m", "tls_handshake_timeout": "30s",
                   "max_connections": 100, "max_connections_per_ip": 10, "max_errors": 5,
                   "max_data_memory": "64MB", "proxy_header_timeout": "10s"},
        "dkim": [
            {"domain": "test.example", "selector": "s1", "key_file": "dkim-a.pem", "algorithm": "rsa-sha256"},
            {"domain": "test.example", "selector": "ed1", "key_file": "dkim-b.pem",
             "algorithm": "ed25519-sha256"},
        ],
        "signing": {"headers": ["From", "To", "Subject"], "parent_domains": True, "expire": "7d",
                    "helper": False},
        "delivery": {"port": 25, "max_concurrency": 50, "domain_concurrency": 5,
                     "max_messages_per_connection": 20, "idle_timeout": "5s", "retry_initial": "1m",
                     "retry_max": "1h", "retry_jitter": 0.1, "max_queue_lifetime": "5d",
                     "bounce_queue_lifetime": "2d", "delay_warning": "4h", "tls": "may",
                     "tls_fallback_plaintext": True, "mta_sts": True, "ca_file": str(cert),
                     "connect_timeout": "30s", "greeting_timeout": "5m", "mail_timeout": "5m",
                     "rcpt_timeout": "5m", "data_init_timeout": "2m", "data_block_timeout": "3m",
                     "data_done_timeout": "10m", "ip_family": "prefer-ipv4", "source_address": "192.0.2.10",
                     "source_address6": "2001:db8::10", "throttle_backoff": "10m"},
        "dns": {"nameservers": ["127.0.0.1:5353", "[::1]:53", "192.0.2.53"], "timeout": "5s"},
        "routes": [
            {"domain": "*", "host": "127.0.0.1:9"},
            {"domain": "partner.example", "host": "smarthost.example:587", "tls": "encrypt", "username": "u",
             "password_file": "route.pw", "source_address": "192.0.2.11", "helo_name": "out.test.example"},
            {"domain": "other.example", "host": "[2001:db8::25]", "tls": "require", "username": "v",
             "password": "pw"},
        ],
        "shaping": [
            {"match": ".google.com", "max_connections": 5, "max_messages_per_connection": 50,
             "max_rate": "600/min", "throttle_backoff": "15m"},
            {"match": "example.net", "max_rate": "20/s"},
        ],
        "feedback": {"bounce_domain": "bounces.test.example", "verp_secret": "0123456789abcdef0123",
                     "verp_secret_file": "verp.secret", "verp_previous_secrets": ["old-secret-old-secret"],
                     "verp_retention": "30d", "soft_bounce_threshold": 3, "soft_bounce_window": "7d",
                     "case_insensitive_local_part": True, "keep_unparsable": True, "require_verp": False,
                     "trusted_reporters": ["fbl.yahoo.com", "192.0.2.0/24"], "sent_window": "7d",
                     "circuit_breaker": True, "circuit_breaker_window": "1d", "circuit_breaker_min_volume": 100,
                     "circuit_breaker_bounce_warn_rate": 0.02, "circuit_breaker_bounce_pause_rate": 0.1,
                     "circuit_breaker_complaint_warn_rate": 0.001, "circuit_breaker_complaint_pause_rate": 0.005,
                     "circuit_breaker_pause": "6h", "store": "postgresql://relay@db.test.example:5432/mailrelayd",
                     "store_password_file": "pg.pw", "store_poll_interval": "1s", "store_connect_timeout": "5s"},
        "logging": {"format": "console", "level": "debug"},
        "webhooks": [
            {"url": "https://hooks.test.example/mail", "secret_file": "hook.secret", "events": ["delivered",
             "bounced"], "name": "crm", "batch_size": 50, "timeout": "10s"},
            {"url": "http://127.0.0.1:8080/", "secret_file": "hook.secret"},
        ],
        "events": {"max_backlog": 1000, "retry_initial": "1s", "retry_max": "5m"},
        "history": {"retention": "30d"},
        "sendmail": {"user": "alice", "default_from": "root@relay.test.example", "domain": "test.example",
                     "maildrop_dir": "maildrop"},
        "api": {"address": "127.0.0.1:9026", "tls": True},
        "tls_rpt": {"enabled": True, "reporting_domain": "test.example", "organization_name": "Test Org",
                    "contact_info": "mailto:tlsrpt@test.example"},
    }


# --- the value pool ---------------------------------------------------------------------------
INTS: list[Any] = [0, 1, -1, 7, 65535, 65536, 2**31, 2**63 - 1, 2**63, -(2**63), 10**30, -(10**30), 10**400]
FLOATS: list[Any] = [0.0, -0.0, 0.5, -1.5, 1.0, 1e300, -1e300, 1e-300, float("nan"), float("inf"), float("-inf")]
BOOLS: list[Any] = [True, False]
STRINGS: list[Any] = [
    "", " ", "x", "0", "-1", "1", "true", "*", ".", "..", "\n", "\t", "a\x00b", "\x00", "\x7f",
    "ünïcödé", "日本語.example", "\u202eevil", "\U0001f4e7", "a" * 300, "a" * 5000, "é" * 300, "-" * 70,
    # durations, sizes, rates
    "30s", "5 parsecs", "-1s", "1e999s", "1e3s", "NaN", "inf", "nan s", "9" * 400 + "s", "٣s", "0s", "1.5.5s",
    "25MB", "99999999999999999999GB", "9" * 400 + "KB", "-1MB", "1.5GB", "0B", "1TB", "²MB",
    "600/min", "0/min", "9" * 5000 + "/min", "-5/s", "unlimited", "1/fortnight",
    # addresses, networks
    "0.0.0.0", "::1", "[::1]:25", "[::1", "[::1]x", "[nothost]:25", "999.1.1.1", "127.0.0.1:99999",
    "127.0.0.1:" + "9" * 5000, "host:²", "host:٣", "host:-1", ":25", "a:b:c", "10.0.0.0/33", "::/129",
    "10.0.0.1/8", "fe80::1%eth0", "1.2.3.4/-1",
    # domains
    "example..com", "-bad-.example", "xn--", "xn--zz", "a." * 130, ("a" * 64) + ".example", "EXAMPLE.COM.",
    "ex ample.com", "exa\x00mple.com", "ü" * 70 + ".example",
    # paths
    "/", "/dev/null", "/nonexistent/file", "~", "~nobody-such-user/x", "~/x", "../../../../etc/passwd",
    "/" + "a" * 5000, "/" + "/".join(["b" * 200] * 30), "a\x00b/c", "/proc/self/mem", "/root/secret",
    # urls
    "postgresql://u:p@h/db", "postgresql://[::1/db", "postgres://h:0/db", "postgresql://h:99999/db",
    "postgresql://h/db?password=x", "postgresql:///db", "http://[::1", "http://", "https://x.example/hook",
    "http://[v1.fe]/", "http://h:99999/", "mailto:", "ftp://x/",
]
DATES: list[Any] = [datetime.datetime(2020, 1, 1, 12, 0, tzinfo=datetime.UTC), datetime.datetime(2020, 1, 1),
                    datetime.date(2020, 1, 1), datetime.time(1, 2, 3)]
CONTAINERS: list[Any] = [[], [1], ["a", 1], [[]], ["x", "x", "x"], [{"a": 1}], [{}], [[1, 2], ["a"]],
                         {}, {"a": 1}, {"name": "x"}, {"a": {"b": {"c": [1, {"d": "e"}]}}},
                         [{"name": "relay", "address": "127.0.0.1:1", "mode": "relay"}]]
POOL: list[Any] = INTS + FLOATS + BOOLS + STRINGS + DATES + CONTAINERS
UNKNOWN_KEYS = ["bogus", "Hostname", "hostname ", "ünknown", "a.b", "a\x00b", "", "listeners", "server"]

SECTIONS = {f.name for f in dataclasses.fields(Config)}
# Errors for one key may legitimately be reported at a key that refers to it.
RELATED = {"tls": {"listeners", "api"}, "auth": {"listeners", "sendmail", "api"},
           "listeners": {"auth"}, "sendmail": {"auth"}, "api": {"auth", "tls"}}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in ``node`` (tables, arrays and leaves)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        node = node[k]
    return node


def _tweak(rng: random.Random, s: str) -> str:
    """A near miss of a valid string."""
    i = rng.randrange(len(s) + 1)
    return rng.choice([s[:i], s[:i] + "\x00" + s[i:], s.upper(), s + ".", " " + s + " ", s[:i] + "é" + s[i:],
                       s * 50, s[::-1], s + "9" * 30])


def mutate(rng: random.Random, data: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """Apply one random mutation in place; returns its description and the path it touched."""
    paths = _paths(data)
    path = rng.choice(paths)
    parent, last = _get(data, path[:-1]), path[-1]
    op = rng.randrange(10)
    if op <= 3:
        parent[last] = copy.deepcopy(rng.choice(POOL))
        return f"{_fmt(path)} = {parent[last]!r:.80}", path
    if op == 4:
        old = parent[last]
        if isinstance(old, str) and old:
            parent[last] = _tweak(rng, old)
            return f"{_fmt(path)} = {parent[last]!r:.80}", path
        other = rng.choice(paths)
        parent[last] = copy.deepcopy(_get(data, other))  # a value of another key
        return f"{_fmt(path)} = value of {_fmt(other)}", path
    if op == 5:
        del parent[last]
        return f"del {_fmt(path)}", path
    tables = [p for p in [(), *paths] if isinstance(_get(data, p), dict)]
    lists = [p for p in paths if isinstance(_get(data, p), list) and _get(data, p)]
    if op == 6 and lists:
        lp = rng.choice(lists)
        seq = _get(data, lp)
        seq.append(copy.deepcopy(rng.choice(seq)))
        return f"duplicate an entry of {_fmt(lp)}", lp
    if op == 7 and lists:
        lp = rng.choice(lists)
        _get(data, lp).clear()
        return f"{_fmt(lp)} = []", lp
    tp = rng.choice(tables)
    name = rng.choice(UNKNOWN_KEYS)
    table = _get(data, tp)
    if name in table:
        name += "_x"
    table[name] = copy.deepcopy(rng.choice(POOL))
    return f"add {_fmt((*tp, name))}", (*tp, name)


def _fmt(path: tuple[Any, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else "." + (k or '""') for k in path).lstrip(".") or "<root>"


def _load(path: Path) -> tuple[str, Exception | None, float]:
    """("ok" | "config-error" | "crash", exception, seconds)."""
    t0 = time.monotonic()
    try:
        load_config(path)
    except ConfigError as e:
        return "config-error", e, time.monotonic() - t0
    except Exception as e:  # anything else is the bug this test looks for
        return "crash", e, time.monotonic() - t0
    return "ok", None, time.monotonic() - t0


def _problem(path: Path, touched: list[tuple[Any, ...]], may_load: bool = True) -> str | None:
    """None if loading ``path`` gave a clear answer, else what went wrong."""
    outcome, exc, seconds = _load(path)
    if seconds > SLOW:
        return f"took {seconds:.1f}s"
    if outcome == "crash":
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if outcome == "ok":
        return None if may_load else "loaded"
    assert isinstance(exc, ConfigError)
    text = str(exc)
    if not exc.key:
        return f"ConfigError without a key: {text[:200]}"
    if text != f"{path}: {exc.key}: {exc.message}":
        return f"ConfigError not 'file: key: message': {text[:200]}"
    section = touched[0][0] if len(touched) == 1 else None
    if section in SECTIONS:  # one mutation inside a known section: the error is about it
        got = exc.key.split(".")[0].split("[")[0]
        if got != section and got not in RELATED.get(section, ()) and section not in RELATED.get(got, ()):
            return f"error names {exc.key!r}, unrelated to the mutated {_fmt(touched[0])}"
    return None


@pytest.fixture
def configs(tmp_path: Path, tls_files: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    """The valid starting points (each checked to load)."""
    out = {"base": base_config(tls_files), "rich": rich_config(tmp_path, tls_files)}
    for data in out.values():
        load_config(write_config(tmp_path, data))  # also writes users.toml next to it
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_configs_get_a_clear_answer(seed: int, tmp_path: Path, configs: dict[str, dict[str, Any]]) -> None:
    rng = random.Random(seed)
    path = tmp_path / NAME
    failures: list[str] = []
    for case in range(CASES_PER_SEED):
        data = copy.deepcopy(configs[rng.choice(["base", "rich", "rich"])])
        steps = [mutate(rng, data) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
        problem = _problem(path, [p for _, p in steps])
        if problem:
            failures.append(f"seed {seed} case {case} [{'; '.join(d for d, _ in steps)}]: {problem}")
    assert not failures, f"{len(failures)} of {CASES_PER_SEED} inputs had no clear answer:\n" + "\n".join(failures)


def _leaves(node: Any) -> list[tuple[Any, ...]]:
    return [p for p in _paths(node) if not isinstance(_get(node, p), dict | list)]


NASTY_NUMBERS: list[Any] = [-1, 10**30, 2**63, 10**400, float("nan"), float("inf"), float("-inf"), {"a": 1}, [1],
                            DATES[0], True]
NASTY_STRINGS: list[Any] = ["", "a\x00b", "9" * 400 + "s", "9" * 400 + "KB", "99999999999999999999GB", "1e999s",
                            "-1s", "/" + "a" * 5000, "http://[::1", "host:²", "127.0.0.1:" + "9" * 5000,
                            "9" * 5000 + "/min", "é" * 300, "[::1"]
NEVER_VALID: list[Any] = [-1, 10**30, 2**63, 10**400, float("nan"), float("inf"), float("-inf")]
"""No key takes these: negative, past 64 bits, not finite."""


@pytest.mark.timeout(60)
def test_every_key_rejects_nasty_values(tmp_path: Path, configs: dict[str, dict[str, Any]]) -> None:
    """At every value of the rich config, in turn, two of the values most likely to slip through a
    type check (numbers at non-string keys, strings at string keys; a different pair per key)."""
    path = tmp_path / NAME
    failures = []
    data = configs["rich"]
    for n, p in enumerate(_leaves(data)):
        pool = NASTY_STRINGS if isinstance(_get(data, p), str) else NASTY_NUMBERS
        for v in (pool[(2 * n) % len(pool)], pool[(2 * n + 1) % len(pool)]):
            d = copy.deepcopy(data)
            _get(d, p[:-1])[p[-1]] = v
            path.write_text(tomli_w.dumps(d), encoding="utf-8")
            problem = _problem(path, [p], may_load=not any(v is x for x in NEVER_VALID))
            if problem:
                failures.append(f"[{_fmt(p)} = {v!r:.60}]: {problem}")
    assert not failures, f"{len(failures)} inputs had no clear answer:\n" + "\n".join(failures)


# One case per bug found by the tests above: the exact key and a message a person can act on.
KNOWN: list[tuple[str, Any, str]] = [
    ("limits.command_timeout", 10**30, "limits.command_timeout: integer out of range"),  # was OverflowError
    ("limits.max_recipients", 2**63, "limits.max_recipients: integer out of range"),  # was loaded
    ("delivery.retry_jitter", 10**400, "delivery.retry_jitter: integer out of range"),  # was OverflowError
    ("limits.command_timeout", float("nan"), "limits.command_timeout: bad duration nan: must be a finite"),
    ("delivery.retry_max", "9" * 400 + "s", "delivery.retry_max: bad duration"),  # was loaded as inf
    ("feedback.verp_retention", "9" * 30 + "d", "feedback.verp_retention: bad duration"),  # was loaded
    ("history.retention", 1e300, "history.retention: bad duration 1e+300: at most 100 years"),  # was loaded
    ("delivery.retry_jitter", float("inf"), "delivery.retry_jitter: must be a finite number"),  # at entry now
    ("limits.max_message_size", "9" * 400 + "KB", "limits.max_message_size: bad size"),  # was OverflowError
    ("limits.max_data_memory", "99999999999999999999GB", "limits.max_data_memory: bad size"),  # was loaded
    ("server.shutdown_timeout", {"a": 1}, "server.shutdown_timeout: must be a duration like"),  # was repr(table)
    ("server.min_free_space", [1], "server.min_free_space: must be a size like"),
    ("tls.cert_file", "/" + "a" * 5000, "tls.cert_file: cannot access"),  # was OSError
    ("webhooks[0].secret_file", "b" * 300, "webhooks[0].secret_file: cannot access"),  # was OSError
    ("server.spool_dir", "spool\x00", "server.spool_dir: must not contain a NUL"),  # was loaded
    ("webhooks[0].url", "http://[::1", "webhooks[0].url: bad URL"),  # was ValueError
    ("webhooks[0].url", "https://h.example:99999/", "webhooks[0].url: bad URL"),  # was loaded
    ("listeners[0].address", "127.0.0.1:²", "listeners[0].address: bad address"),  # was "invalid literal for int()"
    ("dns.nameservers[0]", "127.0.0.1:" + "9" * 5000, "dns.nameservers[0]: bad address"),  # was int() digit limit
    ("shaping[0].max_rate", "9" * 5000 + "/min", "shaping[0].max_rate: bad rate"),  # was int() digit limit
    ("", "", '"": unknown key'),  # an empty key at the top was reported without a key
    ("limits", "a.b", '"a.b": unknown key'),
]


@pytest.mark.parametrize(("key", "value", "expected"), KNOWN, ids=[f"{k}={v!r:.20}" for k, v, _ in KNOWN])
def test_known_bad_values(key: str, value: Any, expected: str, tmp_path: Path,
                          configs: dict[str, dict[str, Any]]) -> None:
    data = copy.deepcopy(configs["rich"])
    if key in ("", "limits"):  # value is the name of an unknown key, added here
        (data[key] if key else data)[value] = 1
        expected = f"{key}.{expected}" if key else expected
    else:
        path = tuple(int(k) if k.isdigit() else k for k in key.replace("[", ".").replace("]", "").split("."))
        _get(data, path[:-1])[path[-1]] = value
    p = tmp_path / NAME
    p.write_text(tomli_w.dumps(data), encoding="utf-8")
    outcome, exc, _ = _load(p)
    assert outcome == "config-error", "loaded" if exc is None else f"{type(exc).__name__}: {str(exc)[:200]}"
    assert str(exc).startswith(f"{p}: {expected}"), str(exc)[:300]



@pytest.mark.parametrize(("url", "expected"), [
    ("ftp://hookuser:pw-secret@h.example/x?token=tok-secret", "must be an http:// or https:// URL, not ftp:"),
    ("hookuser:pw-secret@h.example/x", "must be an http:// or https:// URL, not hookuser:"),
    ("//hookuser:pw-secret@h.example/x", "must be an http:// or https:// URL, no scheme given"),
    ("https://hookuser:pw-secret@/x?token=tok-secret", "has no host name"),
    ("http://hookuser:pw-secret@[::1/x?token=tok-secret", "bad URL: Invalid IPv6 URL"),
    ("http://hookuser:pw-secret@h.example:99999/x?token=tok-secret", "bad URL: Port out of range"),
])
def test_a_bad_webhook_url_is_named_without_its_credentials(url: str, expected: str, tmp_path: Path,
                                                            configs: dict[str, dict[str, Any]]) -> None:
    """The error goes to the terminal and, on a reload, to the journal (config.reload_failed)."""
    data = copy.deepcopy(configs["rich"])
    data["webhooks"][0]["url"] = url
    p = tmp_path / NAME
    p.write_text(tomli_w.dumps(data), encoding="utf-8")
    outcome, exc, _ = _load(p)
    assert outcome == "config-error"
    assert str(exc).startswith(f"{p}: webhooks[0].url: {expected}"), str(exc)
    assert "secret" not in str(exc)

# --- raw texts tomli_w cannot produce -------------------------------------------------------------
RAW: list[tuple[str, bytes]] = [
    ("syntax error", b"[server\nhostname = 1\n"),
    ("unterminated string", b'[server]\nhostname = "relay\n'),
    ("duplicate key", b'[server]\nhostname = "a.example"\nhostname = "b.example"\n'),
    ("duplicate table", b"[server]\n[server]\n"),
    ("bad date", b"[server]\nhostname = 2023-02-30\n"),
    ("latin-1 bytes", '[server]\nhostname = "r\xe9lay.example"\n'.encode("latin-1")),
    ("encoded surrogate", b'[server]\nhostname = "\xed\xa0\x80"\n'),
    ("UTF-16", '[server]\nhostname = "relay.example"\n'.encode("utf-16")),
    ("BOM", b'\xef\xbb\xbf[server]\nhostname = "relay.example"\n'),
    ("NUL byte", b'[server]\nhostname = "relay\x00.example"\n'),
    ("surrogate escape", b'[server]\nhostname = "\\ud800"\n'),
    ("integer past int()'s digit limit", b"[limits]\nmax_recipients = 1" + b"0" * 5000 + b"\n"),
    ("hex integer past the digit limit", b"[limits]\nmax_recipients = 0x" + b"f" * 5000 + b"\n"),
    ("deep arrays", b"[server]\nhostname = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("deep inline tables", b"[server]\nhostname = " + b"{a=" * 5000 + b"1" + b"}" * 5000 + b"\n"),
    # deep tables from headers and dotted keys parse; the error message must not repr them
    ("deep table header", b'[server]\nhostname = "r.example"\n[server.shutdown_timeout' + b".a" * 5000 + b"]\n"),
    ("deep dotted key", b'[server]\nhostname = "r.example"\nmin_free_space' + b".a" * 5000 + b" = 1\n"),
    ("huge float", b'[server]\nhostname = "r.example"\nshutdown_timeout = 1e999\n'),
    ("empty file", b""),
    ("only a comment", b"# nothing here\n"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("desc", "text"), RAW, ids=[d for d, _ in RAW])
def test_raw_toml_gets_a_config_error(desc: str, text: bytes, tmp_path: Path) -> None:
    path = tmp_path / NAME
    path.write_bytes(text)
    outcome, exc, seconds = _load(path)
    assert seconds < SLOW, desc
    assert outcome == "config-error", f"{desc}: {type(exc).__name__}: {str(exc)[:200]}"
    assert str(exc).startswith(f"{path}: ")


def test_unreadable_paths_get_a_config_error(tmp_path: Path) -> None:
    for p in (tmp_path / "missing.toml", tmp_path, tmp_path / ("a" * 5000), tmp_path / "x" / "y.toml",
              tmp_path / "a\x00b.toml"):
        outcome, exc, _ = _load(p)
        assert outcome == "config-error", f"{str(p)[:80]}: {type(exc).__name__}: {exc}"
        assert str(exc).startswith(f"{p}: ")
