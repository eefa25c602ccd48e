"""The users file: submission accounts with scrypt password hashes and allowed sender patterns.

Written only by the CLI (``mailrelayd user add/del``) with tomli-w, atomically; read by the daemon
at start and on SIGHUP. Format::

    [users.alice]
    password = "$scrypt$ln=15,r=8,p=1$<salt>$<hash>"
    allowed_from = ["@example.com", "alerts@example.org"]
    rate = "500/h"                      # optional: overrides [auth] default_rate
    api_keys = ["sha256:<hex>"]         # optional: hashes of HTTP API keys (`mailrelayd user apikey`)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from mailrelayd.ratelimit import parse_rate
from mailrelayd.smtp.address import AddressError, parse_mailbox

# scrypt cost: 2**15 * 8 * 128 = 32 MiB and ~50-100 ms per verification (OWASP minimum is 2**17
# for interactive logins with r=8; SMTP clients re-authenticate on every connection, so verified
# credentials are cached in memory by smtp.auth, which keeps the per-connection cost low).
_LN, _R, _P = 15, 8, 1
_MAXMEM = 128 * 1024 * 1024
_MIN_DKLEN, _MAX_DKLEN = 16, 64
_API_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")  # what api_key_hash() writes
MAX_USERS_FILE = 16 * 1024**2
"""Largest users file read (a few hundred bytes a user): a bigger one is a mistake, not a users file."""


class UsersFileError(Exception):
    """The users file is unreadable or malformed; the message names the file and key."""


PATTERN_FORMS = "\"@domain\" (any address at that domain), a whole address, or \"*\" (anything)"


def sender_pattern(value: str) -> str:
    """The one normal form of an allowed-sender pattern (``--allow-from`` and the users file alike):
    ``"*"``, ``"@domain"`` or a whole address, with domains and local parts as the SMTP session
    normalises them (so ``@Bücher.Example`` matches what arrives as ``xn--bcher-kva.example``).
    Raises ValueError saying what is wrong: a pattern that can match nothing (``""``, ``"@@"``,
    ``"a b@c"``) is a typo that would silently refuse every message of the user."""
    p = value.strip()
    if p == "*":
        return p
    if not p:
        raise ValueError(f"empty pattern: use {PATTERN_FORMS}")
    if not p.isprintable():
        raise ValueError(f"{value!r}: control characters are not allowed")
    if "@" not in p:
        raise ValueError(f"{value!r}: use {PATTERN_FORMS}")
    try:
        if p.startswith("@"):
            # A domain pattern is parsed as an address at that domain: the same domain rules (IDNA,
            # address literals) as the envelope addresses it is compared with.
            return "@" + parse_mailbox("x" + p, utf8=True).domain
        return str(parse_mailbox(p, utf8=True))
    except AddressError as e:
        raise ValueError(f"{value!r}: {e}") from None


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    allowed_from: tuple[str, ...]
    rate: str | None = None
    """Sending limit ("500/h", "unlimited"); None: [auth] default_rate applies."""
    api_keys: tuple[str, ...] = ()
    """``sha256:<hex>`` of each HTTP API key (keys are random 256-bit tokens: a fast hash suffices)."""

    def may_send_as(self, address: str) -> bool:
        """True if ``address`` matches one of the user's allowed sender patterns.

        A pattern ``@example.com`` allows any local part at exactly that domain; any other
        pattern is a whole address. Comparison ignores the case of the domain (RFC 5321 §2.4)
        and of the local part (no one runs case-sensitive mailboxes for sending). The null sender
        ("") only ``*`` allows: bounces come from the MTA, not from applications.
        """
        addr = address.strip().lower()
        if not addr:
            return any(pat.strip() == "*" for pat in self.allowed_from)
        domain = addr.rpartition("@")[2].rstrip(".")
        for pat in self.allowed_from:
            p = pat.strip().lower()
            if p == "*":
                return True
            if p.startswith("@"):
                if domain == p[1:].rstrip("."):
                    return True
            elif p == addr:
                return True
        return False


def hash_password(password: str, *, ln: int = _LN) -> str:
    """Hash a password with scrypt, in a self-describing modular-crypt-style string."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=2**ln, r=_R, p=_P, maxmem=_MAXMEM, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"$scrypt$ln={ln},r={_R},p={_P}${b64(salt)}${b64(dk)}"


