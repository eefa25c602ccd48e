"""The ``mailrelayd`` command: every verb (run, check-config, init, user, dkim, queue, suppress,
feedback, doctor). Exit codes: 0 success, 1 a problem found (invalid config, message not found),
2 usage error or the check could not be made."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailrelayd import __version__

DEFAULT_CONFIG = "/etc/mailrelayd/mailrelayd.toml"


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("MAILRELAYD_CONFIG") or DEFAULT_CONFIG)


def _err(msg: str) -> None:
    print(f"mailrelayd: {msg}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Any:
    from mailrelayd.config import load_config

    return load_config(_config_path(args))


# --- run / check-config / init ----------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from mailrelayd.config import ConfigError
    from mailrelayd.daemon import SetupError, run_daemon

    try:
        return run_daemon(_config_path(args), log_format=args.log_format)
    except (ConfigError, SetupError) as e:
        _err(str(e))
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    from mailrelayd.config import ConfigError
    from mailrelayd.daemon import SetupError, check

    try:
        rt = check(_config_path(args))
    except (ConfigError, SetupError) as e:
        _err(str(e))
        return 1
    cfg = rt.cfg
    print(f"{cfg.source}: OK ({len(cfg.listeners)} listeners, {len(rt.users)} users, "
          f"{len(rt.dkim_keys)} DKIM keys)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from mailrelayd.devsetup import init_dev, swaks_submission

    try:
        setup = init_dev(Path(args.directory))
    except FileExistsError as e:
        _err(str(e))
        return 1
    print(f"Created a development set-up in {setup.directory}/")
    print(f"  config:   {setup.config}")
    print(f"  user:     {setup.user}")
    print(f"  password: {setup.password}    (printed once; stored only as a scrypt hash)")
    print(f"  DKIM TXT: {setup.dkim_txt}")
    print("Submit a test message (once the daemon runs):")
    print(f"  {swaks_submission(setup.user, setup.password)}")
    return 0


# --- users ------------------------------------------------------------------------------
def _users_file(args: argparse.Namespace) -> Path:
    if args.users_file:
        return Path(args.users_file)
    cfg = _load(args)
    if cfg.auth.users_file is None:
        raise SystemExit("mailrelayd: auth.users_file is not set in the config (or pass --users-file)")
    return cfg.auth.users_file


def _read_users(path: Path, replacing_allowed_from: str | None = None) -> dict[str, Any]:
    from mailrelayd.users import load_users

    return load_users(path, replacing_allowed_from=replacing_allowed_from) if path.exists() else {}


def _users_for_edit(args: argparse.Namespace) -> tuple[Path, dict[str, Any]] | None:
    """The users file and its users, for a `user` verb that edits them; None once the reason
    it cannot be read has been printed. A verb that replaces (or deletes) the allowed senders of
    the user it names may do so even when that user's patterns are broken: that is the repair."""
    from mailrelayd.users import UsersFileError

    path = _users_file(args)
    repairs = args.name if getattr(args, "allow_from", None) or args.func is cmd_user_del else None
    try:
        return path, _read_users(path, repairs)
    except UsersFileError as e:
        _err(str(e))
        return None


def _allow_from_arg(values: list[str]) -> tuple[str, ...] | None:
    """--allow-from patterns in their normal form; None once the bad one has been named."""
    from mailrelayd.users import sender_pattern

    try:
        return tuple(sender_pattern(v) for v in values)
    except ValueError as e:
        _err(f"--allow-from: {e}")
        return None


def _user_to_edit(args: argparse.Namespace, hint: str = "") -> tuple[Path, dict[str, Any], Any] | None:
    """The users file, its users and the one named ``args.name``; None (after a one-line error)
    when the file cannot be opened or has no such user."""
    opened = _users_for_edit(args)
    if opened is None:
        return None
    path, users = opened
    u = users.get(args.name)
    if u is None:
        _err(f"no user {args.name!r} in {path}{hint}")
        return None
    return path, users, u


def cmd_user_add(args: argparse.Namespace) -> int:
    import secrets as _secrets

    from mailrelayd.users import User, hash_password, save_users

    patterns = _allow_from_arg(args.allow_from)
    if patterns is None:
        return 2
    opened = _users_for_edit(args)
    if opened is None:
        return 1
    path, users = opened
    generated = False
    if sys.stdin.isatty():
        password = _secrets.token_urlsafe(18)
        generated = True
    else:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            _err("empty password on standard input")
            return 2
    old = users.get(args.name)
    allowed = patterns if patterns else (old.allowed_from if old else ())
    rate = _rate_arg(args.rate) if args.rate is not None else (old.rate if old else None)
    users[args.name] = User(args.name, hash_password(password), allowed, rate, old.api_keys if old else ())
    save_users(path, users)
    print(f"{'updated' if old else 'added'} user {args.name} in {path}; allowed senders: "
          f"{', '.join(allowed) or '(none: set --allow-from)'}")
    if generated:
        print(f"password: {password}    (printed once; run `mailrelayd user add {args.name}` again to change it)")
    print("Reload the daemon to apply: systemctl reload mailrelayd", file=sys.stderr)
    return 0


def _rate_arg(text: str) -> str | None:
    """--rate: "500/h" style, "default" (back to auth.default_rate) or "unlimited"."""
    from mailrelayd.ratelimit import parse_rate

    if text.strip().lower() == "default":
        return None
    try:
        rate = parse_rate(text)
    except ValueError as e:
        raise SystemExit(f"mailrelayd: --rate: {e}") from None
    return str(rate) if rate is not None else "unlimited"


