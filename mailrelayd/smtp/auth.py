"""SMTP AUTH (RFC 4954) credential checks and per-IP failure throttling.

Password hashes are verified in a thread: scrypt is tens of milliseconds of CPU by design.
Applications often open a connection (and authenticate) per message, so a successful check is
remembered for a few minutes under an HMAC of (user, password) with a per-process random key:
the cache holds no password and no hash an attacker could use offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Container
from concurrent.futures import Executor

from mailrelayd.users import DUMMY_HASH, User, verify_password

# Per process: the same mistyped name hashes alike within one run (an operator can see repeats), but
# the hash is useless offline, so a password typed into the username field cannot be recovered.
_LOG_KEY = secrets.token_bytes(32)


def username_for_log(username: bytes, known: Container[str] = ()) -> str:
    """How a failed AUTH username appears in logs, everywhere. A configured user's name is shown as is
    (operators need to see who is being guessed); anything else may be a password typed into the
    username field (AUTH LOGIN prompts for both), so it is logged only as a keyed hash and its length."""
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        name = None
    if name is not None and name in known:
        return name
    digest = hmac.new(_LOG_KEY, username, hashlib.sha256).hexdigest()[:12]
    return f"unknown:{digest}:len={len(username)}"


class KeyedLock:
    """One holder at a time per key (``async with lock.hold(key)``); a key nobody holds or waits for
    is forgotten, so memory follows the connections, not the keys ever seen."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class AuthThrottle:
    """Counts AUTH failures per client IP; after ``max_failures`` within ``window`` seconds the IP
    is locked out for ``lockout`` seconds. Survives config reloads (owned by the daemon).

    The checks of one IP run one at a time (:attr:`serial`), each after a look at the lockout:
    otherwise a client sends its guesses on many connections at once, and all of them are checked
    before the first failure is recorded. A success clears nothing: one account's password would
    otherwise buy unlimited guesses at the others' from the same IP (failures age out with the
    window)."""

    def __init__(self, max_failures: int, window: float, lockout: float, max_tracked: int = 100_000) -> None:
        self.configure(max_failures, window, lockout)
        self._failures: dict[str, list[float]] = {}
        self.serial = KeyedLock()
        self._locked_until: dict[str, float] = {}
        self._max_tracked = max_tracked

    def configure(self, max_failures: int, window: float, lockout: float) -> None:
        self.max_failures, self.window, self.lockout = max_failures, window, lockout

    def is_locked(self, ip: str, now: float | None = None) -> bool:
        until = self._locked_until.get(ip)
        if until is None:
            return False
        if (now if now is not None else time.monotonic()) >= until:
            del self._locked_until[ip]
            return False
        return True

    def failure(self, ip: str, now: float | None = None) -> bool:
        """Record a failure; True if the IP is now locked out."""
        now = now if now is not None else time.monotonic()
        recent = [t for t in self._failures.get(ip, ()) if now - t < self.window]
        recent.append(now)
        if len(recent) >= self.max_failures:
            self._failures.pop(ip, None)
            self._locked_until[ip] = now + self.lockout
            return True
        self._failures[ip] = recent
        if len(self._failures) > self._max_tracked:  # bounded memory under a distributed attack
            for k in list(self._failures)[: self._max_tracked // 10]:
                del self._failures[k]
        return False

    def failures(self, ip: str) -> int:
        """Failures of ``ip`` counted here and not yet expired or cleared (the window is checked lazily)."""
        return len(self._failures.get(ip, ()))

    def lock(self, ip: str, seconds: float) -> None:
        """Lock ``ip`` out for ``seconds`` from now (a lockout decided elsewhere, e.g. by another node)."""
        until = time.monotonic() + seconds
        if until > self._locked_until.get(ip, 0.0):
            self._locked_until[ip] = until
        self._failures.pop(ip, None)


class Authenticator:
    """Checks credentials against the users file's scrypt hashes."""

    def __init__(self, users: dict[str, User], executor: Executor | None = None,
                 cache_ttl: float = 600.0, cache_size: int = 10_000) -> None:
        self.users = users
        self._executor = executor
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._ttl = cache_ttl
        self._size = cache_size

    def username_for_log(self, username: bytes) -> str:
        return username_for_log(username, self.users)

    async def verify(self, username: bytes, password: bytes) -> User | None:
        """The user if the credentials are right, else None. Never raises for bad input."""
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            return None
        user = self.users.get(name)
        tag = hmac.new(self._key, username + b"\0" + password, hashlib.sha256).digest()
        if user is not None:
            exp = self._cache.get(tag)
            if exp is not None and exp > time.monotonic():
                self._cache.move_to_end(tag)
                return user
        # Unknown users cost the same scrypt as known ones, so timing does not reveal names.
        encoded = user.password_hash if user is not None else DUMMY_HASH
        ok = await asyncio.get_running_loop().run_in_executor(self._executor, verify_password, password, encoded)
        if not ok or user is None:
            return None
        self._cache[tag] = time.monotonic() + self._ttl
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return user
