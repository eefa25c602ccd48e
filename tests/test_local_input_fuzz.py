"""Seeded hostile input for what the daemon reads from the local machine rather than the network:
the users file, files left in the maildrop by `sendmail`, the admin socket's JSON for the queue
verbs and history, and the `sendmail` front end's argv and standard input.

Every case comes from a fixed seed (a failure names the case, and reproduces). The invariants:
a clear error naming the file and entry, or the field; never another exception; bounded time;
never an operation wider than asked; and for the maildrop, every good file queued exactly once,
every bad one moved to ``failed/`` with a log line, and the pickup going on to the next file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import tomli_w

from mailrelayd import history, maildrop
from mailrelayd import sendmail as sm
from mailrelayd.config import Config, ListenerConfig, load_config
from mailrelayd.delivery.dsn import build_dsn
from mailrelayd.delivery.queuemanager import QueueManager
from mailrelayd.errors import MessageRefused, Reply
from mailrelayd.intake import Intake
from mailrelayd.queueops import QueueOps
from mailrelayd.ratelimit import parse_rate
from mailrelayd.smtp.policy import Policy
from mailrelayd.spool.store import MessageRecord, NewMessage, QueueFilter, Spool
from mailrelayd.submit import LocalSubmitter, Submitted
from mailrelayd.users import (
    MAX_USERS_FILE,
    User,
    UsersFileError,
    api_key_hash,
    api_key_index,
    load_users,
    verify_password,
)
from tests.conftest import TEST_HASH, base_config, deep_merge, mailrelayd_cmd, write_config

# --- shared pools of hostile values -------------------------------------------------------------
HOSTILE_STRINGS = [
    "", " ", "\t", "%", "_", "*", ".*", "^.*$", "(a+)+$", "[", "\\", "' OR '1'='1", "'; DROP TABLE messages; --",
    '" OR 1=1 --', "x\r\ny", "\x00", "a\x00b", "\ud800", "\udcff@x.test", "é", "名前", "<>", "@", ".", "..", "@%",
    "%%", "NULL", "null", "NaN", "-1", "1e309", "A" * 5000, "nobody@nowhere.invalid", "@nowhere.invalid",
]
HOSTILE_NUMBERS: list[Any] = [0, -1, -(2**63), 2**63, 2**64, 10**400, -(10**400), 1e308, -1e308, math.inf, -math.inf,
                              math.nan, 0.5, -0.0, True, False]


def hostile(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value (as json.loads returns it: NaN, huge integers and lone surrogates included)."""
    kind = rng.randrange(7 if depth < 2 else 3)
    if kind == 0:
        return rng.choice(HOSTILE_STRINGS)
    if kind == 1:
        return rng.choice(HOSTILE_NUMBERS)
    if kind == 2:
        return None
    if kind == 3:
        return [hostile(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 4:
        return {rng.choice(["a", "", "domain", "filter", "__proto__", "名前"]): hostile(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if kind == 5:
        nested: Any = rng.choice(HOSTILE_STRINGS)
        for _ in range(200):
            nested = [nested] if rng.random() < 0.5 else {"a": nested}
        return nested
    return rng.choice([[], {}, [None], {"": None}])


async def _bounded(coro: Any, what: str, seconds: float = 3.0) -> Any:
    try:
        return await asyncio.wait_for(coro, seconds)
    except TimeoutError:
        raise AssertionError(f"no answer within {seconds}s for {what}") from None


# --- the users file -------------------------------------------------------------------------------
CHEAP_SALT = base64.b64encode(b"s" * 16).decode().rstrip("=")
CHEAP_KEY = base64.b64encode(b"k" * 32).decode().rstrip("=")
# scrypt hashes that load_users must refuse (naming the entry) and verify_password must answer False to:
BAD_HASHES = [
    "", "$scrypt$", "$scrypt$ln=8,r=8,p=1", f"$scrypt$ln=8,r=8,p=1${CHEAP_SALT}$",  # empty key: scrypt ValueError
    f"$scrypt$ln=8,r=8,p=1${CHEAP_SALT}$AA",  # a 1-byte key: one wrong password in 256 would pass
    f"$scrypt$ln=22,r=8,p=1${CHEAP_SALT}${CHEAP_KEY}",  # 4 GiB: above maxmem, scrypt ValueError
    f"$scrypt$ln=16,r=16,p=1${CHEAP_SALT}${CHEAP_KEY}", f"$scrypt$ln=99,r=8,p=1${CHEAP_SALT}${CHEAP_KEY}",
    f"$scrypt$ln=x,r=8,p=1${CHEAP_SALT}${CHEAP_KEY}", f"$scrypt$ln=8,r=8${CHEAP_SALT}${CHEAP_KEY}",
    f"$scrypt$ln=8,r=8,p=1$é${CHEAP_KEY}", f"$bcrypt$ln=8,r=8,p=1${CHEAP_SALT}${CHEAP_KEY}",
    f"$scrypt$ln=8,r=8,p=1${CHEAP_SALT}${CHEAP_KEY}$extra", TEST_HASH[:-30],
]
GOOD_KEY = api_key_hash("mrk_fuzz_key_one")
OTHER_KEY = api_key_hash("mrk_fuzz_key_two")
BAD_API_KEYS = ["", "sha256:", "sha256:xyz", "sha256:" + GOOD_KEY[7:].upper(), GOOD_KEY[:-1], GOOD_KEY + "0",
                "md5:" + GOOD_KEY[7:], " " + GOOD_KEY]
USER_NAMES = ["alice", "bob", "a.b", "", " ", "名前", "x\x00y", "-", "1", "[users]"]


def _users_doc() -> dict[str, Any]:
    return {"users": {
        "alice": {"password": TEST_HASH, "allowed_from": ["@example.com"], "api_keys": [GOOD_KEY]},
        "bob": {"password": TEST_HASH, "allowed_from": ["bob@example.org"], "rate": "500/h",
                "api_keys": [OTHER_KEY]},
    }}


def _field_value(rng: random.Random, key: str) -> Any:
    pools: dict[str, list[Any]] = {
        "password": [*BAD_HASHES, TEST_HASH, 5, [TEST_HASH], {"a": 1}],
        "allowed_from": [[], [""], ["@example.com", 5], "@example.com", [["@x"]], ["*"], [" "], [True]],
        "rate": ["", "0/h", "-5/h", "500", "500/fortnight", "unlimited", "10/min", 500, "9" * 400 + "/h", [], "1/h "],
        "api_keys": [[], [GOOD_KEY], [OTHER_KEY], GOOD_KEY, [5], *[[k] for k in BAD_API_KEYS]],
    }
    pool = pools.get(key)
    if pool is None or rng.random() < 0.2:
        return rng.choice([*HOSTILE_STRINGS[:20], 1, -1, 1.5, True, [], {}, [1, "a"], {"x": {"y": [1]}}])
    return rng.choice(pool)


def _mutate_users(rng: random.Random, doc: dict[str, Any]) -> list[str]:
    """Mutate ``doc`` in place; returns what an error must name (any one of them)."""
    names: list[str] = []
    table = doc["users"]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        name = rng.choice([*table, rng.choice(USER_NAMES)])
        if op <= 2:  # one field
            key = rng.choice(["password", "allowed_from", "rate", "api_keys", "Password", "allowed-from", "x"])
            if isinstance(table.get(name), dict):
                table[name][key] = _field_value(rng, key)
            else:
                table[name] = {"password": TEST_HASH, key: _field_value(rng, key)}
            names.append(f"users.{name}")
        elif op == 3:  # a field removed
            entry = table.get(name)
            if isinstance(entry, dict) and entry:
                entry.pop(rng.choice(list(entry)))
            names.append(f"users.{name}")
        elif op == 4:  # the entry is not a table
            table[name] = rng.choice([5, "alice", [], [{"password": TEST_HASH}], True])
            names.append(f"users.{name}")
        elif op == 5:  # an API key copied into a second entry (a copy-pasted user)
            src = rng.choice(list(table))
            src_keys = table[src].get("api_keys") if isinstance(table[src], dict) else None
            dst = rng.choice([n for n in USER_NAMES if n != src])
            if isinstance(src_keys, list) and src_keys:
                table[dst] = {"password": TEST_HASH, "allowed_from": ["@example.net"], "api_keys": list(src_keys)}
                names += [f"users.{dst}", f"users.{src}"]
        else:  # top level
            key = rng.choice(["user", "Users", "auth", "users"])
            if key == "users":
                if rng.random() < 0.5:
                    doc["users"] = rng.choice([[], 5, "alice"])
                    return ["users"]
                continue
            doc[key] = rng.choice([5, "x", [1, "a"], {"a": 1}, True, 1.5, {"alice": {"password": TEST_HASH}}])
            names.append(key)
    return names


def _check_loaded(users: dict[str, User], case: str, verified: dict[str, bool]) -> None:
    for name, u in users.items():
        assert u.name == name and isinstance(u.password_hash, str), case
        assert all(isinstance(a, str) and a for a in u.allowed_from), case
        if u.rate is not None:
            parse_rate(u.rate)
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", k) for k in u.api_keys), case
        if u.password_hash not in verified:  # a hash it loaded is one it can check, without raising
            verified[u.password_hash] = verify_password("wrong password", u.password_hash)
        assert verified[u.password_hash] is False, case
    index = api_key_index(users)
    for u in users.values():  # every key identifies the user that lists it, and only that one
        assert all(index[k] is u for k in u.api_keys), f"{case}: an API key is shared between users"


def test_users_file_fuzz(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    path = tmp_path / "users.toml"
    verified: dict[str, bool] = {}
    started = time.monotonic()
    for i in range(250):
        doc = _users_doc()
        must_name = _mutate_users(rng, doc)
        text = tomli_w.dumps(doc)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        case = f"case {i}: {text[:300]!r}"
        t0 = time.monotonic()
        try:
            users = load_users(path)
        except UsersFileError as e:
            msg = str(e)
            assert msg.startswith(f"{path}: "), f"{case}: error does not name the file: {msg}"
            if "\udcff" not in text and "\ud800" not in text:  # else: not UTF-8, reported for the file
                # A name with control characters is named in its repr (it is not printed as it is).
                assert any(n in msg or repr(n)[1:-1] in msg for n in must_name), \
                    f"{case}: error names none of {must_name}: {msg}"
        else:
            _check_loaded(users, case, verified)
        assert time.monotonic() - t0 < 1.0, case
    assert time.monotonic() - started < 3.0


def _raw_mutations(rng: random.Random, good: bytes) -> Iterator[bytes]:
    for _ in range(150):
        b = bytearray(good)
        op = rng.randrange(8)
        pos = rng.randrange(len(b) + 1)
        if op == 0:
            del b[pos:]  # truncated (a half-written copy)
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 3:
            lines = bytes(b).split(b"\n")
            k = rng.randrange(len(lines))
            lines.insert(k, lines[k])  # a duplicated key or table
            b = bytearray(b"\n".join(lines))
        elif op == 4:
            b = bytearray(b"\xef\xbb\xbf" + bytes(b))  # BOM
        elif op == 5:
            depth = rng.choice([50, 2000, 20000])
            b += b"\n[users.deep]\npassword = " + b"[" * depth + b"]" * depth + b"\n"
        elif op == 6:
            depth = rng.choice([50, 2000])
            b += b"\n[users.deep2]\nrate = " + b"{a=" * depth + b"1" + b"}" * depth + b"\n"
        else:
            b = bytearray(bytes(b).replace(b"\n", b"\r\n"))
        yield bytes(b)


def test_users_file_raw_bytes_and_file_kinds(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "users.toml"
    good = tomli_w.dumps(_users_doc()).encode()
    verified: dict[str, bool] = {}
    started = time.monotonic()
    for i, raw in enumerate(_raw_mutations(rng, good)):
        path.write_bytes(raw)
        try:
            users = load_users(path)
        except UsersFileError as e:
            assert str(e).startswith(f"{path}: "), f"case {i} {raw[:200]!r}: {e}"
        else:
            _check_loaded(users, f"case {i} {raw[:200]!r}", verified)
    assert time.monotonic() - started < 2.0

    deep = tmp_path / "deep.toml"
    deep.write_text("[users.a]\npassword = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UsersFileError, match="nested too deeply"):
        load_users(deep)  # was: RecursionError out of tomllib, a traceback at start or SIGHUP

    for bad in BAD_HASHES:
        doc = _users_doc()
        doc["users"]["carol"] = {"password": bad}
        path.write_text(tomli_w.dumps(doc))
        with pytest.raises(UsersFileError) as e:
            load_users(path)
        assert str(e.value).startswith(f"{path}: users.carol.password:"), (bad, str(e.value))
        assert verify_password("anything", bad) is False, bad  # was: ValueError from scrypt for some

    doc = _users_doc()
    doc["users"]["mallory"] = {"password": TEST_HASH, "allowed_from": ["@evil.test"], "api_keys": [GOOD_KEY]}
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(UsersFileError) as e:  # was: loaded, and alice's key authenticated as mallory
        load_users(path)
    assert str(e.value).startswith(f"{path}: users.mallory.api_keys:") and "users.alice" in str(e.value)

    for name in ("", " ", "a\nb", "a\x1bb", "\u2028"):  # nobody can log in as it; it would reach logs
        doc = _users_doc()
        doc["users"][name] = {"password": TEST_HASH}
        path.write_text(tomli_w.dumps(doc))
        with pytest.raises(UsersFileError, match="printable and not blank"):
            load_users(path)

    kinds: dict[str, Callable[[Path], None]] = {
        "missing": lambda p: None,
        "directory": lambda p: p.mkdir(),
        "dangling symlink": lambda p: p.symlink_to(tmp_path / "nowhere"),
        "not UTF-8": lambda p: p.write_bytes(b"[users.a]\npassword = \"\xff\xfe\"\n"),
        "NUL bytes": lambda p: p.write_bytes(b"[users.a]\x00\npassword = 1\n"),
    }
    for kind, make in kinds.items():
        p = tmp_path / f"kind-{kind.replace(' ', '-')}.toml"
        make(p)
        with pytest.raises(UsersFileError) as e:
            load_users(p)
        assert str(e.value).startswith(f"{p}: "), (kind, str(e.value))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert load_users(empty) == {}
    link = tmp_path / "link.toml"
    link.symlink_to(path.with_name("good.toml"))
    link.with_name("good.toml").write_bytes(good)
    assert set(load_users(link)) == {"alice", "bob"}


def _special_users_files(tmp_path: Path) -> dict[str, Path]:
    """Paths that are no regular file (a FIFO first: before the fix, reading it blocked for good)."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-fifo.toml"
    link.symlink_to(fifo)
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    return {"FIFO": fifo, "symlink to a FIFO": link, "directory": directory, "character device": Path("/dev/zero")}


async def test_users_file_that_is_no_regular_file_or_too_large_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO as auth.users_file blocked the start, `check-config` and every SIGHUP reload after it (as
    would /dev/zero, read until memory ran out); a huge file was read whole. Now: an error naming it."""
    paths = _special_users_files(tmp_path)
    try:
        for kind, path in paths.items():
            with pytest.raises(UsersFileError) as e:
                await _bounded(asyncio.to_thread(load_users, path), f"load_users of a {kind}")
            kind_named = kind.removeprefix("symlink to a ")
            assert str(e.value) == f"{path}: not a regular file but a {kind_named}", str(e.value)
    finally:
        _unblock_fifos(tmp_path)
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as f:  # sparse: 100 MB that costs nothing (it was read, then parsed)
        f.write(tomli_w.dumps(_users_doc()).encode())
        f.truncate(100 * 1024**2)
    t0 = time.monotonic()
    with pytest.raises(UsersFileError, match=rf"^{re.escape(str(huge))}: larger than 16 MB \(104857600 bytes\)$"):
        load_users(huge)
    assert time.monotonic() - t0 < 0.5
    os.truncate(huge, MAX_USERS_FILE)  # at the cap: read and parsed (the NULs after the users are no TOML)
    with pytest.raises(UsersFileError, match="TOML syntax error"):
        load_users(huge)


async def test_check_config_and_reload_with_a_fifo_users_file(start_daemon, tmp_path: Path,
                                                               cli_env: dict[str, str]) -> None:
    d = await start_daemon()
    users = d.config.parent / "users.toml"
    good = users.read_bytes()
    users.unlink()
    os.mkfifo(users)
    try:
        p = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), "check-config", "-c", str(d.config), env=cli_env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(p.communicate(), 30)
        except TimeoutError:
            p.kill()
            await p.wait()
            raise AssertionError("check-config hung on a FIFO users file") from None
        assert p.returncode == 1 and f"{users}: not a regular file but a FIFO" in err.decode(), err
        assert await _bounded(d.daemon.reload(), "SIGHUP reload", 10.0) is False  # the old users stay in force
    finally:
        _unblock_fifos(users.parent, pattern=users.name)
    users.unlink()
    users.write_bytes(good)
    assert await _bounded(d.daemon.reload(), "SIGHUP reload", 10.0) is True  # not stuck "reloading"


# --- a config, a spool, and the local submission stack ---------------------------------------------
@pytest.fixture
def cfg(tmp_path: Path, tls_files: tuple[Path, Path]) -> Config:
    over = {"sendmail": {"user": "cron", "domain": "example.com"}, "limits": {"max_message_size": "64KB"},
            "server": {"hostname": "relay.test.example", "spool_dir": "spool", "state_dir": "state",
                       "shutdown_timeout": "5s", "min_free_space": "0"}}
    return load_config(write_config(tmp_path / "cfg", deep_merge(base_config(tls_files), over)))


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool")
    await s.open()
    yield s
    await s.close()


class FlakySubmitter(LocalSubmitter):
    """The real submitter, with a switch for a temporary failure (as a rate limit or a full disk gives)."""

    tempfail = False

    async def submit(self, user: User, mail_from: str, recipients: Any, data: bytes, **kw: Any) -> Submitted:
        if self.tempfail:
            raise MessageRefused(Reply(451, "4.3.1", "Insufficient system storage"))
        return await super().submit(user, mail_from, recipients, data, **kw)


def _service(cfg: Config, spool: Spool) -> tuple[maildrop.SendmailService, FlakySubmitter]:
    lcfg = ListenerConfig(name="sendmail", address=cfg.listeners[1].address, mode="submission", tls="none")
    policy = Policy(cfg, lcfg, lambda a: False)
    intake = Intake(cfg, check_headers=policy.check_headers, signer=None, spool=spool, on_accepted=lambda m: None)
    submitter = FlakySubmitter(cfg, policy, intake, listener="sendmail", protocol="LOCAL")
    return maildrop.SendmailService(cfg, User("cron", TEST_HASH, ("@example.com",)), submitter), submitter


# --- the maildrop ----------------------------------------------------------------------------------
def _request(marker: str, **fields: Any) -> dict[str, Any]:
    msg = f"To: rcpt@dest.test\nSubject: fuzz\nX-Fuzz-Id: {marker}\n\nbody of {marker}\n".encode()
    req = {"recipients": ["rcpt@dest.test"], "extract": False, "sender": None, "full_name": None, "login": "root",
           "data": base64.b64encode(msg).decode()}
    req.update(fields)
    return req


def _enc(req: Any) -> bytes:
    return json.dumps(req).encode("utf-8", "surrogatepass")


GOOD, BAD, EITHER = "good", "bad", "either"


def _drop_kinds(tmp_path: Path, huge_size: int) -> dict[str, tuple[str, Callable[[Path, str], None]]]:
    """kind -> (expected outcome, make(path, marker))."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)

    def write(data: bytes) -> Callable[[Path, str], None]:
        return lambda p, m: p.write_bytes(data)

    def req(**fields: Any) -> Callable[[Path, str], None]:
        return lambda p, m: p.write_bytes(_enc(_request(m, **fields)))

    def symlink_outside(p: Path, m: str) -> None:  # read with the daemon's rights, not the sender's
        target = outside / f"{m}.json"
        target.write_bytes(_enc(_request(m)))
        p.symlink_to(target)

    def huge(p: Path, m: str) -> None:
        with p.open("wb") as f:
            f.write(_enc(_request(m))[:-1] + b", \"pad\": \"")
            f.truncate(huge_size)

    def unreadable(p: Path, m: str) -> None:
        p.write_bytes(_enc(_request(m)))
        p.chmod(0)

    half = _enc(_request("half"))
    return {
        "good": (GOOD, req()),
        "good_8bit": (GOOD, lambda p, m: p.write_bytes(_enc({**_request(m), "data": base64.b64encode(
            f"Subject: caf\xe9\nX-Fuzz-Id: {m}\n\n\xff\xfe 8-bit .\n.\n".encode("latin-1")).decode()}))),
        "good_extract": (GOOD, req(extract=True, recipients=[])),
        "good_partly_refused": (GOOD, req(recipients=["ok@dest.test", "bad\r\nRCPT TO:<x@dest.test>@dest.test",
                                                      "nul\x00@dest.test"])),
        "empty": (BAD, write(b"")),
        "corrupt": (BAD, write(b"{\"data\": \"QUJD\", \"recipients\": [\"a@dest.test\"")),
        "half_written": (BAD, write(half[: len(half) // 2])),
        "not_utf8": (BAD, write(b"{\"data\": \"\xff\xfe\"}")),
        "nul_bytes": (BAD, write(b"\x00" * 64)),
        "not_object": (BAD, write(b"[\"a@dest.test\"]")),
        "json_null": (BAD, write(b"null")),
        "json_nan": (BAD, write(b"{\"data\": NaN}")),
        "deep": (BAD, write(b"[" * 100_000 + b"]" * 100_000)),
        "huge": (BAD, huge),
        "directory": (BAD, lambda p, m: p.mkdir()),
        "fifo": (BAD, lambda p, m: os.mkfifo(p)),
        "symlink_outside": (BAD, symlink_outside),
        "symlink_dangling": (BAD, lambda p, m: p.symlink_to(tmp_path / "nowhere.json")),
        "unreadable": (GOOD if os.geteuid() == 0 else BAD, unreadable),  # root reads mode 000
        "no_data": (BAD, lambda p, m: p.write_bytes(_enc({k: v for k, v in _request(m).items() if k != "data"}))),
        "data_int": (BAD, req(data=5)),
        "data_not_base64": (BAD, req(data="not base64!")),
        "sender_int": (BAD, req(sender=5)),
        "sender_list": (BAD, req(sender=["app@example.com"])),
        "full_name_int": (BAD, req(full_name=5)),
        "full_name_crlf": (BAD, req(full_name="Cron\r\n\r\nBcc: evil@dest.test")),
        "full_name_lf": (BAD, req(full_name="Cron\nX-Injected: yes")),
        "login_dict": (BAD, req(login={"a": 1})),
        "extract_string": (BAD, req(extract="false")),
        "recipients_string": (BAD, req(recipients="rcpt@dest.test")),
        "recipients_ints": (BAD, req(recipients=[1, 2])),
        "rcpt_crlf_only": (BAD, req(recipients=["evil@dest.test\r\nRCPT TO:<x@dest.test>"])),
        "no_recipients": (BAD, req(recipients=[])),
        "sender_not_allowed": (BAD, req(sender="ceo@other.test")),
        "sender_crlf": (BAD, req(sender="app@example.com\r\nBcc: x@dest.test")),
        "nul_in_message": (BAD, lambda p, m: p.write_bytes(_enc({**_request(m), "data": base64.b64encode(
            f"X-Fuzz-Id: {m}\n\na\x00b\n".encode()).decode()}))),
        "random_fields": (EITHER, lambda p, m: None),  # filled in by the test
    }


def _spooled_markers(bodies: list[bytes]) -> list[str]:
    return [m.decode() for b in bodies for m in re.findall(rb"X-Fuzz-Id: (\S+)", b)]


async def _spool_bodies(spool: Spool) -> tuple[list[bytes], list[MessageRecord]]:
    msgs = await spool.list_messages(10_000)
    return [await spool.body(m.queue_id) or b"" for m in msgs], msgs


def _unblock_fifos(*dirs: Path, pattern: str = "*fifo*") -> None:
    """A reader stuck in open() on a FIFO (the bug this file tests for) would keep the test process
    from exiting: give it a writer, then EOF."""
    for d in dirs:
        for p in d.glob(pattern):
            with contextlib.suppress(OSError):
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


async def test_maildrop_pickup_fuzz(tmp_path: Path, cfg: Config, spool: Spool) -> None:
    rng = random.Random(1971)
    service, _ = _service(cfg, spool)
    directory = tmp_path / "maildrop"
    maildrop.ensure_dir(directory)
    # Well past any sane cap (base64 of the largest message plus the JSON around it); sparse, so cheap.
    kinds = _drop_kinds(tmp_path, cfg.limits.max_message_size * 4 + 4 * 1024**2)
    plan = [k for k in kinds if k != "random_fields"] + ["good"] * 6 + ["random_fields"] * 12
    rng.shuffle(plan)
    expected: dict[str, str] = {}  # marker -> outcome
    marker_of: dict[str, str] = {}  # file name -> marker
    for i, kind in enumerate(plan):
        marker = f"m{i:03d}-{kind}"
        name = f"{1_700_000_000_000_000_000 + i}.{kind}.json"
        path = directory / name
        outcome, make = kinds[kind]
        if kind == "random_fields":
            fields = {rng.choice(["recipients", "extract", "sender", "full_name", "login", "x"]): hostile(rng)
                      for _ in range(rng.randint(1, 2))}
            path.write_bytes(_enc(_request(marker, **fields)))
        else:
            make(path, marker)
        expected[marker] = outcome
        marker_of[name] = marker
    # A symlink (sorted first) to a good drop: reading through it would queue that message twice.
    twin = next(n for n in marker_of if ".good." in n)
    (directory / "1600000000000000000.twin.json").symlink_to(directory / twin)
    expected["twin"] = BAD
    marker_of["1600000000000000000.twin.json"] = "twin"
    (directory / ".1900000000000000000.1.abcd.tmp").write_bytes(b"{\"half")  # write_drop's temp: not yet a drop

    try:
        with structlog.testing.capture_logs() as logs:
            t0 = time.monotonic()
            queued = await _bounded(maildrop.pickup(directory, service), "maildrop pickup", 5.0)
            elapsed = time.monotonic() - t0
            again = await _bounded(maildrop.pickup(directory, service), "second pickup", 5.0)
    finally:
        _unblock_fifos(directory, directory / "failed")
    assert elapsed < 4.0
    assert again == 0, "a second pass queued something again"

    bodies, msgs = await _spool_bodies(spool)
    spooled = _spooled_markers(bodies)
    assert queued == len(msgs) == len(spooled), (queued, len(msgs), spooled)
    assert len(spooled) == len(set(spooled)), f"queued twice: {sorted(spooled)}"
    failed_dir = directory / "failed"
    failed = {p.name for p in failed_dir.iterdir()}
    refused = {Path(e["file"]).name: e["error"] for e in logs if e["event"] == "maildrop.refused"}
    logged_queued = {e["file"] for e in logs if e["event"] == "maildrop.queued"}
    for name in marker_of:
        marker = marker_of[name]
        want = expected[marker]
        is_queued = marker in spooled
        is_failed = name in failed
        what = f"{name} ({want})"
        assert is_queued != is_failed, f"{what}: queued={is_queued} failed={is_failed}"
        if want == GOOD:
            assert is_queued, f"{what}: not queued; refused with {refused.get(name)!r}"
        elif want == BAD:
            assert is_failed, f"{what}: queued, not set aside"
        if is_failed:
            assert isinstance(refused.get(name), str) and refused[name], f"{what}: moved aside without a log line"
            assert os.path.lexists(failed_dir / name)
        else:
            assert name in logged_queued, what
    assert sorted(p.name for p in directory.iterdir()) == sorted([".1900000000000000000.1.abcd.tmp", "failed"])
    for b, m in zip(bodies, msgs, strict=True):  # what reached the spool is clean
        for addr in (m.mail_from, *(r.address for r in m.recipients)):
            assert not set(addr) & set("\r\n\0"), addr
        head = b.split(b"\r\n\r\n", 1)[0]
        assert b"evil@" not in head and b"X-Injected" not in head, head


async def test_maildrop_temporary_failure_keeps_order_and_submits_once(tmp_path: Path, cfg: Config,
                                                                       spool: Spool) -> None:
    service, submitter = _service(cfg, spool)
    directory = tmp_path / "maildrop"
    maildrop.ensure_dir(directory)
    for i, marker in enumerate(["first", "second", "third"]):
        (directory / f"{i}.json").write_bytes(_enc(_request(marker)))
    submitter.tempfail = True
    with structlog.testing.capture_logs() as logs:
        assert await _bounded(maildrop.pickup(directory, service), "pickup") == 0
    assert [e["file"] for e in logs if e["event"] == "maildrop.deferred"] == ["0.json"]  # then it stops, in order
    assert sorted(p.name for p in directory.glob("*.json")) == ["0.json", "1.json", "2.json"]
    submitter.tempfail = False
    assert await _bounded(maildrop.pickup(directory, service), "pickup") == 3
    assert await _bounded(maildrop.pickup(directory, service), "pickup") == 0
    bodies, _ = await _spool_bodies(spool)
    assert sorted(_spooled_markers(bodies)) == ["first", "second", "third"]
    assert not list(directory.glob("*.json")) and not list((directory / "failed").iterdir())


async def test_sendmail_admin_request_fuzz(cfg: Config, spool: Spool) -> None:
    """``POST /sendmail`` on the admin socket: the same service, any JSON value in each field."""
    rng = random.Random(99)
    service, _ = _service(cfg, spool)
    sysexits = {sm.EX_USAGE, sm.EX_DATAERR, sm.EX_NOUSER, sm.EX_NOPERM, sm.EX_TEMPFAIL}
    started = time.monotonic()
    for i in range(150):
        req = _request(f"adm{i}")
        for _ in range(rng.randint(1, 3)):
            req[rng.choice(["recipients", "extract", "sender", "full_name", "login", "data", "other"])] = hostile(rng)
        status, result = await _bounded(service.handle(req), f"case {i}: {str(req)[:200]}")
        assert status in (200, 400, 403, 503), (i, status, result)
        if status != 200:
            assert isinstance(result["error"], str) and result["error"] and result["exit"] in sysexits, (i, result)
    assert time.monotonic() - started < 3.0


async def test_sendmail_request_with_the_null_sender(cfg: Config, spool: Spool) -> None:
    """A request (admin socket or maildrop file) with sender "" or "<>" is MAIL FROM:<>: refused with a
    reply that says why unless the user's allowed_from has "*", queued with the null sender if it has."""
    service, _ = _service(cfg, spool)  # cron: @example.com
    for sender in ("", "<>"):
        status, res = await service.handle(_request("null-refused", sender=sender))
        assert (status, res["exit"]) == (403, sm.EX_NOPERM), res
        assert res["reply"] == {"code": 550, "enhanced": "5.7.1",
                                "message": 'Null sender <> not allowed for this user (its allowed_from needs "*")'}
    service.user = User("cron", TEST_HASH, ("*",))
    status, res = await service.handle(_request("null-queued", sender="<>"))
    assert status == 200, res
    m = await spool.get(res["queue_id"])
    assert m is not None and m.mail_from == ""
    body = await spool.body(m.queue_id) or b""
    assert b"\r\nFrom: MAILER-DAEMON@example.com\r\n" in body  # the message had no From


def test_only_a_star_pattern_allows_the_null_sender() -> None:
    assert User("a", TEST_HASH, ("*",)).may_send_as("")
    assert User("a", TEST_HASH, ("@example.com", " * ")).may_send_as("")
    for patterns in ((), ("@example.com",), ("app@example.com",), ("@",)):
        assert not User("a", TEST_HASH, patterns).may_send_as(""), patterns


# --- the admin socket: queue verbs and history ----------------------------------------------------
SEEDED = [("app@one.test", "r1@dest-one.test", "alice", "<m1@one.test>"),
          ("app@two.test", "r2@dest-two.test", "bob", "<m2@two.test>"),
          ("noreply@three.test", "r3@dest-three.test", "", "<m3@three.test>")]


async def _seed(spool: Spool) -> list[str]:
    qids = []
    for sender, rcpt, user, mid in SEEDED:
        qid = spool.new_queue_id()
        await spool.commit(NewMessage(qid, sender, [rcpt], f"From: {sender}\r\nMessage-ID: {mid}\r\n\r\nx\r\n".encode(),
                                      time.time(), sender_domain=sender.rpartition("@")[2], message_id=mid, user=user))
        qids.append(qid)
    return qids


async def _snapshot(spool: Spool, qm: QueueManager) -> list[Any]:
    return [(m.queue_id, m.held_at, [(r.address, r.state, r.next_attempt, qm.is_held(m, r)) for r in m.recipients])
            for m in await spool.list_messages(100)]


UNKNOWN_ROUTES = [("POST", "queue/purge"), ("POST", "queue/../history"), ("DELETE", "queue"), ("PUT", "queue/hold"),
                  ("POST", "queue/%00"), ("GET", "queue/hold"), ("POST", "queue/0000000000000/explode"),
                  ("POST", "queue/0000000000000/hold/now"), ("GET", "queues"), ("POST", ""), ("GET", "queue/名前"),
                  ("POST", "queue/' OR 1=1 --"), ("POST", "queue/0000000000000/release/../../flush")]
FILTER_VALUES: dict[str, list[Any]] = {
    "domain": [*HOSTILE_STRINGS, 5, [], {"a": 1}, None, True],
    "sender": [*HOSTILE_STRINGS, 5, ["app@one.test"], None],
    "user": [*HOSTILE_STRINGS, 0, ["alice"], None],
    "older_than": [-1, -1e308, 1e300, 10**400, math.inf, -math.inf, math.nan, True, "3600", None, [], {}, "0"],
    "queue_ids": [["0000000000000"], ["%"], "0000000000000", [5], [None], [["0000000000000"]], 5, None,
                  ["' OR 1=1 --"], ["0000000000000"] * 600],
}


# Requests of a bulk verb that select nothing: never the whole queue (but for `flush`, where no filter is
# every deferred message, as `mailrelayd queue flush` documents). These released every hold.
EMPTY_BULK_BODIES: list[Any] = [
    None, {}, {"filter": {}}, {"filter": {}, "dry_run": False}, {"reason": "x"}, {"all": False},
    {"filter": {"queue_ids": []}}, {"filter": {"queue_ids": []}, "all": False},
    {"filter": {"queue_ids": []}, "dry_run": True, "all": False}]


def _queue_request(rng: random.Random) -> tuple[str, str, Any]:
    r = rng.random()
    if r < 0.1:
        method, path = rng.choice(UNKNOWN_ROUTES)
        return method, path, hostile(rng)
    if r < 0.25:
        limit = {"limit": rng.choice([*HOSTILE_NUMBERS, "10", None, [], {}])}
        return "GET", "queue", limit if rng.random() < 0.8 else hostile(rng)
    verb = rng.choice(["hold", "release", "flush", "delete", "bounce"])
    if r < 0.35:  # not a JSON object, or nothing to select by (no body, or {}, is `queue flush`: everything)
        body = rng.choice([[], [{"filter": {}}], "all", 5, 1.5, True, hostile(rng), *EMPTY_BULK_BODIES])
        return "POST", f"queue/{verb}", [] if verb == "flush" and body in EMPTY_BULK_BODIES else body
    filt: dict[str, Any] = {}
    for key in rng.sample([*FILTER_VALUES, "domian", "Domain", "sender "], rng.randint(1, 3)):
        filt[key] = rng.choice(FILTER_VALUES.get(key, HOSTILE_STRINGS))
    other = hostile(rng)
    body = {"filter": filt if rng.random() < 0.9 else other if other != {} or verb != "flush" else []}
    for key in rng.sample(["dry_run", "reason", "until", "filtre", "limit"], rng.randint(0, 2)):
        body[key] = rng.choice({"dry_run": ["false", 0, 1, None, "yes", []], "reason": [*HOSTILE_STRINGS, 5, {}],
                                "until": [*HOSTILE_NUMBERS, "tomorrow", None]}.get(key, [1, {"domain": "x"}]))
    return "POST", f"queue/{verb}", body


async def test_queue_verbs_fuzz(cfg: Config, spool: Spool) -> None:
    rng = random.Random(4242)
    qids = await _seed(spool)
    qm = QueueManager(cfg, spool, dsn_builder=build_dsn)
    await qm.load()
    ops = QueueOps(spool, None, qm)
    before = await _snapshot(spool, qm)
    started = time.monotonic()
    for i in range(300):
        method, path, body = _queue_request(rng)
        case = f"case {i}: {method} {path} {str(body)[:200]}"
        status, result = await _bounded(ops.handle(method, path, body), case)
        json.dumps(result, allow_nan=False)  # the socket answers JSON: no NaN, nothing unserialisable
        if status != 200:
            assert 400 <= status < 500, f"{case}: {status} {result}"
            assert isinstance(result, dict) and isinstance(result.get("error"), str) and result["error"], case
        # None of it selects the seeded mail: nothing held, released, rescheduled, deleted or bounced.
        assert await _snapshot(spool, qm) == before, case
    assert time.monotonic() - started < 4.0

    # Each defect alone: a 4xx naming the field (these were exceptions, or whole-queue operations).
    for method, path, body, field in [
        ("GET", "queue", {"limit": "abc"}, "limit"), ("GET", "queue", {"limit": -1}, "limit"),
        ("GET", "queue", {"limit": 10**30}, "limit"), ("GET", "queue", {"limit": math.nan}, "limit"),
        ("POST", "queue/release", {"filter": "x"}, "filter"), ("POST", "queue/release", {"filter": [1]}, "filter"),
        ("POST", "queue/hold", {"filter": {"domain": 5}}, "domain"),
        ("POST", "queue/hold", {"filter": {"domain": "\ud800"}}, "domain"),
        ("POST", "queue/release", {"filter": {"domian": "dest-one.test"}}, "domian"),
        ("POST", "queue/flush", {"filter": {"domian": "dest-one.test"}}, "domian"),
        ("POST", "queue/release", {"filtre": {"domain": "dest-one.test"}}, "filtre"),
        ("POST", "queue/release", {"filter": {"domain": "  "}}, "domain"),
        ("POST", "queue/flush", {"filter": {"domain": "."}}, "domain"),
        ("POST", "queue/flush", {"filter": {"user": " "}}, "user"),
        ("POST", "queue/hold", {"filter": {"domain": "x.test"}, "until": math.nan}, "until"),
        ("POST", "queue/hold", {"filter": {"older_than": 10**400}}, "older_than"),
        ("POST", "queue/delete", {"filter": {"older_than": -1}}, "older_than"),
        ("POST", "queue/hold", {"filter": {"domain": "y.test"}, "reason": {"a": 1}}, "reason"),
        ("POST", "queue/hold", {"filter": {"domain": "y.test"}, "dry_run": "false"}, "dry_run"),
        ("POST", "queue/release", {"filter": {"queue_ids": "0000000000000"}}, "queue_ids"),
        ("POST", f"queue/{qids[0]}/hold", {"reason": [1]}, "reason"),
        ("POST", "queue/flush", [1], "body"), ("POST", "queue/release", "everything", "body"),
    ]:
        status, result = await ops.handle(method, path, body)
        assert status == 400 and field in result["error"], (method, path, body, result)
    assert await _snapshot(spool, qm) == before

    # What the CLI sends still works.
    status, res = await ops.handle("POST", "queue/hold", {"filter": {"domain": "DEST-ONE.test.", "queue_ids": []},
                                                          "dry_run": True, "reason": ""})
    assert (status, res["messages"]) == (200, 1), res
    status, res = await ops.handle("POST", "queue/hold", {"filter": {"queue_ids": [qids[1].lower()]}, "reason": "x"})
    assert (status, res["messages"]) == (200, 1), res
    status, res = await ops.handle("POST", "queue/release", {"filter": {"queue_ids": []}, "dry_run": False,
                                                             "all": True})
    assert (status, res["messages"]) == (200, 1), res  # `queue release --all`
    status, res = await ops.handle("GET", "queue", {"limit": 2})
    assert status == 200 and len(res) == 2
    status, res = await ops.handle("GET", "queue", None)
    assert status == 200 and len(res) == 3
    status, res = await ops.handle("POST", "queue/flush", {})
    assert status == 200 and res["rescheduled"] == 3  # the 0.1 API: flush everything


async def test_bulk_verbs_need_a_filter_or_an_explicit_all(cfg: Config, spool: Spool) -> None:
    """`POST queue/release` with no filter, or an empty one, released every hold (the CLI asks for
    --all): now it needs "all": true, and hold, delete and bounce never apply to the whole queue."""
    qids = await _seed(spool)
    qm = QueueManager(cfg, spool, dsn_builder=build_dsn)
    await qm.load()
    ops = QueueOps(spool, None, qm)
    status, res = await ops.handle("POST", "queue/hold", {"filter": {"domain": "dest-one.test"}})
    assert (status, res["messages"]) == (200, 1), res
    status, res = await ops.handle("POST", "queue/hold", {"filter": {"queue_ids": [qids[1]]}})
    assert (status, res["messages"]) == (200, 1), res
    held = await _snapshot(spool, qm)
    for verb in ("release", "hold", "delete", "bounce"):
        for body in EMPTY_BULK_BODIES:
            status, res = await ops.handle("POST", f"queue/{verb}", body)
            assert status == 400 and f"queue {verb} needs a filter" in res["error"], (verb, body, res)
            assert ('"all": true' in res["error"]) == (verb == "release"), res  # what would do it
    for verb in ("hold", "delete", "bounce"):
        status, res = await ops.handle("POST", f"queue/{verb}", {"all": True})
        assert status == 400 and "cannot apply to the whole queue" in res["error"], (verb, res)
    status, res = await ops.handle("POST", "queue/release", {"all": True, "filter": {"domain": "dest-one.test"}})
    assert status == 400 and "one or the other" in res["error"], res
    for value in ("yes", 1, None, [], {"all": True}):
        status, res = await ops.handle("POST", "queue/release", {"filter": {"queue_ids": []}, "all": value})
        assert status == 400 and res["error"] == "all must be true or false", res
    assert await _snapshot(spool, qm) == held  # nothing released, deleted or bounced
    with pytest.raises(ValueError, match="needs a filter"):  # nor through the method the handler calls
        await ops.bulk("release", QueueFilter())

    status, res = await ops.handle("POST", "queue/release", {"all": True, "dry_run": True})
    assert (status, res["messages"], res["dry_run"]) == (200, 2, True), res
    assert await _snapshot(spool, qm) == held
    status, res = await ops.handle("POST", "queue/release", {"all": True})
    assert (status, res["messages"], len(res["rules"])) == (200, 2, 1), res
    assert not any(h for m in await _snapshot(spool, qm) for *_, h in m[2])
    # What `mailrelayd queue release --all` sends: an empty filter, and "all": true.
    await ops.handle("POST", "queue/hold", {"filter": {"queue_ids": [qids[2]]}})
    status, res = await ops.handle("POST", "queue/release", {"filter": {"queue_ids": []}, "dry_run": False,
                                                             "reason": "", "all": True})
    assert (status, res["messages"]) == (200, 1), res
    # flush with no filter is every deferred message, as documented.
    status, res = await ops.handle("POST", "queue/flush", {"filter": {}, "dry_run": True})
    assert (status, res["messages"]) == (200, 3), res
    status, res = await ops.handle("POST", "queue/flush", {"all": True, "dry_run": True})
    assert (status, res["messages"]) == (200, 3), res


def _history_body(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return hostile(rng)
    body: dict[str, Any] = {}
    for k in rng.sample(["message_id", "rcpt", "sender", "user", "since", "limit", "bogus", "LIMIT", "rcpt "],
                        rng.randint(1, 3)):
        if k in ("since", "limit"):
            body[k] = rng.choice([*HOSTILE_NUMBERS, "1", None, [], 1, 10_000, 10_001])
        else:
            body[k] = rng.choice([*HOSTILE_STRINGS, 5, None, ["x"], {"$ne": ""}])
    return body


async def test_history_query_fuzz(spool: Spool) -> None:
    rng = random.Random(31337)
    await _seed(spool)
    started = time.monotonic()
    for i in range(300):
        body = _history_body(rng)
        case = f"case {i}: {str(body)[:200]}"
        status, result = await _bounded(history.handle(spool, body), case)
        json.dumps(result, allow_nan=False)
        if status != 200:
            assert status == 400 and isinstance(result["error"], str) and result["error"], f"{case}: {result}"
            continue
        assert isinstance(result, list), case
        limit = body.get("limit", 1000) if isinstance(body, dict) else 1000
        assert len(result) <= limit, case
        if isinstance(body, dict) and any(body.get(k) is not None for k in ("message_id", "rcpt", "sender", "user")):
            assert result == [], f"{case}: a filter that matches nothing returned {len(result)} records"
    assert time.monotonic() - started < 3.0

    for body, field in [([1, "a"], "object"), ([[1]], "object"), (5, "object"), ("rcpt", "object"),
                        ({"since": 10**400}, "since"), ({"since": math.nan}, "since"), ({"since": -math.inf}, "since"),
                        ({"rcpt": "\ud800"}, "rcpt"), ({"user": "\udcff"}, "user"), ({"limit": -1}, "limit"),
                        ({"sender": "%", "bogus": 1}, "bogus")]:
        status, result = await history.handle(spool, body)
        assert status == 400 and field in result["error"], (body, result)
    status, rows = await history.handle(spool, {"rcpt": "R1@dest-one.test", "since": 0, "limit": 5})
    assert status == 200 and [r["recipient"] for r in rows] == ["r1@dest-one.test"]


# --- the sendmail front end: argv and standard input ----------------------------------------------
ARGV_TOKENS = ["-f", "-fapp@example.com", "app@example.com", "-r", "-t", "-i", "-oi", "-ti", "-it", "-vi", "-vt", "-v",
               "-F", "-FCron Daemon", "Cron\r\nBcc: x@y.test", "-bm", "-bp", "-bs", "-x", "-q", "-o", "-oem", "-odi",
               "-B8BITMIME", "-N", "never", "-C", "/etc/x.toml", "-h", "-X", "--", "-", "", "a@dest.test",
               "a@dest.test,,b@dest.test ,", "x\r\ny@dest.test", "nul\x00@dest.test", "\udcff@dest.test", "-tiv",
               "--verbose", "-f<>", "-F", "-é", "é@dest.test"]
FLAG_TOKENS = ["-t", "-i", "-oi", "-v", "-ti", "-it", "-vi", "-iv", "-vt", "-tv", "-tiv", "-vit", "-bm"]


def test_sendmail_argv_fuzz() -> None:
    rng = random.Random(5)
    for i in range(3000):
        argv = [rng.choice(ARGV_TOKENS) for _ in range(rng.randrange(8))]
        try:
            a = sm.parse_args(argv)
        except sm.UsageError as e:
            assert str(e), argv
            continue
        assert all(r and r == r.strip() and "," not in r for r in a.recipients), (i, argv, a.recipients)
        assert isinstance(a.extract, bool) and isinstance(a.dot_ends, bool), argv
    for i in range(500):  # flags alone, combined in any order: each letter counts wherever it is
        argv = [rng.choice(FLAG_TOKENS) for _ in range(rng.randint(1, 4))]
        a = sm.parse_args(argv)
        letters = "".join(t for t in argv if t not in ("-oi", "-bm")) + ("i" if "-oi" in argv else "")
        assert (a.extract, a.dot_ends) == ("t" in letters, "i" not in letters), (i, argv)


def _norm_lines(raw: bytes) -> list[bytes]:
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    lines = lines[:-1] if lines and lines[-1] == b"" else lines
    return lines[1:] if lines and lines[0].startswith(b"From ") else lines  # the mbox separator is dropped


def test_sendmail_stdin_fuzz() -> None:
    rng = random.Random(11)
    pieces = [b"Subject: x", b"", b".", b"..", b". ", b" .", b"\r", b"\n", b"\r\n", b"\xff\xfe\xe9", b"\x00", b"hello",
              b"From me", b"To: a@dest.test", b"\r\r\n", b"\n.\n", b".\r\n"]
    for i in range(1500):
        raw = b"".join(rng.choice(pieces) + rng.choice([b"\n", b"\r\n", b"\r", b""]) for _ in range(rng.randrange(10)))
        whole = sm.read_message(raw, dot_ends=False)
        cut = sm.read_message(raw, dot_ends=True)
        for out in (whole, cut):  # CRLF only, each line ended
            assert b"\r" not in out.replace(b"\r\n", b"") and b"\n" not in out.replace(b"\r\n", b""), (i, raw)
            assert out == b"" or out.endswith(b"\r\n"), (i, raw)
        assert whole.split(b"\r\n")[:-1] == _norm_lines(raw), (i, raw)  # 8-bit, NUL, dots: kept as they are
        kept = cut.split(b"\r\n")[:-1]
        assert b"." not in kept and _norm_lines(raw)[: len(kept)] == kept, (i, raw)
        assert len(kept) == len(_norm_lines(raw)) or _norm_lines(raw)[len(kept)] == b".", (i, raw)


HEADER_LINES = [b"Subject: hello", b"Subject: caf\xc3\xa9 \xff 8-bit", b"X-Null: a\x00b", b"Date: now",
                b"To: a@dest.test", b"To: \"Q\" <q@dest.test>, b@dest.test", b"To: undisclosed-recipients:;",
                b"Cc: bare", b"Cc: <>", b"Cc: a@b@c.test", b"Cc: \xc3\xa9@dest.test", b"Bcc: secret@dest.test",
                b"Resent-Bcc: r@dest.test", b"BCC: (c) s@dest.test", b"From: root", b"From: root (Cron Daemon)",
                b"From: app@example.com", b"From: \"A, B\" <ab@example.com>", b"From: \xc3\xa9@example.com",
                b"From: a@example.com, b", b"To: =?utf-8?q?x?= <d@dest.test>"]
BODY_LINES = [b"", b".", b"..", b"hello", b"From me", b"\xff\xfe 8-bit", b"Subject: looks like a header", b"\x00"]
RCPTS = ["a@dest.test", "b@dest.test", "bare", "", " ", "x\r\ny@dest.test", "nul\x00@dest.test", "é@dest.test",
         "<c@dest.test>", "\udcff@dest.test", "a@dest.test"]
SENDERS = [None, "", "app@example.com", "app", "<>", "x@example.com\r\nBcc: y@dest.test", "é@example.com", "\udcff",
           "a\x00b@example.com"]
FULL_NAMES = [None, "", "Cron Daemon", "René", "a\r\nBcc: evil@dest.test", "a\nb", "a\rb", "x\x00y", "\udcff",
              "tab\there", '"quoted"', "a\r\n\r\nbody", "\x7f", "Ann (admin)"]
_FIELD = re.compile(rb"^([!-9;-~]+):")


def _message(rng: random.Random) -> tuple[bytes, list[bytes], bytes]:
    """A CRLF message as read_message() gives it: (data, its header field names, its body)."""
    body = b"".join(rng.choice(BODY_LINES) + b"\r\n" for _ in range(rng.randrange(4)))
    mode = rng.randrange(5)
    if mode == 0:  # no header at all
        data = b"hello world\r\n" + body
        return data, [], data
    if mode == 1:
        return b"\r\n" + body, [], body
    if mode == 2:
        return b"", [], b""
    lines: list[bytes] = []
    for _ in range(rng.randint(1, 4)):
        lines.append(rng.choice(HEADER_LINES))
        if rng.random() < 0.2:
            lines.append(rng.choice([b" folded", b"\tmore"]))
    names = [m.group(1).lower() for ln in lines if (m := _FIELD.match(ln))]
    head = b"".join(ln + b"\r\n" for ln in lines)
    if mode == 3:  # header only, no blank line
        return head, names, b""
    return head + b"\r\n" + body, names, body


def test_sendmail_prepare_fuzz() -> None:
    rng = random.Random(2718)
    for i in range(2500):
        data, names, body = _message(rng)
        rcpts = [rng.choice(RCPTS) for _ in range(rng.randrange(3))]
        kw: dict[str, Any] = {"recipients": rcpts, "extract": rng.random() < 0.5, "sender": rng.choice(SENDERS),
                              "full_name": rng.choice(FULL_NAMES), "domain": "example.com",
                              "default_sender": rng.choice([None, "noreply@example.com"]),
                              "fallback_sender": "root@example.com"}
        case = f"case {i}: {data!r} {kw}"
        try:
            p = sm.prepare(data, **kw)
        except sm.PrepareError as e:
            assert str(e) and e.exit_code in (sm.EX_DATAERR, sm.EX_NOUSER, sm.EX_USAGE), case
            continue
        null = kw["sender"] is not None and sm.sender_value(kw["sender"]) == ""  # -f '' or -f '<>'
        # A -t entry without a readable address ("Cc: <>") stays, as written, to be refused and reported.
        assert bool(p.mail_from) != null and p.recipients and all(r for r in p.recipients), case
        assert kw["extract"] or all("@" in r for r in p.recipients), case
        if set(p.mail_from) & set("\r\n\0"):
            continue  # the From header written for it is broken, but the submitter refuses such a sender (553)
        assert len(set(p.recipients)) == len(p.recipients), case
        out_head, sep, out_body = p.data.partition(b"\r\n\r\n")
        assert sep and out_body == body, f"{case}: body changed: {p.data!r}"
        assert b"\r" not in out_head.replace(b"\r\n", b"") and b"\n" not in out_head.replace(b"\r\n", b""), case
        out_lines = out_head.split(b"\r\n")
        assert all(_FIELD.match(ln) or ln[:1] in (b" ", b"\t") for ln in out_lines), f"{case}: {p.data!r}"
        out_names = [m.group(1).lower() for ln in out_lines if (m := _FIELD.match(ln))]
        want = [n for n in names if n not in (b"bcc", b"resent-bcc")] + ([] if b"from" in names else [b"from"])
        assert sorted(out_names) == sorted(want), f"{case}: header fields {out_names} (injected?): {p.data!r}"
    # The cases found: a -F full name that ends the From header, and a non-ASCII sender with no From.
    for full_name in ("Cron\r\nBcc: evil@dest.test", "Cron\r\n\r\nbody", "a\nb", "x\x00y"):
        with pytest.raises(sm.PrepareError, match="full name"):
            sm.prepare(b"Subject: x\r\n\r\nhi\r\n", recipients=["a@dest.test"], extract=False, sender=None,
                       full_name=full_name, domain="example.com", default_sender=None, fallback_sender="root@ex.com")
    for sender, full_name in (("é@example.com", None), ("\udcff@example.com", None), ("a@example.com", "\udcff")):
        with pytest.raises(sm.PrepareError, match="From header"):
            sm.prepare(b"Subject: x\r\n\r\nhi\r\n", recipients=["a@dest.test"], extract=False, sender=sender,
                       full_name=full_name, domain="example.com", default_sender=None)
