"""The shared PostgreSQL database of a relay fleet: one asyncpg pool on its own event-loop thread.

Why a thread of its own: the suppression store's interface is synchronous (the daemon calls it from
worker threads, the CLI from plain code), and the daemon's loop must never wait for the network.
Callers hand coroutines to this loop (:meth:`PgClient.call` waits, :meth:`PgClient.submit` does
not); the loop keeps a pool, one extra connection for ``LISTEN`` (RFC-less, PostgreSQL's
LISTEN/NOTIFY: notifications are delivered in commit order), and a supervisor that reconnects.

State: :attr:`PgClient.up` is True while the pool and the listening connection work. When the
database goes away every call fails fast with :class:`PgUnavailable` (no waiting on timeouts), the
supervisor retries with backoff, and the ``on_connect`` hooks run again after each reconnection
(the suppression store reloads its set and flushes its outbox there).

Schema: ``mailrelayd_schema`` holds the version. At connect a node only reads it (a plain SELECT):
when it is current, the node needs no right beyond reading and writing the data, so nodes may run
as a role without CREATE (docs/scale-out.md lists the GRANTs). Only when the schema is missing or
older does the node create or migrate it, under an advisory lock so two nodes starting at once do
not race; a role that may not is refused with :class:`MigrationRefused` (one line naming
``mailrelayd store migrate``, which the owner runs). A database newer than this mailrelayd is
refused (:class:`SchemaTooNew`), never modified.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from mailrelayd.log import get_logger

log = get_logger()

T = TypeVar("T")
Conn = Any  # asyncpg.Connection / pool proxy (asyncpg ships no type stubs)

_MIGRATION_LOCK = 0x6D61696C72656C  # "mailrel": pg_advisory_xact_lock key for migrations

# Each entry migrates from version i to i + 1. Never edit a released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: suppression list, soft-bounce counters, generation counter, shared AUTH lockout.
    """
    CREATE TABLE mailrelayd_suppressions (
        address    text PRIMARY KEY,
        kind       text NOT NULL,
        reason     text NOT NULL DEFAULT '',
        source     text NOT NULL DEFAULT '',
        queue_id   text NOT NULL DEFAULT '',
        first_seen double precision NOT NULL,
        last_seen  double precision NOT NULL,
        count      integer NOT NULL DEFAULT 1
    );
    CREATE INDEX mailrelayd_suppressions_kind ON mailrelayd_suppressions (kind);
    CREATE INDEX mailrelayd_suppressions_last_seen ON mailrelayd_suppressions (last_seen);
    CREATE TABLE mailrelayd_soft_bounces (
        id       bigserial PRIMARY KEY,
        address  text NOT NULL,
        reason   text NOT NULL DEFAULT '',
        source   text NOT NULL DEFAULT '',
        queue_id text NOT NULL DEFAULT '',
        seen     double precision NOT NULL
    );
    CREATE INDEX mailrelayd_soft_bounces_address_seen ON mailrelayd_soft_bounces (address, seen);
    CREATE TABLE mailrelayd_meta (key text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO mailrelayd_meta (key, value) VALUES ('generation', 0);
    CREATE TABLE mailrelayd_auth_failures (
        id bigserial PRIMARY KEY,
        ip text NOT NULL,
        at double precision NOT NULL
    );
    CREATE INDEX mailrelayd_auth_failures_ip_at ON mailrelayd_auth_failures (ip, at);
    CREATE TABLE mailrelayd_auth_lockouts (ip text PRIMARY KEY, until double precision NOT NULL);
    """,
    # 2: fixed-window counters for shared per-user sending limits.
    """
    CREATE TABLE mailrelayd_rate_counters (
        key          text NOT NULL,
        window_start double precision NOT NULL,
        count        bigint NOT NULL,
        PRIMARY KEY (key, window_start)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Errors that mean "the database is not reachable / the connection broke", as opposed to a bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

# Errors of a server that answers but will not do what we ask for operational reasons (SQLSTATE
# 25006 read-only: a fenced or demoted primary; 42501 a privilege revoked; class 53 disk full / out
# of memory; 57 a cancelled statement (statement_timeout); 58 an I/O error): the database cannot be
# used right now, exactly as when it is down. Any other PostgresError is a bug and propagates.
REFUSAL_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.PostgresSystemError,
)


def _text(error: BaseException) -> str:
    """``Type: message`` of an exception, for logs and /ready."""
    return f"{type(error).__name__}: {error}".rstrip(": ") if str(error) else type(error).__name__


class PgUnavailable(Exception):
    """The shared database cannot be used right now (down, unreachable, refusing us)."""


class SchemaTooNew(Exception):
    """The database was migrated by a newer mailrelayd."""


class MigrationRefused(Exception):
    """The schema needs creating or migrating and this role may not (no CREATE right): the owner
    must run ``mailrelayd store migrate``. A configuration matter: retried like an outage."""


@dataclass(frozen=True)
class PgSettings:
    url: str
    """``postgresql://user@host:port/dbname`` (validated by config.parse_store_url: no password)."""
    password_file: Path | None = None
    poll_interval: float = 1.0
    timeout: float = 5.0

    @property
    def where(self) -> str:
        """``host:port/dbname`` for logs and errors (never user or password)."""
        u = urlsplit(self.url)
        return f"{u.hostname}:{u.port or 5432}{u.path}"


def read_password(path: Path | None) -> str | None:
    """First line of the password file (None without one). Raises OSError/UnicodeDecodeError."""
    if path is None:
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


async def schema_version(conn: Conn) -> int | None:
    """The schema version recorded in the database, None when it has no mailrelayd schema yet.
    A plain SELECT, outside any transaction (a missing table would abort one)."""
    try:
        return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM mailrelayd_schema"))
    except asyncpg.UndefinedTableError:
        return None


def _check_not_newer(found: int | None) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaTooNew(f"schema version {found} is newer than this mailrelayd ({SCHEMA_VERSION})")


async def migrate(conn: Conn) -> int:
    """Create or migrate the schema to :data:`SCHEMA_VERSION`; returns the version found before (0:
    none). A current schema is only read: no DDL, no lock, so a role without CREATE connects.
    Raises :class:`SchemaTooNew`, or :class:`MigrationRefused` when this role may not migrate."""
    found = await schema_version(conn)
    _check_not_newer(found)
    if found == SCHEMA_VERSION:
        return SCHEMA_VERSION
    try:
        return await _migrate_locked(conn)
    except asyncpg.InsufficientPrivilegeError as e:
        have = "no mailrelayd schema" if found is None else f"schema version {found}"
        raise MigrationRefused(f"the database has {have}, this mailrelayd needs version {SCHEMA_VERSION}, and this"
                               f" role may not change the schema ({e}): run 'mailrelayd store migrate' as the"
                               " database owner (docs/scale-out.md)") from None


async def _migrate_locked(conn: Conn) -> int:
    """The DDL part of :func:`migrate`, under the advisory lock; the version is read again under it
    (another node may have migrated meanwhile)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS mailrelayd_schema (version integer NOT NULL)")
        found = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM mailrelayd_schema"))
        _check_not_newer(found)
        for version in range(found, SCHEMA_VERSION):
            await conn.execute(MIGRATIONS[version])
            await conn.execute("INSERT INTO mailrelayd_schema (version) VALUES ($1)", version + 1)
        return found


def migrate_store(settings: PgSettings) -> int:
    """``mailrelayd store migrate``: bring the schema to :data:`SCHEMA_VERSION` over one connection
    (as the owner, so that nodes may run as a role without CREATE); returns the version found before.
    Raises what :func:`migrate` raises, :data:`CONNECTION_ERRORS`, ``asyncpg.PostgresError``."""
    return asyncio.run(_migrate_store(settings))


async def _migrate_store(settings: PgSettings) -> int:
    kwargs: dict[str, Any] = {"timeout": settings.timeout}
    password = read_password(settings.password_file)
    if password is not None:
        kwargs["password"] = password
    conn = await asyncpg.connect(settings.url, **kwargs)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def _discard_connection(attempt: asyncio.Future[Any]) -> None:
    """Done-callback of a connection attempt nobody waits for any more: its error is read (so asyncio
    does not report it as never retrieved), its connection closed."""
    if attempt.cancelled():
        return
    if attempt.exception() is None:
        attempt.result().terminate()


Hook = Callable[[Conn], Awaitable[None]]
Listener = Callable[[str], None]


class PgClient:
    """A pool + a LISTEN connection + a reconnecting supervisor, on a private event-loop thread.

    ``on_connect`` hooks run (in order, on this loop) after every (re)connection; ``on_poll`` hooks
    every ``poll_interval`` while up; ``listen(channel, fn)`` calls ``fn(payload)`` on this loop.
    An exception from a hook that is a connection error marks the client down (and it reconnects).
    """

    def __init__(self, settings: PgSettings, *, name: str = "pg", pool_size: int = 4) -> None:
        self.settings = settings
        self.name = name
        self.pool_size = pool_size
        self.up = False
        self.last_error = "not connected yet"
        self.fatal: BaseException | None = None
        self._password = read_password(settings.password_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"{name}-loop", daemon=True)
        self._pool: Any = None
        self._listen_conn: Any = None
        self._on_connect: list[Hook] = []
        self._on_poll: list[Hook] = []
        self._channels: dict[str, Listener] = {}
        self._connected = threading.Event()
        self._attempted = threading.Event()
        self._wake: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._crowded_logged = False  # pg.pool_full: once per connection
        self._refusal = ""  # the last pg.connect_refused logged (once per distinct error)
        self._attempts: set[asyncio.Task[Any]] = set()  # connection attempts under way (see _open)

    # --- set-up ------------------------------------------------------------------------------
    def on_connect(self, hook: Hook) -> None:
        self._on_connect.append(hook)

    def on_poll(self, hook: Hook) -> None:
        self._on_poll.append(hook)

    def listen(self, channel: str, fn: Listener) -> None:
        """Call ``fn(payload)`` (on this loop) for each NOTIFY on ``channel``, also after reconnects."""
        self._channels[channel] = fn
        if self._thread.is_alive():  # already running: add it to the live connection too
            asyncio.run_coroutine_threadsafe(self._add_listener(channel, fn), self._loop).result(10)

    async def _add_listener(self, channel: str, fn: Listener) -> None:
        conn = self._listen_conn
        if conn is not None and not conn.is_closed():
            try:
                await conn.add_listener(channel, lambda _c, _pid, _ch, payload: fn(payload))
            except CONNECTION_ERRORS as e:
                self._down(e)

    def start(self, wait: float | None = None) -> bool:
        """Start the loop thread and connect in the background; with ``wait``, block up to that long
        for the first attempt. True if connected. Raises :class:`SchemaTooNew` at once."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_supervisor(), self._loop).result()
        if wait:
            self._attempted.wait(wait)
        if self.fatal is not None:
            raise self.fatal
        return self.up

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start_supervisor(self) -> None:
        self._wake = asyncio.Event()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")

    # --- calls ---------------------------------------------------------------------------------
    def call(self, fn: Callable[[Conn], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``fn(conn)`` on a pooled connection, waiting for the result (from any other thread).
        ``timeout``: for the whole call (default: twice the configured timeout). Raises
        :class:`PgUnavailable` when down or when the connection fails."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("PgClient.call from its own loop would deadlock; await acall")
        fut = asyncio.run_coroutine_threadsafe(self.acall(fn, timeout), self._loop)
        try:
            return fut.result((timeout or self.settings.timeout * 2) + 1)
        except TimeoutError:
            fut.cancel()
            raise PgUnavailable("timed out") from None

    def submit(self, fn: Callable[[], Awaitable[Any]]) -> Future[Any]:
        """Schedule a coroutine on this loop without waiting (thread-safe)."""
        return asyncio.run_coroutine_threadsafe(fn(), self._loop)

    async def acall(self, fn: Callable[[Conn], Awaitable[T]], timeout: float | None = None) -> T:
        """:meth:`call` for code already on this loop."""
        pool = self._pool
        if not self.up or pool is None:
            raise PgUnavailable(self.last_error)
        crowded: list[BaseException] = []
        try:
            async with asyncio.timeout(timeout or self.settings.timeout * 2):
                conn = await self._acquire(pool, crowded)
                try:
                    return await fn(conn)
                finally:
                    await pool.release(conn)
        except CONNECTION_ERRORS as e:
            if crowded and isinstance(e, TimeoutError):  # the server is up, just full: not an outage
                raise PgUnavailable(f"no free connection ({_text(crowded[-1])})") from None
            self._down(e)
            raise PgUnavailable(self.last_error) from None
        except REFUSAL_ERRORS as e:  # degraded like an outage; reconnecting shows when it is over
            self._down(e)
            raise PgUnavailable(self.last_error) from None

    async def _acquire(self, pool: Any, crowded: list[BaseException]) -> Conn:
        """A pooled connection. When the pool may not grow because the server has no slot left
        (``max_connections`` or a role/database ``CONNECTION LIMIT``) while we still hold working
        connections, wait for one of those (the caller's timeout bounds the wait) rather than
        declaring the database down: that would drop the live connections, the LISTEN and the
        in-memory list's freshness, and every node short of a slot would flap."""
        delay = 0.02
        while True:
            try:
                conn = await pool.acquire(timeout=self.settings.timeout)
            except asyncpg.TooManyConnectionsError as e:
                if pool.get_size() == 0 or self._listen_conn is None or self._listen_conn.is_closed():
                    raise
                if not crowded and not self._crowded_logged:
                    self._crowded_logged = True
                    log.warning("pg.pool_full", store=self.settings.where, connections=pool.get_size(),
                                wanted=self.pool_size, error=_text(e))
                crowded.append(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            else:
                crowded.clear()  # from here on a timeout is the database's, not the crowd's
                return conn

    # --- supervision ---------------------------------------------------------------------------
    def _down(self, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else _text(error)
        if self.up:
            log.warning("pg.down", store=self.settings.where, error=text)
        self.up = False
        self.last_error = text
        if self._wake is not None:
            self._wake.set()

    async def _connect(self) -> None:
        s = self.settings
        kwargs: dict[str, Any] = {"timeout": s.timeout, "command_timeout": s.timeout * 2}
        if self._password is not None:
            kwargs["password"] = self._password
        pool = await asyncpg.create_pool(s.url, min_size=1, max_size=self.pool_size, connect=self._open, **kwargs)
        try:
            async with pool.acquire() as conn:
                before = await migrate(conn)
            if before != SCHEMA_VERSION:
                log.info("pg.schema_migrated", store=s.where, from_version=before, to_version=SCHEMA_VERSION)
            listen_conn = await self._open(s.url, **kwargs)
        except BaseException:
            await pool.close()
            raise
        for channel, fn in list(self._channels.items()):
            await listen_conn.add_listener(channel, lambda _c, _pid, _ch, payload, fn=fn: fn(payload))
        listen_conn.add_termination_listener(lambda _c: self._down("LISTEN connection closed"))
        self._pool, self._listen_conn = pool, listen_conn
        self._crowded_logged = False
        self.up = True
        try:
            for hook in self._on_connect:
                async with pool.acquire() as conn:
                    await hook(conn)
        except BaseException:
            self.up = False
            raise

    async def _open(self, *args: Any, **kwargs: Any) -> Any:
        """``asyncpg.connect`` (for the pool and the LISTEN connection) that is never cancelled half-way.

        Cancelled inside its SSLRequest exchange (``sslmode=prefer``, asyncpg's default, or any TLS
        mode), asyncpg drops a future that the closing socket then fails: asyncio logs "Future
        exception was never retrieved". After a restart our teardown cancels the pool's reconnection
        of its floor connection (``Pool.close``), and a call's timeout cancels one the pool opens for
        it. So the attempt runs in a task of its own, bounded by the connect timeout; a caller that
        gives up stops waiting, and what the attempt opens afterwards is closed."""
        attempt = asyncio.ensure_future(asyncpg.connect(*args, **kwargs))
        self._attempts.add(attempt)
        attempt.add_done_callback(self._attempts.discard)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(_discard_connection)
            raise

    async def _teardown(self) -> None:
        pool, listen_conn = self._pool, self._listen_conn
        self._pool = self._listen_conn = None
        if listen_conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listen_conn.close(), 2)
            listen_conn.terminate()
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 2)
            pool.terminate()

    def _refused(self, error: BaseException | str) -> None:
        """The server answers but refuses us: a database that does not exist, a role without the
        rights to migrate, a read-only standby. A configuration matter, not a bug: one line per
        distinct refusal (no traceback every few seconds), retried like an outage."""
        self._down(error)
        if self._refusal != self.last_error:
            self._refusal = self.last_error
            with contextlib.suppress(Exception):
                log.error("pg.connect_refused", store=self.settings.where, error=self.last_error)

    async def _supervise(self) -> None:
        assert self._wake is not None
        backoff = 0.2
        while not self._closing:
            if not self.up:
                await self._teardown()
                try:
                    await self._connect()
                    self._refusal = ""  # connected, hooks and all: a later refusal is news again
                    log.info("pg.connected", store=self.settings.where, schema_version=SCHEMA_VERSION)
                    backoff = 0.2
                except SchemaTooNew as e:
                    self.fatal = e
                    self._down(str(e))
                except CONNECTION_ERRORS as e:
                    self._down(e)
                except MigrationRefused as e:
                    self._refused(str(e))
                except asyncpg.PostgresError as e:
                    self._refused(e)
                except Exception as e:  # a hook's bug must not kill the supervisor
                    self._down(e)
                    with contextlib.suppress(Exception):  # nor a log stream that fails (closed stdout)
                        log.exception("pg.connect_failed", store=self.settings.where, error=str(e))
                finally:
                    self._attempted.set()
                if not self.up:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval)
            if not self.up or self._closing:
                continue
            if self._listen_conn is None or self._listen_conn.is_closed():
                self._down("LISTEN connection closed")
                continue
            for hook in self._on_poll:
                try:
                    await self.acall(hook)
                except PgUnavailable:
                    break
                except Exception as e:
                    with contextlib.suppress(Exception):
                        log.exception("pg.poll_failed", store=self.settings.where, error=str(e))

    async def _settle_attempts(self) -> None:
        """Let abandoned connection attempts end before the loop does (a task still pending then is
        destroyed with a warning); each is bounded by the connect timeout."""
        if not self._attempts:
            return
        _, pending = await asyncio.wait(set(self._attempts), timeout=self.settings.timeout + 1)
        for attempt in pending:  # a connect timeout that did not fire: nothing better left to do
            attempt.cancel()

    def close(self) -> None:
        """Stop the supervisor, close the connections and the loop thread."""
        if not self._thread.is_alive():
            return

        async def _stop() -> None:
            self._closing = True
            if self._supervisor is not None:
                self._supervisor.cancel()
                with contextlib.suppress(BaseException):
                    await self._supervisor
            self.up = False
            await self._teardown()
            await self._settle_attempts()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