def verify_password(password: bytes | str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a hash from :func:`hash_password`. CPU-heavy:
    call it from a thread, never on the event loop."""
    pw = password.encode() if isinstance(password, str) else password
    parsed = _parse_hash(encoded)
    if parsed is None:
        return False
    ln, r, p, salt, want = parsed
    got = hashlib.scrypt(pw, salt=salt, n=2**ln, r=r, p=p, maxmem=_MAXMEM, dklen=len(want))
    return hmac.compare_digest(got, want)


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(ln, r, p, salt, derived key) of a hash from :func:`hash_password`, or None if it is not one
    that scrypt can check a password against."""
    try:
        _, scheme, params, salt_b64, dk_b64 = encoded.split("$")
        if scheme != "scrypt":
            return None
        kv = dict(p.split("=", 1) for p in params.split(","))
        ln, r, p = int(kv["ln"]), int(kv["r"]), int(kv["p"])
        unb64 = lambda s: base64.b64decode(s + "=" * (-len(s) % 4))  # noqa: E731
        salt, want = unb64(salt_b64), unb64(dk_b64)
    except (ValueError, KeyError):
        return None
    if not (1 <= ln <= 22 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    # hashlib.scrypt raises ValueError above maxmem (OpenSSL needs 128*r*(N+p+2) bytes) or for an
    # empty key; a truncated key would also let one wrong password in 2**(8*len) through.
    if 128 * r * (2**ln + p + 2) > _MAXMEM or not _MIN_DKLEN <= len(want) <= _MAX_DKLEN:
        return None
    return ln, r, p, salt, want


# A fixed, valid hash used to spend the same time on unknown users as on known ones.
DUMMY_HASH = "$scrypt$ln=15,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _read_users_file(path: Path) -> str:
    """The text of the users file, newlines read as a text-mode read does. Raises UsersFileError."""
    data = _read_regular_file(path, MAX_USERS_FILE)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsersFileError(f"{path}: cannot read: {e}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path``. Raises UsersFileError for what is not a regular file of at most ``limit``
    bytes: open() of a FIFO without a writer, or a read of one or of /dev/zero, would hang the start or
    the SIGHUP reload. O_NONBLOCK lets the open return at once, and the checks are on what was opened
    (fstat), not on the name, which may have changed since (TOCTOU)."""
    too_large = f"{path}: larger than {limit // 1024**2} MB"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsersFileError(f"{path}: file not found") from None
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsersFileError(f"{path}: not a regular file but a {_file_kind(st.st_mode)}")
        if st.st_size > limit:
            raise UsersFileError(f"{too_large} ({st.st_size} bytes)")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # bounded even if it grew after the fstat
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read: {e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UsersFileError(too_large)
    return data


def load_users(path: Path, *, replacing_allowed_from: str | None = None) -> dict[str, User]:
    """Read the users file. Raises :class:`UsersFileError` naming the file and the bad key.

    ``replacing_allowed_from``: the user whose patterns the caller replaces (``user set NAME
    --allow-from``): a broken ``allowed_from`` of that user is read as empty instead of refused, so
    that the CLI can repair it."""
    text = _read_users_file(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsersFileError(f"{path}: TOML syntax error: {e}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise UsersFileError(f"{path}: TOML syntax error: values nested too deeply") from None
    unknown = set(data) - {"users"}
    if unknown:
        raise UsersFileError(f"{path}: {sorted(unknown)[0]}: unknown key (expected [users.NAME] tables)")
    users: dict[str, User] = {}
    key_owner: dict[str, str] = {}
    table = data.get("users", {})
    if not isinstance(table, dict):
        raise UsersFileError(f"{path}: users: must be a table")
    for name, entry in table.items():
        key = f"users.{name}"
        if not name.strip() or not name.isprintable():
            # Nobody can type it at AUTH (an empty name is refused there), and a control character
            # would reach logs and the Received: "user" clause.
            raise UsersFileError(f"{path}: {key!r}: a user name must be printable and not blank")
        if not isinstance(entry, dict):
            raise UsersFileError(f"{path}: {key}: must be a table")
        extra = set(entry) - {"password", "allowed_from", "rate", "api_keys"}
        if extra:
            raise UsersFileError(f"{path}: {key}.{sorted(extra)[0]}: unknown key")
        pw = entry.get("password")
        if not isinstance(pw, str) or _parse_hash(pw) is None:
            raise UsersFileError(f"{path}: {key}.password: must be a scrypt hash written by `mailrelayd user add`")
        try:
            allowed = _allowed_from(entry.get("allowed_from", []))
        except ValueError as e:
            if name != replacing_allowed_from:
                raise UsersFileError(f"{path}: {key}.allowed_from{e}; repair it with `mailrelayd user set "
                                     f"{name} --allow-from PATTERN`") from None
            allowed = ()
        rate = entry.get("rate")
        if rate is not None:
            try:
                parse_rate(rate)
            except ValueError as e:
                raise UsersFileError(f"{path}: {key}.rate: {e}") from None
        keys = entry.get("api_keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) and _API_KEY_HASH.fullmatch(k) for k in keys):
            raise UsersFileError(f"{path}: {key}.api_keys: must be an array of hashes written by "
                                 "`mailrelayd user apikey`")
        for k in keys:
            # api_key_index() maps a key to one user: a key copied into a second entry (a copy-pasted
            # user) would silently authenticate as whichever entry comes last.
            owner = key_owner.setdefault(k, name)
            if owner != name:
                raise UsersFileError(f"{path}: {key}.api_keys: the same API key as users.{owner} "
                                     "(a key belongs to one user)")
        users[name] = User(name, pw, allowed, rate, tuple(keys))
    return users


def _allowed_from(value: object) -> tuple[str, ...]:
    """The patterns of an ``allowed_from`` value; ValueError whose text continues the key
    (``[1]: '@@': invalid domain``)."""
    if not isinstance(value, list):
        raise ValueError(f": must be an array of patterns: {PATTERN_FORMS}")
    out = []
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise ValueError(f"[{i}]: must be a string: {PATTERN_FORMS}")
        try:
            out.append(sender_pattern(p))
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
    return tuple(out)


def new_api_key() -> tuple[str, str]:
    """A new HTTP API key and the hash to store: (key, "sha256:<hex>")."""
    key = "mrk_" + secrets.token_urlsafe(32)
    return key, api_key_hash(key)


def api_key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def api_key_index(users: dict[str, User]) -> dict[str, User]:
    """{stored hash: user}, for looking a presented key up in one step."""
    return {h: u for u in users.values() for h in u.api_keys}


def save_users(path: Path, users: dict[str, User]) -> None:
    """Write the users file atomically (temp file, fsync, rename, fsync dir), mode 0640."""
    doc = {"users": {u.name: _user_doc(u) for u in sorted(users.values(), key=lambda u: u.name)}}
    body = "# Written by `mailrelayd user`; edits by hand are kept but comments are not.\n" + tomli_w.dumps(doc)
    atomic_write(path, body.encode(), mode=0o640)


def _user_doc(u: User) -> dict[str, object]:
    d: dict[str, object] = {"password": u.password_hash, "allowed_from": list(u.allowed_from)}
    if u.rate is not None:
        d["rate"] = u.rate
    if u.api_keys:
        d["api_keys"] = list(u.api_keys)
    return d


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so readers see either the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            # Keep the owner and group of the file we replace (root editing a file the daemon's group reads).
            st = os.stat(path)
            os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