def cmd_user_set(args: argparse.Namespace) -> int:
    import dataclasses

    from mailrelayd.users import save_users

    if args.rate is None and not args.allow_from:
        _err("nothing to change: give --rate and/or --allow-from")
        return 2
    patterns = _allow_from_arg(args.allow_from)
    if patterns is None:
        return 2
    rate = _rate_arg(args.rate) if args.rate is not None else None
    found = _user_to_edit(args, " (create it with `mailrelayd user add`)")
    if found is None:
        return 1
    path, users, u = found
    if args.rate is not None:
        u = dataclasses.replace(u, rate=rate)
    if patterns:
        u = dataclasses.replace(u, allowed_from=patterns)
    users[args.name] = u
    save_users(path, users)
    print(f"updated user {u.name}: rate {u.rate or 'default'}; allowed senders: {', '.join(u.allowed_from) or '-'}")
    print("Reload the daemon to apply: systemctl reload mailrelayd", file=sys.stderr)
    return 0


def cmd_user_apikey(args: argparse.Namespace) -> int:
    import dataclasses

    from mailrelayd.users import new_api_key, save_users

    found = _user_to_edit(args)
    if found is None:
        return 1
    path, users, u = found
    if args.revoke_all:
        users[args.name] = dataclasses.replace(u, api_keys=())
        save_users(path, users)
        print(f"revoked {len(u.api_keys)} API key(s) of {u.name}")
    else:
        key, stored = new_api_key()
        users[args.name] = dataclasses.replace(u, api_keys=(*u.api_keys, stored))
        save_users(path, users)
        print(f"API key for {u.name} (printed once; only its hash is stored):")
        print(key)
    print("Reload the daemon to apply: systemctl reload mailrelayd", file=sys.stderr)
    return 0


def cmd_user_del(args: argparse.Namespace) -> int:
    from mailrelayd.users import save_users

    found = _user_to_edit(args)
    if found is None:
        return 1
    path, users, _ = found
    del users[args.name]
    save_users(path, users)
    print(f"deleted user {args.name}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from mailrelayd.users import UsersFileError

    try:
        users = _read_users(_users_file(args))
    except UsersFileError as e:
        _err(str(e))
        return 1
    for u in sorted(users.values(), key=lambda u: u.name):
        extra = f"\trate {u.rate}" if u.rate else ""
        extra += f"\t{len(u.api_keys)} API key(s)" if u.api_keys else ""
        print(f"{u.name}\t{', '.join(u.allowed_from)}{extra}")
    return 0


# --- dkim -------------------------------------------------------------------------------
def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from mailrelayd.dkim import generate_key, txt_record, write_private_key

    path = Path(args.key_file or f"{args.domain}.{args.selector}.key")
    try:
        pem, pub = generate_key(args.algorithm, args.bits)
        write_private_key(path, pem, overwrite=args.force)
    except FileExistsError:
        _err(f"{path} exists (use --force to overwrite)")
        return 1
    except ValueError as e:
        _err(str(e))
        return 2
    print(f"; private key written to {path} (mode 0600). Publish this record, then add to the config:")
    print(f';   [[dkim]] domain = "{args.domain}" selector = "{args.selector}" key_file = "{path}" '
          f'algorithm = "{args.algorithm}"')
    print(txt_record(args.domain, args.selector, args.algorithm, pub))
    return 0


def cmd_dkim_check(args: argparse.Namespace) -> int:
    from mailrelayd.daemon import SetupError, build_runtime
    from mailrelayd.delivery.mx import make_resolver
    from mailrelayd.dkim import check_published

    cfg = _load(args)
    try:
        rt = build_runtime(cfg)
    except SetupError as e:
        _err(str(e))
        return 2
    keys = [k for k in rt.dkim_keys if k.domain == args.domain.lower().rstrip(".")
            and (args.selector is None or k.selector == args.selector)]
    if not keys:
        _err(f"no [[dkim]] key configured for {args.domain}" + (f" selector {args.selector}" if args.selector else ""))
        return 2
    resolver = make_resolver(cfg.dns)
    bad = 0
    for k in keys:
        ok, detail = asyncio.run(check_published(k.domain, k.selector, k, resolver))
        print(f"{k.selector}._domainkey.{k.domain}: {'OK' if ok else 'MISMATCH'}: {detail}")
        bad += not ok
    return 1 if bad else 0


# --- queue ------------------------------------------------------------------------------
def _admin_request(cfg: Any, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any] | None:
    """Call the running daemon's admin socket; None if no daemon answers."""
    import http.client
    import socket

    sock_path = str(cfg.admin_socket)

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(sock_path)
            self.sock = s

    try:
        conn = _Conn("localhost")
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, "/" + path, body=payload,
                     headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        raw = resp.read()
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        raise SystemExit(f"mailrelayd: permission denied on {sock_path} (run as root or the mailrelayd user)") \
            from None
    except (OSError, http.client.HTTPException) as e:
        raise SystemExit(f"mailrelayd: the daemon's admin socket {sock_path} failed: {e}") from None
    try:
        return resp.status, json.loads(raw or b"null")
    except ValueError:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return resp.status, {"error": f"the daemon answered {resp.status}: {text[0] if text else 'no body'}"}


async def _offline(cfg: Any, op: str, qid: str | None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """The same operations straight on the spool, when the daemon is not running."""
    from mailrelayd.delivery.dsn import build_dsn
    from mailrelayd.delivery.queuemanager import QueueManager
    from mailrelayd.log import configure_logging
    from mailrelayd.queueops import QueueOps

    # The queue manager logs what it does: to stderr, so stdout stays the command's answer.
    configure_logging("console", "warning", sys.stderr)
    from mailrelayd.spool.lock import SpoolLock, SpoolLockedError
    from mailrelayd.spool.store import Spool

    lock = SpoolLock(cfg.server.spool_dir)
    try:
        lock.acquire()
    except SpoolLockedError:
        # A daemon owns the spool but its admin socket did not answer: never edit under it.
        return 503, {"error": f"the daemon owns {cfg.server.spool_dir} but its admin socket "
                              f"{cfg.admin_socket} did not answer"}
    spool = Spool(cfg.server.spool_dir)
    await spool.open()
    try:
        qm = QueueManager(cfg, spool, dsn_builder=build_dsn)
        await qm.load()
        ops = QueueOps(spool, None, qm)
        if op == "list":
            return 200, await ops.list()
        if op == "destinations":
            return 200, await ops.destinations_stored()
        path = "queue" + (f"/{qid}" if qid else "") + ("" if op == "show" else f"/{op}")
        return await ops.handle("GET" if op == "show" else "POST", path, body or {})
    finally:
        await spool.close()
        lock.release()


def _queue_call(args: argparse.Namespace, op: str, qid: str | None = None,
                body: dict[str, Any] | None = None) -> tuple[int, Any]:
    from mailrelayd.spool.queueid import LENGTH, is_queue_id

    if qid is not None and not is_queue_id(qid.upper()):
        # Checked before it becomes part of a URL: "a b" must not reach http.client as a path.
        raise SystemExit(f"mailrelayd: {qid!r} is not a queue id ({LENGTH} letters and digits, "
                         "as `mailrelayd queue list` prints them)")
    cfg = _load(args)
    method = "GET" if op in ("list", "show", "destinations") else "POST"
    path = "queue" + (f"/{qid.upper()}" if qid else "") + ("" if op in ("list", "show") else f"/{op}")
    res = _admin_request(cfg, method, path, body)
    if res is None:
        if not cfg.server.spool_dir.exists():
            raise SystemExit(f"mailrelayd: no spool at {cfg.server.spool_dir}")
        res = asyncio.run(_offline(cfg, op, qid.upper() if qid else None, body))
    return res


def _age(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h, 2d."""
    s = int(seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def cmd_queue_list(args: argparse.Namespace) -> int:
    status, items = _queue_call(args, "list")
    if status != 200:
        _err(str(items))
        return 2
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print("queue is empty")
        return 0
    now = time.time()
    for m in items:
        nxt = m.get("next_attempt")
        when = "now" if nxt is not None and nxt <= now else (_age(nxt - now) if nxt else "-")
        print(f"{m['queue_id']}  age {_age(m['age_s'])}  {m['size']} bytes  from <{m['sender']}>  next in {when}")
        for r in m["recipients"]:
            extra = f"  ({r['last_reply']})" if r["last_reply"] else ""
            if r.get("destination") and r["destination"] != r["address"].rpartition("@")[2].lower():
                extra = f"  via {r['destination']}" + extra
            print(f"    {r['state']:<10} {r['address']}  attempts {r['attempts']}{extra}")
    print(f"-- {len(items)} message(s)")
    status, dests = _queue_call(args, "destinations")
    if status == 200 and isinstance(dests, dict) and (dests.get("holds") or dests.get("destinations")):
        _print_destinations(dests)
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    status, item = _queue_call(args, "show", args.queue_id)
    if status != 200:
        _err(item.get("error", str(item)) if isinstance(item, dict) else str(item))
        return 1
    print(json.dumps(item, indent=2))
    return 0


def _queue_action(args: argparse.Namespace, op: str) -> int:
    ids = list(getattr(args, "queue_ids", None) or [])
    bulk = bool(getattr(args, "domain", None) or getattr(args, "sender", None) or getattr(args, "user", None)
                or getattr(args, "older_than", None) or getattr(args, "dry_run", False) or len(ids) > 1
                or op in ("hold", "release") or (not ids and op != "flush"))
    if not bulk:  # one queue id (or `flush` of everything): the original single-message calls
        status, item = _queue_call(args, op, ids[0] if ids else None)
        if status != 200:
            _err(item.get("error", str(item)) if isinstance(item, dict) else str(item))
            return 1
        print(json.dumps(item))
        return 0
    from mailrelayd.config import normalize_destination, parse_duration
    from mailrelayd.reasons import reason_text
    from mailrelayd.spool.queueid import is_queue_id

    bad = [q for q in ids if not is_queue_id(q.upper())]
    if bad:
        _err(f"not a queue id: {bad[0]!r}")
        return 2
    filt: dict[str, Any] = {"queue_ids": [q.upper() for q in ids]}
    for key in ("domain", "sender", "user"):
        if getattr(args, key, None):
            filt[key] = getattr(args, key)
    try:
        if "domain" in filt and op != "release":  # release still lifts a bad rule an older version stored
            filt["domain"] = normalize_destination(filt["domain"])
    except ValueError:
        _err(f"--domain: {args.domain!r} is not a domain name (like example.com) nor an MX suffix (like .google.com)")
        return 2
    try:
        reason = reason_text(getattr(args, "reason", None) or "")
    except ValueError as e:
        _err(f"--reason: {e}")
        return 2
    try:
        if getattr(args, "older_than", None):
            filt["older_than"] = parse_duration(args.older_than)
        hold_for = parse_duration(args.hold_for) if getattr(args, "hold_for", None) else None
    except ValueError as e:
        _err(str(e))
        return 2
    empty = len(filt) == 1 and not ids
    if empty and op in ("hold", "delete", "bounce"):
        _err(f"queue {op} needs queue ids or a filter (--domain, --sender, --user, --older-than)")
        return 2
    if empty and op == "release" and not getattr(args, "all", False):
        _err("queue release needs queue ids, a filter (--domain, --sender, --user, --older-than) or --all")
        return 2
    body: dict[str, Any] = {"filter": filt, "dry_run": bool(getattr(args, "dry_run", False)),
                            "reason": reason}
    if empty and op == "release":
        body["all"] = True  # the admin API takes an empty filter for everything only when told so
    if hold_for:
        body["until"] = time.time() + hold_for
    status, item = _queue_call(args, op, None, body)
    if status != 200:
        _err(item.get("error", str(item)) if isinstance(item, dict) else str(item))
        return 1
    if getattr(args, "json", False):
        print(json.dumps(item))
        return 0
    past = {"hold": "held", "release": "released", "flush": "flushed", "delete": "deleted", "bounce": "bounced"}
    verb = f"would {op}" if item.get("dry_run") else past[op]
    print(f"{verb} {item['messages']} message(s), {item['recipients']} recipient(s)")
    for r in item.get("rules") or []:
        until = dt.datetime.fromtimestamp(r["until"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") \
            if r.get("until") else "until released"
        action = "rule removed" if op == "release" else "rule"
        print(f"  {action}: {r['kind']} {r['value']} ({until}){': ' + r['reason'] if r.get('reason') else ''}")
    for name in item.get("resumed") or []:
        print(f"  {'would lift' if item.get('dry_run') else 'lifted'} the suspension of {name}")
    busy = item.get("in_flight") or 0
    if busy:
        print(f"  {busy} message(s) being delivered right now {'would be' if item.get('dry_run') else 'were'} "
              f"left alone (they may arrive); run the command again when their attempt ends")
        return 0 if item.get("dry_run") else 1
    return 0


def cmd_queue_destinations(args: argparse.Namespace) -> int:
    status, item = _queue_call(args, "destinations")
    if status != 200:
        _err(item.get("error", str(item)) if isinstance(item, dict) else str(item))
        return 2
    if args.json:
        print(json.dumps(item, indent=2))
        return 0
    _print_destinations(item)
    return 0


def _print_destinations(item: dict[str, Any]) -> None:
    now = time.time()
    for h in item.get("holds") or []:
        until = f" for {_age(h['until'] - now)}" if h.get("until") else ""
        print(f"hold   {h['kind']} {h['value']}{until}{'  (' + h['reason'] + ')' if h.get('reason') else ''}")
    for d in item.get("destinations") or []:
        flags = []
        if d.get("held"):
            flags.append("held")
        if d.get("suspended_until"):
            flags.append(f"suspended {_age(d['suspended_until'] - now)} more ({d.get('suspend_reply') or ''})")
        rate = f", max {d['max_rate_per_s']}/s" if d.get("max_rate_per_s") else ""
        print(f"dest   {d['destination']}  {d.get('active', 0)}/{d.get('max_connections', '-')} connections, "
              f"{d.get('waiting', 0)} waiting{rate}{'  ' + '; '.join(flags) if flags else ''}")


# --- suppressions -----------------------------------------------------------------------
def _quiet_logs() -> None:
    """The store's own log lines (connect, schema) stay off stdout, which carries lists and CSV."""
    from mailrelayd.log import configure_logging

    configure_logging("console", "warning", stream=sys.stderr)


def _store(args: argparse.Namespace) -> Any:
    """The store the config names: the local SQLite file or the shared PostgreSQL database."""
    from mailrelayd.feedback.store import StoreUnavailableError, open_store

    cfg = _load(args)
    cfg.server.state_dir.mkdir(parents=True, exist_ok=True)
    _quiet_logs()
    try:
        return open_store(cfg.feedback, cfg.server.state_dir, daemon=False)
    except (StoreUnavailableError, RuntimeError, OSError) as e:
        _err(f"feedback.store: {e}")
        raise SystemExit(2) from None


def _parse_since(text: str | None) -> float | None:
    if text is None:
        return None
    from mailrelayd.config import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        raise SystemExit(f"mailrelayd: --since takes a duration like 1d or a date like 2026-11-01, not {text!r}") \
            from None


def cmd_suppress_list(args: argparse.Namespace) -> int:
    with contextlib.closing(_store(args)) as st:
        rows = st.list(kind=args.kind, since=_parse_since(args.since))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    for r in rows:
        seen = dt.datetime.fromtimestamp(r.last_seen, dt.UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{r.address}\t{r.kind}\t{r.source}\t{seen}\tx{r.count}\t{r.reason}")
    if not rows:
        print("no suppressions", file=sys.stderr)
    return 0


def cmd_suppress_add(args: argparse.Namespace) -> int:
    from mailrelayd.reasons import reason_text

    try:
        reason = reason_text(args.reason)
    except ValueError as e:
        _err(f"--reason: {e}")
        return 2
    with contextlib.closing(_store(args)) as st:
        try:
            new = st.add(args.address, reason)
        except ValueError as e:
            _err(str(e))
            return 2
    print(f"{'suppressed' if new else 'already suppressed'}: {args.address}")
    return 0


def cmd_suppress_remove(args: argparse.Namespace) -> int:
    with contextlib.closing(_store(args)) as st:
        ok = st.remove(args.address)
    if not ok:
        _err(f"{args.address} is not suppressed")
        return 1
    print(f"removed: {args.address}")
    return 0


def cmd_suppress_import(args: argparse.Namespace) -> int:
    with contextlib.closing(_store(args)) as st, open(args.file, newline="", encoding="utf-8") as f:
        try:
            n = st.import_csv(f)
        except ValueError as e:
            _err(f"{args.file}: {e}")
            return 1
    print(f"imported {n} address(es)")
    return 0


def cmd_suppress_export(args: argparse.Namespace) -> int:
    with contextlib.closing(_store(args)) as st:
        st.export_csv(sys.stdout)
    return 0


def cmd_suppress_migrate(args: argparse.Namespace) -> int:
    """Copy this node's SQLite list (and its soft-bounce counts) into a PostgreSQL store."""
    import dataclasses
    import sqlite3

    from mailrelayd.config import parse_store_url
    from mailrelayd.feedback.store import SqliteSuppressionStore, StoreUnavailableError, open_store

    cfg = _load(args)
    try:
        url = parse_store_url(args.to)
    except ValueError as e:
        _err(f"--to: {e}")
        return 2
    source = cfg.server.state_dir / "suppressions.db"
    if not source.is_file():
        _err(f"no SQLite suppression list at {source}")
        return 1
    fb = dataclasses.replace(cfg.feedback, store=url, store_password_file=Path(args.password_file)
                             if args.password_file else cfg.feedback.store_password_file)
    with contextlib.closing(SqliteSuppressionStore(source)) as local:
        rows = local.list()
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as db:
        soft = [tuple(r) for r in db.execute("SELECT address, reason, source, queue_id, seen FROM soft_bounces")]
    _quiet_logs()
    try:
        target = open_store(fb, cfg.server.state_dir, daemon=False)
    except (StoreUnavailableError, RuntimeError, OSError) as e:
        _err(f"--to: {e}")
        return 2
    with contextlib.closing(target):
        try:
            n = target.copy_from(rows, soft)  # type: ignore[attr-defined]
        except StoreUnavailableError as e:
            _err(str(e))
            return 2
    print(f"copied {n} suppression(s) and {len(soft)} soft bounce(s) from {source} to PostgreSQL")
    print('Now set [feedback] store to that URL on every node and restart them.', file=sys.stderr)
    return 0


# --- store ------------------------------------------------------------------------------
def _store_settings(args: argparse.Namespace) -> Any:
    """PgSettings of ``--url`` (password from ``--password-file`` or PGPASSFILE / ~/.pgpass: the
    owner's, not the nodes'), or else of the config's ``[feedback] store``. Exits 2 when neither."""
    from mailrelayd.config import parse_store_url
    from mailrelayd.pg import PgSettings

    password_file = Path(args.password_file) if args.password_file else None
    if args.url:
        try:
            return PgSettings(parse_store_url(args.url), password_file)
        except ValueError as e:
            _err(f"--url: {e}")
            raise SystemExit(2) from None
    fb = _load(args).feedback
    if fb.store == "sqlite":
        _err("[feedback] store is the local SQLite file: there is no shared schema to migrate (see --url)")
        raise SystemExit(2)
    return PgSettings(fb.store, password_file or fb.store_password_file, timeout=fb.store_connect_timeout)


def cmd_store_migrate(args: argparse.Namespace) -> int:
    """Create or migrate the shared PostgreSQL schema, as a role that may (the database owner)."""
    import asyncpg

    from mailrelayd.pg import CONNECTION_ERRORS, SCHEMA_VERSION, MigrationRefused, SchemaTooNew, migrate_store

    settings = _store_settings(args)
    _quiet_logs()
    try:
        before = migrate_store(settings)
    except (SchemaTooNew, MigrationRefused) as e:
        _err(f"{settings.where}: {e}")
        return 2
    except CONNECTION_ERRORS as e:
        _err(f"PostgreSQL at {settings.where} is unreachable: {type(e).__name__}: {e}")
        return 2
    except asyncpg.PostgresError as e:
        _err(f"PostgreSQL at {settings.where} refused: {type(e).__name__}: {e}")
        return 2
    except (OSError, UnicodeDecodeError) as e:  # the password file
        _err(f"password file: {e}")
        return 2
    if before == SCHEMA_VERSION:
        print(f"{settings.where}: schema already at version {SCHEMA_VERSION}")
    else:
        print(f"{settings.where}: schema migrated from version {before} to {SCHEMA_VERSION}")
    return 0


# --- sendmail ---------------------------------------------------------------------------
def _admin_post(sock_path: str, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    """POST to the admin socket. Raises OSError when it cannot be reached (or times out)."""
    import http.client
    import socket

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(sock_path)
            self.sock = s

    conn = _Conn("localhost")
    try:
        conn.request("POST", "/" + path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    except (http.client.HTTPException, ValueError) as e:
        raise OSError(f"bad answer from the daemon: {e}") from None
    finally:
        conn.close()


def cmd_sendmail(argv: Sequence[str]) -> int:
    """sendmail(1) compatible submission. Exit codes from sysexits.h: 0 once the message is durable
    (in the spool, or in the maildrop while the daemon is down), 75 when it cannot be queued now."""
    import base64
    import getpass

    from mailrelayd import sendmail as sm
    from mailrelayd.config import ConfigError, load_config
    from mailrelayd.longlines import MAX_LINE, fit_long_lines

    def fail(code: int, msg: str) -> int:
        print(f"sendmail: {msg}", file=sys.stderr)
        return code

    try:
        args = sm.parse_args(argv)
    except sm.UsageError as e:
        return fail(sm.EX_USAGE, str(e))
    raw = sys.stdin.buffer.read()
    data = sm.read_message(raw, args.dot_ends)
    path = Path(args.config or os.environ.get("MAILRELAYD_CONFIG") or DEFAULT_CONFIG)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        return fail(sm.EX_TEMPFAIL, f"cannot read the mailrelayd config, message not sent: {e}")
    # Long lines (cron output) are folded or encoded here, as Postfix's sendmail accepts them: SMTP's
    # own limit (limits.max_line_length) stays for everything else.
    data = fit_long_lines(data, min(MAX_LINE, cfg.limits.max_line_length - 2))
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = str(os.getuid())
    request = {**args.request(data, login), "data": base64.b64encode(data).decode()}
    try:
        status, result = _admin_post(str(cfg.admin_socket), "sendmail", request, timeout=120)
    except OSError as e:
        reason = f"daemon not reachable at {cfg.admin_socket} ({type(e).__name__})"
    else:
        if status == 200:
            for r in result.get("refused") or []:
                print(f"sendmail: {r['recipient']}: {r['code']} {r['enhanced']} {r['message']}", file=sys.stderr)
            return 0
        if not isinstance(result, dict):
            return fail(sm.EX_TEMPFAIL, f"unexpected answer from the daemon (HTTP {status}), message not sent")
        return fail(int(result.get("exit", sm.EX_TEMPFAIL)), f"{result.get('error', status)} (message not sent)")
    # No daemon: check what can be checked here, then leave it in the maildrop (picked up on start).
    from mailrelayd.maildrop import ensure_dir, write_drop
    from mailrelayd.smtp.address import AddressError
    from mailrelayd.submit import content_refusal, plain_mailbox

    domain = cfg.sendmail.domain or cfg.server.hostname
    try:
        p = sm.prepare(data, recipients=args.recipients, extract=args.extract, sender=args.sender,
                       full_name=args.full_name, domain=domain, default_sender=cfg.sendmail.default_from,
                       fallback_sender=f"{login}@{domain}")
    except sm.PrepareError as e:
        return fail(e.exit_code, str(e))
    # What the daemon would refuse at pickup whoever sends it (syntax, size, NUL, line length) is
    # refused now, with the same words, rather than accepted and set aside in maildrop/failed/.
    refusal = content_refusal(p.data, cfg.limits)
    if refusal is not None:
        return fail(sm.EX_DATAERR, f"{refusal.code} {refusal.enhanced} {refusal.text} (message not sent)")
    try:
        plain_mailbox(p.mail_from)
    except AddressError as e:
        return fail(sm.EX_DATAERR, f"bad sender address {p.mail_from[:100]!r}: {e} (message not sent)")
    bad = []
    for r in p.recipients:
        try:
            plain_mailbox(r)
        except AddressError as e:
            bad.append(f"{r[:100]!r}: {e}")
    if bad and len(bad) == len(p.recipients):
        return fail(sm.EX_NOUSER, f"no valid recipient: {'; '.join(bad[:5])} (message not sent)")
    for line in bad:
        print(f"sendmail: bad recipient address {line}", file=sys.stderr)
    try:
        if not cfg.maildrop_dir.is_dir():  # first use before the daemon ever ran (root, or its group)
            ensure_dir(cfg.maildrop_dir)
        where = write_drop(cfg.maildrop_dir, request)
    except OSError as e:
        return fail(sm.EX_TEMPFAIL, f"{reason}, and cannot write to the maildrop {cfg.maildrop_dir}: "
                    f"{e.strerror or e}; message not sent")
    print(f"sendmail: {reason}; message left in {where.parent} for delivery when the daemon starts",
          file=sys.stderr)
    return 0


# --- history ----------------------------------------------------------------------------
async def _history_offline(cfg: Any, query: dict[str, Any]) -> tuple[int, Any]:
    from mailrelayd import history
    from mailrelayd.spool.lock import SpoolLock, SpoolLockedError
    from mailrelayd.spool.store import Spool

    lock = SpoolLock(cfg.server.spool_dir)
    try:
        lock.acquire()
    except SpoolLockedError:
        return 503, {"error": f"the daemon owns {cfg.server.spool_dir} but its admin socket "
                              f"{cfg.admin_socket} did not answer"}
    spool = Spool(cfg.server.spool_dir)
    await spool.open()
    try:
        return await history.handle(spool, query)
    finally:
        await spool.close()
        lock.release()


def cmd_history(args: argparse.Namespace) -> int:
    cfg = _load(args)
    query: dict[str, Any] = {"limit": args.limit}
    for k in ("message_id", "rcpt", "sender", "user"):
        if getattr(args, k):
            query[k] = getattr(args, k)
    since = _parse_since(args.since)
    if since is not None:
        query["since"] = since
    res = _admin_request(cfg, "POST", "history", query)
    if res is None:
        if not cfg.server.spool_dir.exists():
            raise SystemExit(f"mailrelayd: no spool at {cfg.server.spool_dir}")
        res = asyncio.run(_history_offline(cfg, query))
    status, rows = res
    if status != 200:
        _err(rows.get("error", str(rows)) if isinstance(rows, dict) else str(rows))
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        reply = f"  ({r['last_reply']})" if r["last_reply"] else ""
        print(f"{r['time']}  {r['queue_id']}  {r['state']:<10} {r['recipient']}  from <{r['sender']}>  "
              f"{r['message_id'] or '-'}  user {r['user'] or '-'}{reply}")
    if not rows:
        print("no matching messages", file=sys.stderr)
        return 1
    return 0


# --- feedback ---------------------------------------------------------------------------
def cmd_feedback_parse(args: argparse.Namespace) -> int:
    from mailrelayd.feedback.parse import parse_feedback

    out = []
    for name in args.files:
        try:
            raw = Path(name).read_bytes()
        except OSError as e:
            _err(f"{name}: {e.strerror}")
            return 2
        rep = parse_feedback(raw)
        out.append({"file": name, "kind": rep.kind, "feedback_type": rep.feedback_type,
                    "recipients": [{"address": r.address, "kind": r.kind, "status": r.status, "reason": r.reason}
                                   for r in rep.recipients]})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for item in out:
            print(f"{item['file']}: {item['kind']}")
            for r in item["recipients"]:
                # Trust (VERP token, sent-to history, listed reporters) is decided by the daemon.
                verdict = {"hard_bounce": "suppress", "complaint": "suppress", "soft_bounce": "record"}.get(
                    r["kind"], "no-action")
                print(f"    {verdict:<8} {r['address']}  {r['kind']}  {r['status'] or '-'}  {r['reason']}")
    return 0


# --- backup / restore -------------------------------------------------------------------
def cmd_backup(args: argparse.Namespace) -> int:
    from mailrelayd.spool.backup import BackupError, backup

    cfg = _load(args)
    try:
        res = backup(cfg, Path(args.directory))
    except BackupError as e:
        _err(str(e))
        return 1
    files = ", ".join(f"{n} ({size} bytes)" for n, size in res.files.items())
    print(f"backed up {res.messages} queued message(s) to {res.directory}: {files} in {res.seconds:.1f}s")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from mailrelayd.spool.backup import BackupError, restore

    cfg = _load(args)
    try:
        res = restore(cfg, Path(args.directory), force=args.force)
    except BackupError as e:
        _err(str(e))
        return 1
    for name, path in res.installed.items():
        print(f"restored {name} -> {path}")
    for p in res.moved_aside:
        print(f"previous file kept as {p}")
    print(f"{res.messages} queued message(s); start the daemon to deliver them "
          "(messages delivered after the backup was taken are delivered again)")
    return 0


# --- doctor -----------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from mailrelayd.doctor import run_doctor

    return run_doctor(args)


# --- tlsrpt -----------------------------------------------------------------------------
def cmd_tlsrpt_show(args: argparse.Namespace) -> int:
    """The TLS-RPT reports (RFC 8460) the daemon would send: every recorded day not sent yet."""
    from mailrelayd.delivery import tlsrpt

    cfg = _load(args)
    org, contact, submitter = tlsrpt.report_identity(cfg)
    directory = cfg.server.state_dir / "tlsrpt"
    out = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        day = path.stem
        reports = tlsrpt.build_reports(tlsrpt.load_day(path) or [], day, organization=org, contact=contact,
                                       submitter=submitter)
        out.extend({"day": day, "policy-domain": d, "filename": tlsrpt.report_filename(submitter, d, day),
                    "report": r} for d, r in reports.items())
    if args.json:
        print(json.dumps({"enabled": cfg.tls_rpt.enabled, "reports": out}, indent=2))
        return 0
    if not cfg.tls_rpt.enabled:
        print("[tls_rpt] enabled = false: nothing is recorded or sent")
    for item in out:
        for pol in item["report"]["policies"]:
            s = pol["summary"]
            print(f"{item['day']}  {item['policy-domain']:<30} {pol['policy']['policy-type']:<16} "
                  f"ok {s['total-successful-session-count']:<6} failed {s['total-failure-session-count']}")
            for f in pol.get("failure-details", []):
                print(f"    {f['result-type']:<26} {f.get('receiving-mx-hostname', '-')} {f['failed-session-count']}")
    return 0


# --- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailrelayd", description="SMTP relay daemon: submission, DKIM signing, "
                                "durable spool, MX delivery, bounce and complaint handling.")
    p.add_argument("--version", action="version", version=f"mailrelayd {__version__}")
    cfg_help = f"config file (default: $MAILRELAYD_CONFIG, then {DEFAULT_CONFIG})"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=cfg_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    s.add_argument("--log-format", choices=("json", "console"), help="override [logging] format")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("check-config", parents=[common], help="validate the config and every file it names")
    s.set_defaults(func=cmd_check_config)
    s = sub.add_parser("init", help="create a development set-up (config, certificate, user, DKIM key)")
    s.add_argument("directory")
    s.set_defaults(func=cmd_init)

    u = sub.add_parser("user", help="manage submission users").add_subparsers(dest="sub", required=True)
    ucommon = argparse.ArgumentParser(add_help=False, parents=[common])
    ucommon.add_argument("--users-file", help="users file (default: [auth] users_file of the config)")
    s = u.add_parser("add", parents=[ucommon], help="add a user or change their password "
                     "(password: first line of stdin, or generated and printed when stdin is a terminal)")
    s.add_argument("name")
    s.add_argument("--allow-from", action="append", default=[], metavar="PATTERN",
                   help="allowed sender: \"@example.com\" (any address at that domain) or a whole address; repeat")
    s.add_argument("--rate", metavar="N/PERIOD", help="sending limit: 500/h, 20/min, 5000/d, unlimited, or default "
                   "([auth] default_rate)")
    s.set_defaults(func=cmd_user_add)
    s = u.add_parser("set", parents=[ucommon], help="change a user's sending rate or allowed senders")
    s.add_argument("name")
    s.add_argument("--rate", metavar="N/PERIOD", help="500/h, 20/min, 5000/d, unlimited, or default")
    s.add_argument("--allow-from", action="append", default=[], metavar="PATTERN",
                   help="replace the allowed senders (repeat)")
    s.set_defaults(func=cmd_user_set)
    s = u.add_parser("apikey", parents=[ucommon], help="create an HTTP API key for a user (printed once)")
    s.add_argument("name")
    s.add_argument("--revoke-all", action="store_true", help="remove every API key of the user instead")
    s.set_defaults(func=cmd_user_apikey)
    s = u.add_parser("del", parents=[ucommon], help="delete a user")
    s.add_argument("name")
    s.set_defaults(func=cmd_user_del)
    s = u.add_parser("list", parents=[ucommon], help="list users and their allowed senders")
    s.set_defaults(func=cmd_user_list)

    d = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="sub", required=True)
    s = d.add_parser("keygen", help="generate a key and print its DNS TXT record")
    s.add_argument("--domain", required=True)
    s.add_argument("--selector", required=True)
    s.add_argument("--algorithm", choices=("rsa-sha256", "ed25519-sha256"), default="rsa-sha256")
    s.add_argument("--bits", type=int, default=2048)
    s.add_argument("--key-file", help="where to write the private key (default: DOMAIN.SELECTOR.key)")
    s.add_argument("--force", action="store_true", help="overwrite an existing key file")
    s.set_defaults(func=cmd_dkim_keygen)
    s = d.add_parser("check", parents=[common], help="check the published TXT record matches the configured key")
    s.add_argument("--domain", required=True)
    s.add_argument("--selector")
    s.set_defaults(func=cmd_dkim_check)

    q = sub.add_parser("queue", help="inspect and manage the queue").add_subparsers(dest="sub", required=True)
    s = q.add_parser("list", parents=[common], help="queued messages with recipient states")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_queue_list)
    s = q.add_parser("show", parents=[common], help="one message: envelope, recipients, headers")
    s.add_argument("queue_id")
    s.set_defaults(func=cmd_queue_show)
    filters = argparse.ArgumentParser(add_help=False, parents=[common])
    filters.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID", help="queue ids (or use the filters)")
    filters.add_argument("--domain", help="recipients at this domain")
    filters.add_argument("--sender", help="envelope sender: an address, or @domain for a whole domain")
    filters.add_argument("--user", help="messages submitted by this SASL user")
    filters.add_argument("--older-than", metavar="AGE", help="messages queued longer than AGE (2h, 3d)")
    filters.add_argument("--dry-run", action="store_true", help="only count what would be touched")
    filters.add_argument("--json", action="store_true", help="print the result as JSON")
    for verb, text in (("hold", "hold mail (a hold by --domain/--sender/--user also holds mail arriving later)"),
                       ("release", "release held mail (the matching hold rules, or held queue ids)"),
                       ("flush", "retry now (queue ids, a filter, or every deferred message)"),
                       ("delete", "remove messages (or, with --domain, those recipients) without notifying anyone"),
                       ("bounce", "give up on messages and send a DSN to their senders")):
        s = q.add_parser(verb, parents=[filters], help=text)
        if verb in ("hold", "delete", "bounce"):
            s.add_argument("--reason", help="recorded with the hold / in the DSN")
        if verb == "hold":
            s.add_argument("--for", dest="hold_for", metavar="DURATION", help="release automatically after this")
        if verb == "release":
            s.add_argument("--all", action="store_true", help="release every hold")
        s.set_defaults(func=lambda a, v=verb: _queue_action(a, v))
    s = q.add_parser("destinations", parents=[common], help="hold rules and busy, suspended or held destinations")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_queue_destinations)

    sp = sub.add_parser("suppress", help="the suppression list").add_subparsers(dest="sub", required=True)
    s = sp.add_parser("list", parents=[common], help="suppressed addresses")
    s.add_argument("--json", action="store_true")
    s.add_argument("--kind", choices=("hard_bounce", "soft_bounce", "complaint", "manual"))
    s.add_argument("--since", help="only those seen since: a duration (7d) or a date (2026-11-01)")
    s.set_defaults(func=cmd_suppress_list)
    s = sp.add_parser("add", parents=[common], help="suppress an address")
    s.add_argument("address")
    s.add_argument("--reason", required=True)
    s.set_defaults(func=cmd_suppress_add)
    s = sp.add_parser("remove", parents=[common], help="stop suppressing an address")
    s.add_argument("address")
    s.set_defaults(func=cmd_suppress_remove)
    s = sp.add_parser("import", parents=[common], help="import a CSV (address,reason[,kind] with a header row)")
    s.add_argument("file")
    s.set_defaults(func=cmd_suppress_import)
    s = sp.add_parser("export", parents=[common], help="export the list as CSV on stdout")
    s.set_defaults(func=cmd_suppress_export)
    s = sp.add_parser("migrate", parents=[common],
                      help="copy this node's SQLite list into PostgreSQL (then set [feedback] store)")
    s.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host:port/dbname (no password)")
    s.add_argument("--password-file", help="file whose first line is the password (default: "
                   "[feedback] store_password_file, then PGPASSFILE / ~/.pgpass)")
    s.set_defaults(func=cmd_suppress_migrate)

    st = sub.add_parser("store", help="the shared PostgreSQL database").add_subparsers(dest="sub", required=True)
    s = st.add_parser("migrate", parents=[common],
                      help="create or migrate its schema (run as the owner; nodes then need no CREATE right)")
    s.add_argument("--url", metavar="URL", help="postgresql://owner@host:port/dbname (no password; default: "
                   "[feedback] store)")
    s.add_argument("--password-file", help="file whose first line is the password (default: with --url, "
                   "PGPASSFILE / ~/.pgpass; else [feedback] store_password_file)")
    s.set_defaults(func=cmd_store_migrate)

    s = sub.add_parser("sendmail", help="sendmail(1)-compatible submission (also as a symlink named sendmail): "
                       "-t -i -oi -f ADDR -F NAME [--] RECIPIENT...", add_help=False)
    s.set_defaults(func=lambda a: 2)  # handled in main() before argparse: sendmail flags are not GNU-style
    s = sub.add_parser("history", parents=[common], help="what happened to a message: one line per recipient")
    s.add_argument("--message-id", help="the Message-ID header value (angle brackets optional)")
    s.add_argument("--rcpt", help="recipient address")
    s.add_argument("--sender", help="envelope sender address")
    s.add_argument("--user", help="authenticated user who submitted it")
    s.add_argument("--since", help="only since: a duration (2h, 7d) or a date (2026-11-01)")
    s.add_argument("--limit", type=int, default=1000, help="at most this many records (newest first)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_history)

    f = sub.add_parser("feedback", help="bounce and complaint parsing").add_subparsers(dest="sub", required=True)
    s = f.add_parser("parse", help="classify message files without touching the suppression list")
    s.add_argument("files", nargs="+")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_feedback_parse)

    s = sub.add_parser("backup", parents=[common], help="consistent copy of the spool and the suppression list "
                       "into a new directory (safe while the daemon runs)")
    s.add_argument("directory")
    s.set_defaults(func=cmd_backup)
    s = sub.add_parser("restore", parents=[common], help="check a backup and install it (the daemon must be stopped)")
    s.add_argument("directory")
    s.add_argument("--force", action="store_true", help="replace existing databases (moved aside, not deleted)")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("doctor", parents=[common], help="check DNS (MX, SPF, DKIM, DMARC) and the relay's own set-up")
    s.add_argument("--domain", required=True)
    s.add_argument("--selector")
    s.add_argument("--ip", help="this relay's public IP, to check SPF allows it")
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(func=cmd_doctor)

    t = sub.add_parser("tlsrpt", help="SMTP TLS reports (RFC 8460)").add_subparsers(dest="sub", required=True)
    s = t.add_parser("show", parents=[common], help="the reports that would be sent (days recorded, not yet sent)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tlsrpt_show)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if Path(sys.argv[0]).name == "sendmail":  # /usr/sbin/sendmail -> mailrelayd
            return cmd_sendmail(argv)
    if argv and argv[0] == "sendmail":
        return cmd_sendmail(argv[1:])
    args = build_parser().parse_args(argv)
    import sqlite3

    from mailrelayd.config import ConfigError
    from mailrelayd.errors import SpoolCorruptError, SpoolError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        _err(str(e))
        return 1
    # The crash paths of any verb end in one line, never a traceback (the spool and the state
    # databases on a full or damaged disk, unreadable files).
    except SpoolCorruptError as e:
        _err(f"spool: {e}; see docs/runbooks/MailrelaydSpoolDamaged.md")
        return 1
    except SpoolError as e:
        _err(f"spool: {e}")
        return 1
    except sqlite3.Error as e:
        _err(f"database error: {e}")
        return 1
    except BrokenPipeError:
        # `mailrelayd queue list | head`: the reader has what it wanted. Quiet, as cat or ls are;
        # stdout goes to /dev/null so that the interpreter's last flush does not complain either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        _err(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
        return 1
    except Exception as e:
        from mailrelayd.feedback.store import StoreUnavailableError

        if not isinstance(e, StoreUnavailableError):
            raise
        _err(f"feedback.store: {e}")
        return 2
    except KeyboardInterrupt:
        return 130

