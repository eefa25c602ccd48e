"""The daemon: builds every part from the config, runs them, and handles signals.

- start: validate everything (config, users, TLS, DKIM keys), open the spool (recovering what a
  crash left), load the schedule, bind listeners, start the sidecar, then tell systemd READY=1;
- SIGHUP: build a complete new runtime from the files; swap it in only if all of it is valid,
  otherwise keep serving with the old one and count the failure;
- SIGTERM/SIGINT: stop accepting, let sessions and deliveries in flight finish for up to
  ``server.shutdown_timeout``, then exit 0. Nothing acknowledged is lost: whatever is cut off
  is still active in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mailrelayd import __version__, history, maildrop, metrics
from mailrelayd.api import ApiContext, ApiServer
from mailrelayd.config import Config, ConfigError, HostPort, ListenerConfig, load_config
from mailrelayd.delivery.dsn import build_dsn
from mailrelayd.delivery.mx import MxResolver
from mailrelayd.delivery.scheduler import RUNBOOK_SPOOL, Hooks, Scheduler
from mailrelayd.delivery.transport import Transport
from mailrelayd.dkim import DkimKeyError, DkimKeySpec, DkimSigner, LoadedKey, load_keys
from mailrelayd.errors import DkimSignError, SpoolCorruptError, SpoolError
from mailrelayd.feedback.breaker import CircuitBreaker
from mailrelayd.feedback.breaker import settings_from as breaker_settings
from mailrelayd.feedback.processor import FeedbackProcessor
from mailrelayd.feedback.store import StoreUnavailableError, open_store
from mailrelayd.feedback.verp import make_return_path
from mailrelayd.intake import HeaderCheck, Intake, Signer, wait_commits
from mailrelayd.log import LineBatcher, configure_logging, get_logger
from mailrelayd.maildrop import SendmailService
from mailrelayd.malloc import fix_mmap_threshold
from mailrelayd.queueops import QueueOps
from mailrelayd.ratelimit import MemoryRateLimiter
from mailrelayd.sidecar import Sidecar, SidecarHooks
from mailrelayd.signworker import SignerSpec, SignWorker
from mailrelayd.smtp.auth import Authenticator, AuthThrottle
from mailrelayd.smtp.dataread import MemoryBudget
from mailrelayd.smtp.listener import ConnectionLimiter, SmtpContext, SmtpListener
from mailrelayd.smtp.policy import Policy
from mailrelayd.spool.lock import SpoolLock, SpoolLockedError
from mailrelayd.spool.store import MessageRecord, NewMessage, QueueFilter, RecipientRecord, Spool, check_database
from mailrelayd.submit import LocalSubmitter
from mailrelayd.systemd import Notifier
from mailrelayd.tlsctx import CertInfo, TlsSetupError, load_chain, read_cert_info, server_context
from mailrelayd.users import User, UsersFileError, api_key_index, load_users
from mailrelayd.webhooks import Webhooks
from mailrelayd.webhooks import read_secret as read_webhook_secret

log = get_logger()


class SetupError(Exception):
    """The config parsed but something it names is unusable (cert, key, users file, DKIM key, spool,
    an address to bind). Like a :class:`ConfigError`, its text names the config file as given, then
    the key: ``/etc/mailrelayd/mailrelayd.toml: tls.key_file: ...``."""

    def __init__(self, cfg: Config, message: str) -> None:
        super().__init__(f"{cfg.source_name}: {message}")


@dataclass(frozen=True)
class Runtime:
    """Everything derived from the config files, built completely before it is used."""

    cfg: Config
    tls_context: ssl.SSLContext | None
    cert_info: CertInfo | None
    users: dict[str, User]
    dkim_keys: tuple[LoadedKey, ...]
    dkim_signer: DkimSigner | None
    verp_secrets: tuple[bytes, ...] = ()
    webhook_secrets: tuple[bytes, ...] = ()


def build_runtime(cfg: Config) -> Runtime:
    """Load and validate every file the config names. Raises :class:`SetupError` whose message
    names the config key and file."""
    needs_tls = any(lst.tls != "none" for lst in cfg.listeners)
    tls_context: ssl.SSLContext | None = None
    cert_info: CertInfo | None = None
    try:
        if needs_tls or (cfg.tls.cert_file and cfg.tls.key_file):
            assert cfg.tls.cert_file is not None and cfg.tls.key_file is not None
            tls_context = server_context(cfg.tls.cert_file, cfg.tls.key_file)
            cert_info = read_cert_info(cfg.tls.cert_file)
    except TlsSetupError as e:
        raise SetupError(cfg, str(e)) from None
    users: dict[str, User] = {}
    if cfg.auth.users_file is not None:
        try:
            users = load_users(cfg.auth.users_file)
        except UsersFileError as e:
            raise SetupError(cfg, f"auth.users_file: {e}") from None
    specs = [DkimKeySpec(d.domain, d.selector, d.key_file, d.algorithm) for d in cfg.dkim]
    try:
        keys = load_keys(specs)
    except DkimKeyError as e:
        idx = next((i for i, s in enumerate(specs) if str(s.key_file) in str(e)), None)
        where = f"dkim[{idx}].key_file" if idx is not None else "dkim"
        raise SetupError(cfg, f"{where}: {e}") from None
    signer = None
    if keys:
        signer = DkimSigner(keys, headers=cfg.signing.headers, parent_domains=cfg.signing.parent_domains,
                            expire=cfg.signing.expire or None)
    try:
        verp = tuple(cfg.verp_secrets())
    except (OSError, UnicodeDecodeError) as e:
        raise SetupError(cfg, f"feedback.verp_secret_file: {cfg.feedback.verp_secret_file}: cannot read: {e}") from None
    for i, r in enumerate(cfg.routes):
        if r.password_file is not None:
            try:
                r.password_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise SetupError(cfg, f"routes[{i}].password_file: {r.password_file}: cannot read: {e}") from None
    if cfg.feedback.store_password_file is not None:
        try:
            cfg.feedback.store_password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SetupError(cfg, f"feedback.store_password_file: {cfg.feedback.store_password_file}: "
                             f"cannot read: {e}") from None
    hook_secrets = []
    for i, w in enumerate(cfg.webhooks):
        try:
            hook_secrets.append(read_webhook_secret(w.secret_file))
        except (OSError, ValueError) as e:
            raise SetupError(cfg, f"webhooks[{i}].secret_file: {w.secret_file}: cannot use: {e}") from None
    if cfg.sendmail.user is not None and cfg.sendmail.user not in users:
        raise SetupError(cfg, f"sendmail.user: no user {cfg.sendmail.user!r} in {cfg.auth.users_file}")
    return Runtime(cfg, tls_context, cert_info, users, keys, signer, verp, tuple(hook_secrets))


def check(path: Path) -> Runtime:
    """What ``mailrelayd check-config`` runs: parse, then build the runtime."""
    return build_runtime(load_config(path))


class _Hooks(Hooks):
    """Scheduler integrations: suppression, VERP, local domains, synchronous 5xx feedback."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def is_suppressed(self, address: str) -> bool:
        return self.d.suppressions.is_suppressed(address)

    def verp_enabled(self, msg: MessageRecord) -> bool:
        return bool(self.d.cfg.feedback.bounce_domain and msg.mail_from and not msg.is_dsn)

    def return_path(self, msg: MessageRecord, rcpt: RecipientRecord) -> str:
        cfg = self.d.cfg
        if not self.verp_enabled(msg):
            return msg.mail_from
        assert cfg.feedback.bounce_domain is not None
        return make_return_path(msg.queue_id, rcpt.index, cfg.feedback.bounce_domain, self.d.verp_secrets[0])

    def is_local(self, domain: str) -> bool:
        return self.d.policy_domains(domain)

    def permanent_failure(self, msg: MessageRecord, rcpt: RecipientRecord, outcome: Any) -> None:
        self.d.feedback.smtp_failure(msg, rcpt, outcome)


class Daemon:
    def __init__(self, config_path: Path, *, log_format: str | None = None) -> None:
        self.config_path = config_path
        self.log_format = log_format
        self.log_stream = LineBatcher(sys.stdout)  # one write per 10 ms at most (see LineBatcher)
        self.notifier = Notifier()
        self.started = time.time()
        self._stop = asyncio.Event()
        self._exit_code = 0
        self.listeners: list[SmtpListener] = []
        self.sidecar: Sidecar | None = None
        self._bg: list[asyncio.Task[Any]] = []
        self._auth_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        self._reloading = False
        self._reload_again = False  # a SIGHUP came during a reload (see reload())
        self._commits: set[asyncio.Task[str]] = set()  # spool commits in flight (see Intake)
        self.api: ApiServer | None = None
        self.breaker: CircuitBreaker | None = None
        self.sign_worker: SignWorker | None = None
        self._counts: asyncio.Future[dict[str, int]] | None = None  # suppression counts being read

    # --- building -----------------------------------------------------------------------
    def _apply(self, rt: Runtime) -> None:
        """Swap in a runtime: new connections and new deliveries use it."""
        self.rt = rt
        self.cfg = rt.cfg
        cfg = rt.cfg
        self.verp_secrets = list(rt.verp_secrets)
        self.throttle.configure(cfg.auth.max_failures, cfg.auth.failure_window, cfg.auth.lockout)
        self.limiter.max_total = cfg.limits.max_connections
        self.limiter.max_per_ip = cfg.limits.max_connections_per_ip
        authenticator = Authenticator(rt.users, self._auth_pool) if rt.users else None
        if rt.dkim_signer is None and self.sign_worker is not None:  # a reload removed every key
            self.sign_worker.close()
            self.sign_worker = None
        signer = self._make_signer(rt.dkim_signer) if rt.dkim_signer is not None else None
        for lst in self.listeners:
            lcfg = next((x for x in cfg.listeners if x.name == lst.name), lst.config)
            lst.config = _keep_socket_settings(lst.config, lcfg)
            policy = Policy(cfg, lst.config, self.suppressions.is_suppressed, limiter=self.rate_limiter)
            lst.context = SmtpContext(cfg=cfg, policy=policy,
                                      tls_context=rt.tls_context, authenticator=authenticator,
                                      throttle=self.throttle, signer=signer, spool=self.spool,
                                      on_accepted=self._accepted,
                                      intake=self.make_intake(cfg, policy.check_headers, signer),
                                      budget=self.budget)
        self.budget.limit = cfg.limits.max_data_memory
        # One normalised set of our own domains, shared with every listener's Policy above.
        self._local_domains = cfg.local_domains
        self.rate_limiter.forget(set(rt.users))
        self._apply_local_submission(rt, signer)
        if self.breaker is not None:
            self.breaker.reconfigure(breaker_settings(cfg.feedback))
        metrics.DKIM_KEYS_LOADED.set(len(rt.dkim_keys))
        metrics.sender_domain_label.set_always({d.domain for d in cfg.dkim})
        metrics.init_known_labels(  # every family exported from the first scrape (see metrics.py)
            listeners=[lst.name for lst in cfg.listeners], sender_domains=sorted({d.domain for d in cfg.dkim}),
            destination_domains=sorted({r.domain for r in cfg.routes if r.domain != "*"}),
            dkim_keys=[(d.domain, d.algorithm) for d in cfg.dkim],
            webhooks=[cfg.webhook_name(i) for i in range(len(cfg.webhooks))], users=sorted(rt.users))
        if rt.cert_info is not None:
            metrics.TLS_CERT_NOT_AFTER.set(rt.cert_info.not_after)

    def _make_signer(self, signer: DkimSigner) -> Any:
        if self.sign_worker is not None:
            self.sign_worker.close()  # reload: requests in flight finish in the daemon
            self.sign_worker = None
        cfg = self.cfg
        sign_async = signer.sign_async
        if cfg.signing.helper:
            spec = SignerSpec.of([DkimKeySpec(d.domain, d.selector, d.key_file, d.algorithm) for d in cfg.dkim],
                                 cfg.signing.headers, cfg.signing.parent_domains, cfg.signing.expire or None,
                                 public_keys=[k.public_key_b64 for k in self.rt.dkim_keys])
            self.sign_worker = SignWorker(signer, spec)
            self.sign_worker.start()
            sign_async = self.sign_worker.sign

        async def sign(data: bytes, from_domain: str) -> bytes:
            # A helper process, else inline for ordinary sizes and a thread for large ones.
            res = await sign_async(data)
            if res.error:
                raise DkimSignError(res.error)
            return res.headers
        return sign

    def _share_limits(self, cfg: Config) -> None:
        """With a shared (PostgreSQL) store, the AUTH lockout and the per-user sending limits count
        across every node too."""
        client = getattr(self.suppressions, "client", None)
        if client is not None:
            from mailrelayd.sharedlimits import PgRateLimiter, SharedAuthThrottle

            self.throttle = SharedAuthThrottle(client, asyncio.get_running_loop(), cfg.auth.max_failures,
                                               cfg.auth.failure_window, cfg.auth.lockout)
            self.rate_limiter = PgRateLimiter(client, asyncio.get_running_loop())  # type: ignore[assignment]

    def _local_policy(self, cfg: Config, name: str) -> Policy:
        # Local front ends follow submission rules: the user is known, allowed_from and limits apply.
        lcfg = ListenerConfig(name=name, address=HostPort("127.0.0.1", 0), mode="submission", tls="none")
        return Policy(cfg, lcfg, self.suppressions.is_suppressed, limiter=self.rate_limiter)

    def _apply_local_submission(self, rt: Runtime, signer: Signer | None) -> None:
        """The sendmail service and the HTTP API's submitter under this runtime."""
        cfg = rt.cfg
        policy = self._local_policy(cfg, "sendmail")
        user = rt.users.get(cfg.sendmail.user) if cfg.sendmail.user else None
        submitter = LocalSubmitter(cfg, policy, self.make_intake(cfg, policy.check_headers, signer),
                                   listener="sendmail", protocol="LOCAL")
        self.sendmail_service = SendmailService(cfg, user, submitter if user else None)
        api_policy = self._local_policy(cfg, "http")
        self.api_submitter = LocalSubmitter(cfg, api_policy, self.make_intake(cfg, api_policy.check_headers, signer),
                                            listener="http", protocol="HTTPS" if cfg.api.tls else "HTTP")
        self.api_context = ApiContext(cfg, api_key_index(rt.users), self.api_submitter)
        if self.api is not None:
            self.api.context = self.api_context

    def make_intake(self, cfg: Config, check_headers: HeaderCheck, signer: Signer | None) -> Intake:
        """An :class:`Intake` for one front end (an SMTP listener, sendmail, HTTP) under ``cfg``.
        All share one set of commits in flight, which shutdown waits for before closing the spool."""
        return Intake(cfg, check_headers=check_headers, signer=signer, spool=self.spool,
                      on_accepted=self._accepted, committing=self._commits)

    def policy_domains(self, domain: str) -> bool:
        return domain in self._local_domains

    def _accepted(self, msg: NewMessage) -> None:
        self.scheduler.submit(msg)

    async def _mx_names(self, domain: str) -> list[str]:
        """MX host names for [[shaping]] grouping by MX suffix (the resolver caches by TTL)."""
        return [h.name for h in await self.resolver.resolve(domain, self.cfg.delivery.port)]

    async def _enqueue_report(self, recipients: tuple[str, ...], data: bytes, sender_domain: str) -> None:
        """A TLS-RPT report mail (RFC 8460 §5.3) into our own queue: DKIM-signed when a key of the
        reporting domain is configured, null sender (a report must not bounce back into the queue)."""
        signer = self.rt.dkim_signer
        if signer is not None:
            res = await signer.sign_async(data)
            if not res.error:
                data = res.headers + data
        msg = NewMessage(queue_id=self.spool.new_queue_id(), mail_from="", recipients=recipients, data=data,
                         received_at=time.time(), listener="tlsrpt", sender_domain=sender_domain)
        await self.spool.commit(msg)
        self.scheduler.submit(msg)

    # --- running ------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = load_config(self.config_path)
        configure_logging(self.log_format or cfg.logging.format, cfg.logging.level, self.log_stream)
        rt = build_runtime(cfg)
        metrics.UP_SINCE.set(self.started)
        metrics.CONFIG_LAST_RELOAD_SUCCESS.set(1)
        self.throttle = AuthThrottle(cfg.auth.max_failures, cfg.auth.failure_window, cfg.auth.lockout)
        self.limiter = ConnectionLimiter(cfg.limits.max_connections, cfg.limits.max_connections_per_ip)
        self.rate_limiter = MemoryRateLimiter()
        self.budget = MemoryBudget(cfg.limits.max_data_memory)
        metrics.DATA_MEMORY.set_function(lambda: self.budget.used)
        cfg.server.state_dir.mkdir(parents=True, exist_ok=True)
        self._spool_lock = SpoolLock(cfg.server.spool_dir)
        try:
            self._spool_lock.acquire()
        except SpoolLockedError as e:
            raise SetupError(cfg, f"server.spool_dir: {e}") from None
        self.spool = Spool(cfg.server.spool_dir, min_free_space=cfg.server.min_free_space)
        try:
            # Both databases pass PRAGMA quick_check before anything is accepted or delivered:
            # a damaged spool would otherwise re-deliver everything it cannot mark delivered.
            key = "server.spool_dir"
            await self.spool.open()
            key = "server.state_dir"  # the error names the file; the key says which setting holds it
            await asyncio.to_thread(check_database, cfg.server.state_dir / "suppressions.db")
            self.suppressions = await asyncio.to_thread(open_store, cfg.feedback, cfg.server.state_dir, daemon=True)
        except SpoolCorruptError as e:
            await self.spool.close()
            self._spool_lock.release()
            raise SetupError(cfg, f"{key}: {e}: refusing to start; restore the last backup "
                             f"(mailrelayd restore) or salvage it, see {RUNBOOK_SPOOL}") from None
        except SpoolError as e:
            await self.spool.close()
            self._spool_lock.release()
            raise SetupError(cfg, f"{key}: {e}") from None
        except (OSError, UnicodeDecodeError, RuntimeError) as e:
            await self.spool.close()
            self._spool_lock.release()
            raise SetupError(cfg, f"feedback.store: {e}") from None
        self._share_limits(cfg)
        self.breaker = CircuitBreaker(breaker_settings(cfg.feedback), self._hold_sender_domain)
        self.feedback = FeedbackProcessor(self, on_outcome=self._feedback_outcome)
        self.resolver = MxResolver(cfg.dns)
        self.transport = Transport(cfg, self.resolver)
        await self.transport.tls.load()
        self.scheduler = Scheduler(cfg, self.spool, self.transport, dsn_builder=build_dsn,
                                   local=self.feedback.process, hooks=_Hooks(self), mx_names=self._mx_names)
        # Outcomes, DSNs, holds and admin actions: ``queue_manager.hold(QueueFilter(...), until, reason)``.
        self.queue_manager = self.scheduler.queue
        self.queue_ops = QueueOps(self.spool, self.scheduler)
        self.webhooks = Webhooks(self.spool)
        await self.webhooks.configure(cfg, rt.webhook_secrets)
        # Listeners are created before _apply so it can give them their context.
        self.listeners = [SmtpListener(lc, None, self.limiter) for lc in cfg.listeners]  # type: ignore[arg-type]
        self._apply(rt)
        await self.scheduler.start()
        for i, lst in enumerate(self.listeners):
            try:
                await lst.start()
            except OSError as e:
                raise await self._bind_failed(cfg, f"listeners[{i}].address", lst.config.address, e) from None
            log.info("listener.started", listener=lst.name, address=str(lst.config.address),
                     bound=f"{lst.bound[0]}:{lst.bound[1]}" if lst.bound else None, mode=lst.config.mode,
                     tls=lst.config.tls)
        # The admin socket is served even without the HTTP sidecar: the queue CLI must never fall
        # back to editing the spool under a running daemon.
        self.sidecar = Sidecar(SidecarHooks(readiness=self.readiness, before_scrape=self._update_gauges,
                                            admin=self._admin), started=self.started)
        # Two calls, so that a failure names the key it is about.
        http = cfg.http.address if cfg.http.enabled else None
        if http is not None:
            try:
                await self.sidecar.start(http.host, http.port, None)
            except OSError as e:
                raise await self._bind_failed(cfg, "http.address", http, e) from None
        try:
            await self.sidecar.start(None, None, cfg.admin_socket)
        except OSError as e:
            raise await self._bind_failed(cfg, "server.admin_socket", cfg.admin_socket, e) from None
        if cfg.api.address is not None:
            self.api = ApiServer(self.api_context)
            try:
                await self.api.start(cfg.api.address.host, cfg.api.address.port,
                                     rt.tls_context if cfg.api.tls else None,
                                     max_body=cfg.limits.max_message_size * 2 + 65536)
            except OSError as e:
                raise await self._bind_failed(cfg, "api.address", cfg.api.address, e) from None
            log.info("api.started", address=str(cfg.api.address), tls=cfg.api.tls,
                     bound=f"{self.api.bound[0]}:{self.api.bound[1]}" if self.api.bound else None)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        self._bg.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self._bg.append(asyncio.create_task(self._maildrop_loop(), name="maildrop"))
        self._bg.append(asyncio.create_task(self._circuit_breaker(), name="circuit-breaker"))
        self._bg.append(asyncio.create_task(self.transport.tls.run(self._enqueue_report), name="outbound-tls"))
        if self.notifier.watchdog_interval:
            self._bg.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval), name="watchdog"))
        # Everything made so far (modules, classes, config, TLS contexts: about 60,000 objects) lives
        # as long as the process. Left to the collector, every full collection walks them all and
        # stops the loop for 50-65 ms on this VM; frozen, a full collection takes about 1 ms
        # (bench/README.md, ninth session). A reload thaws them to collect what it replaced.
        gc.freeze()
        self.notifier.ready(status="accepting mail")
        log.info("daemon.ready", version=__version__,
                 listeners=[lst.name for lst in self.listeners], pid=os.getpid(),
                 http=f"{self.sidecar.bound[0]}:{self.sidecar.bound[1]}" if self.sidecar and self.sidecar.bound
                 else None)
        await self._stop.wait()
        await self._shutdown(cfg.server.shutdown_timeout)
        return self._exit_code

    async def _bind_failed(self, cfg: Config, key: str, address: object, e: OSError) -> SetupError:
        """Stop what was started; the error to raise names the key whose address could not be bound."""
        # asyncio puts its whole sentence ("error while attempting to bind on address ...") in strerror.
        why = os.strerror(e.errno).lower() if e.errno else str(e)
        event = {"listeners": "listener", "api": "api"}.get(key.partition("[")[0].partition(".")[0], "sidecar")
        log.error(f"{event}.bind_failed", key=key, address=str(address), error=why)
        await self._shutdown(0)
        return SetupError(cfg, f"{key}: cannot bind {address}: {why}")

    async def _shutdown(self, timeout: float) -> None:
        self.notifier.stopping()
        log.info("daemon.stopping", timeout=timeout)
        deadline = time.monotonic() + timeout
        for lst in self.listeners:
            await lst.stop_accepting()
        while any(lst.sessions for lst in self.listeners) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        aborted = sum(lst.abort_sessions() for lst in self.listeners)
        if self.api is not None:
            await self.api.stop()
        # A commit that outlived its session still completes and is handed to the scheduler.
        await wait_commits(self._commits)
        if self.sign_worker is not None:  # nothing is signed from here on; it exits on EOF
            self.sign_worker.close()
        await self.scheduler.stop(max(0.0, deadline - time.monotonic()))
        for t in self._bg:
            t.cancel()
        await self.transport.close()
        if self.sidecar is not None:
            await self.sidecar.stop()
        await self.webhooks.close()
        await self.spool.close()
        self._spool_lock.release()
        await asyncio.to_thread(self.suppressions.close)
        self._auth_pool.shutdown(wait=False)
        log.info("daemon.stopped", aborted_sessions=aborted)

    async def reload(self) -> bool:
        """SIGHUP: all or nothing. A SIGHUP during a reload is not dropped: the files may have changed
        after that reload read them, so they are read once more when it ends. Ignored once stopping."""
        if self._stop.is_set():
            log.info("config.reload_ignored", reason="shutting down")
            return False
        if self._reloading:
            self._reload_again = True
            return False
        self._reloading = True
        try:
            ok = await self._reload_once()
            while self._reload_again and not self._stop.is_set():
                self._reload_again = False
                ok = await self._reload_once()
            return ok
        finally:
            self._reloading = self._reload_again = False

    async def _reload_once(self) -> bool:
        self.notifier.reloading()
        try:
            cfg = await asyncio.to_thread(load_config, self.config_path)
            rt = await asyncio.to_thread(build_runtime, cfg)
            if self._stop.is_set():  # SIGTERM while the files were read: the shutdown has begun
                log.info("config.reload_ignored", reason="shutting down")
                return False
            restart_needed = self._restart_only_changes(cfg)
            if rt.tls_context is not None and self.rt.tls_context is not None and cfg.tls.cert_file \
                    and cfg.tls.key_file:
                # Implicit-TLS servers hold the old context object: load the new chain into it too.
                load_chain(self.rt.tls_context, cfg.tls.cert_file, cfg.tls.key_file)
            self._apply(rt)
            await self.webhooks.configure(cfg, rt.webhook_secrets)
            self.scheduler.reconfigure(cfg)
            self.transport.reconfigure(cfg)
            self.resolver.reconfigure(cfg.dns)
            configure_logging(self.log_format or cfg.logging.format, cfg.logging.level, self.log_stream)
            metrics.CONFIG_RELOADS.inc()
            metrics.CONFIG_LAST_RELOAD_SUCCESS.set(1)
            log.info("config.reloaded", restart_needed_for=restart_needed or None)
            # The replaced config and runtime were frozen with the rest at start-up (see run()):
            # thawed, a cycle among them can be collected; one full collection per reload.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            return True
        except (ConfigError, SetupError, OSError) as e:
            metrics.CONFIG_RELOAD_FAILURES.inc()
            metrics.CONFIG_LAST_RELOAD_SUCCESS.set(0)
            log.error("config.reload_failed", error=str(e))
            return False
        finally:
            if not self._stop.is_set():  # after STOPPING=1, READY=1 would tell systemd we serve again
                self.notifier.ready(status="accepting mail")

    def _restart_only_changes(self, new: Config) -> list[str]:
        """Keys that a reload cannot apply (they are reported, and keep their old values)."""
        old = self.cfg
        out = []
        if [(x.name, x.address) for x in old.listeners] != [(x.name, x.address) for x in new.listeners]:
            out.append("listeners (names/addresses)")
        for key in ("spool_dir", "state_dir", "admin_socket"):
            if getattr(old.server, key) != getattr(new.server, key):
                out.append(f"server.{key}")
        if old.http != new.http:
            out.append("http")
        for key in ("store", "store_password_file", "store_poll_interval", "store_connect_timeout"):
            if getattr(old.feedback, key) != getattr(new.feedback, key):
                out.append(f"feedback.{key}")
        if old.api != new.api:
            out.append("api")
        for lst in self.listeners:  # against what the sockets were set up for (see _keep_socket_settings)
            lcfg = next((x for x in new.listeners if x.name == lst.name), None)
            # The address is left out: a changed one is reported above, under its own name.
            if lcfg is not None and _keep_socket_settings(lst.config, lcfg) != replace(lcfg,
                                                                                      address=lst.config.address):
                out.append(f"listeners ({lst.name}: proxy_protocol or implicit tls)")
        return out

    def stop(self) -> None:
        self._stop.set()

    # --- health -------------------------------------------------------------------------
    def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        down = [lst.name for lst in self.listeners if not lst.serving]
        checks["listeners"] = "ok" if not down else f"fail: not bound: {', '.join(down)}"
        free = self.spool.free_bytes()
        if not os.access(self.cfg.server.spool_dir, os.W_OK):
            checks["spool"] = f"fail: {self.cfg.server.spool_dir} is not writable"
        elif free < self.cfg.server.min_free_space:
            checks["spool"] = f"fail: {free} bytes free, below server.min_free_space ({self.cfg.server.min_free_space})"
        else:
            checks["spool"] = "ok"
        if any(lst.config.tls != "none" for lst in self.listeners):
            ci = self.rt.cert_info
            if self.rt.tls_context is None or ci is None:
                checks["tls"] = "fail: no certificate loaded"
            elif ci.not_after < time.time():
                checks["tls"] = "fail: certificate expired"
            else:
                checks["tls"] = "ok"
        if self.cfg.dkim:
            n = len(self.rt.dkim_keys)
            checks["dkim"] = "ok" if n == len(self.cfg.dkim) else f"fail: {n} of {len(self.cfg.dkim)} keys loaded"
        checks["scheduler"] = "ok" if self.scheduler.loaded else "fail: queue not loaded yet"
        checks["spool_integrity"] = "ok" if self.spool.corrupt is None else \
            f"fail: {self.spool.corrupt}; see {RUNBOOK_SPOOL}"
        halted = self.scheduler.halted or \
            ("the spool is damaged; deliveries are stopped" if self.spool.corrupt is not None else None)
        checks["delivery"] = "ok" if halted is None else f"fail: {halted}"
        # A shared store that is unreachable degrades the node but never makes it unready: every
        # node would fail together, and the last known list still protects every recipient.
        st = self.suppressions.status()
        if st.backend != "sqlite":  # a local file has nothing to report here
            checks["suppression_store"] = "ok" if st.up else f"degraded: {st.detail}"
        metrics.SUPPRESSION_STORE_UP.set(1 if st.up else 0)
        metrics.SUPPRESSION_OUTBOX.set(st.outbox)
        ok = all(not v.startswith("fail") for v in checks.values())
        metrics.READY.set(1 if ok else 0)
        for k, v in checks.items():
            metrics.READY_CHECK.labels(k).set(0 if v.startswith("fail") else 1)  # degraded is not failing
        return checks

    async def _update_gauges(self) -> None:
        st = await self.spool.stats()
        busy = self.scheduler.inflight_by_state
        for state in ("pending", "deferred"):  # a recipient being attempted counts as inflight only
            metrics.QUEUE_RECIPIENTS.labels(state).set(
                max(0, st.recipients.get(state, 0) - st.held.get(state, 0) - busy.get(state, 0)))
        metrics.QUEUE_RECIPIENTS.labels("inflight").set(sum(busy.values()))
        metrics.QUEUE_RECIPIENTS.labels("held").set(sum(st.held.values()))  # never attempted while held
        metrics.QUEUE_MESSAGES.set(st.messages)
        metrics.QUEUE_OLDEST_AGE.set(max(0.0, time.time() - st.oldest_received_at) if st.oldest_received_at else 0)
        await self._suppression_counts()
        self.readiness()
        self.spool.free_bytes(force=True)
        await self.webhooks.update_gauges()

    async def _suppression_counts(self) -> None:
        """Refresh the ``suppressions{kind}`` gauges for a scrape. A shared store that stalls (no
        answer until the call times out, twice ``store_connect_timeout``) must not stall /metrics
        past a scraper's timeout, just when its ``suppression_store_up`` matters: one read at a time,
        waited for up to :data:`SCRAPE_STORE_WAIT`; the gauges take its result whenever it comes."""
        if self._counts is None or self._counts.done():
            self._counts = asyncio.ensure_future(asyncio.to_thread(self.suppressions.counts_by_kind))
            self._counts.add_done_callback(_set_suppression_gauges)
        await asyncio.wait({self._counts}, timeout=SCRAPE_STORE_WAIT)

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.suppressions.refresh)
            self.readiness()
            now = time.time()
            if now - last_prune > 3600:
                last_prune = now
                with contextlib.suppress(Exception):
                    keep = max(self.cfg.feedback.verp_retention, self.cfg.history.retention)
                    await self.spool.prune_history(now - keep)

    async def _admin(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """The admin socket: ``history`` here, the queue verbs in QueueOps."""
        parts = [p for p in path.split("/") if p]
        if parts == ["history"] and method in ("GET", "POST"):
            return await history.handle(self.spool, body)
        if parts == ["sendmail"] and method == "POST":
            return await self.sendmail_service.handle(body)
        return await self.queue_ops.handle(method, path, body)

    async def _maildrop_loop(self) -> None:
        """Messages `sendmail` left while the daemon was down (or could not reach the socket)."""
        while True:
            directory = self.cfg.maildrop_dir
            try:
                await asyncio.to_thread(maildrop.ensure_dir, directory)
                await maildrop.pickup(directory, self.sendmail_service)
            except Exception as e:  # never let a bad file stop the pickup for good
                log.exception("maildrop.error", error=str(e))
            await asyncio.sleep(maildrop.PICKUP_EVERY)

    # --- feedback circuit breaker ([feedback] circuit_breaker) -------------------------------
    def _feedback_outcome(self, sender_domain: str, kind: str) -> None:
        if self.cfg.feedback.circuit_breaker and self.breaker is not None:
            self.breaker.record(sender_domain, kind)

    def _hold_sender_domain(self, domain: str, until: float, reason: str) -> None:
        """The breaker's pause: hold the domain's outbound mail in the queue (``queue release`` ends it)."""
        task = asyncio.ensure_future(self.queue_manager.hold(QueueFilter(sender="@" + domain), until or None, reason))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or log.error(
            "feedback.circuit_breaker_hold_failed", sender_domain=domain, error=repr(t.exception())))

    async def _circuit_breaker(self) -> None:
        while True:
            # Once a minute; a short window is evaluated more often (60 looks per window).
            await asyncio.sleep(min(60.0, max(1.0, self.cfg.feedback.circuit_breaker_window / 60)))
            if not self.cfg.feedback.circuit_breaker or self.breaker is None:
                continue
            try:
                since = time.time() - self.cfg.feedback.circuit_breaker_window
                self.breaker.set_volume(await self.spool.sent_count_by_sender_domain(since))
                for trip in self.breaker.evaluate():
                    metrics.CIRCUIT_BREAKER_TRIPS.labels(metrics.sender_domain_label(trip.domain), trip.reason).inc()
            except Exception as e:  # the breaker must never take the daemon down
                log.error("feedback.circuit_breaker_failed", error=repr(e))

    async def _watchdog(self, interval: float) -> None:
        # Runs on the event loop: if the loop is stuck, systemd stops hearing from us and restarts.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def _keep_socket_settings(bound: ListenerConfig, new: ListenerConfig) -> ListenerConfig:
    """``new`` with what a listening socket was set up for kept until a restart: its address, whether
    it reads a PROXY header, and whether TLS starts at the first byte (a plain socket whose sessions
    were told they are in TLS would take AUTH in the clear)."""
    tls = new.tls if (new.tls == "implicit") == (bound.tls == "implicit") else bound.tls
    return replace(new, address=bound.address, proxy_protocol=bound.proxy_protocol, tls=tls)


# Seconds (CPython's default: 0.005). Each hand-over of the GIL is a pair of context switches that
# the busy loop pays for; the spool writer now needs about a dozen per group commit (set-based
# statements), so a longer interval costs little latency. Interleaved runs of bench/latency.py
# (20 sessions): 20 µs 368-431 msg/s, p99 24-25 ms; 250 µs 502-579 msg/s, p99 22-26 ms;
# 500 µs about the same; 1 ms and 5 ms p99 31-34 ms. bench/README.md, fifth session.
SCRAPE_STORE_WAIT = 1.0  # seconds a /metrics scrape waits for the suppression counts


def _set_suppression_gauges(fut: asyncio.Future[dict[str, int]]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if isinstance(exc, StoreUnavailableError):
        return  # a shared store that is down: the gauges keep their last values
    if exc is not None:
        log.error("metrics.suppression_counts_failed", error=f"{type(exc).__name__}: {exc}")
        return
    for kind, n in fut.result().items():
        metrics.SUPPRESSIONS.labels(kind).set(n)


GIL_SWITCH_INTERVAL = 0.00025


def run_daemon(config_path: Path, log_format: str | None = None) -> int:
    """Entry point for ``mailrelayd run``: uvloop when available (``MAILRELAYD_EVENT_LOOP=asyncio``
    selects asyncio's own loop: the tests run the daemon under both)."""
    daemon = Daemon(config_path, log_format=log_format)
    # The spool writer (and the reader and auth threads) give up the GIL in every SQLite step and
    # must win it back from a busy event loop once per statement; at the default 5 ms switch
    # interval a group commit of a few dozen statements waited tens of milliseconds for the GIL
    # alone, not for the disk. A shorter interval bounds each of those waits; too short, and the
    # loop spends its time handing the GIL over (see GIL_SWITCH_INTERVAL).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    fix_mmap_threshold()  # large message bodies in their own mappings, freed at once (malloc.py)
    try:
        if os.environ.get("MAILRELAYD_EVENT_LOOP") == "asyncio":
            return asyncio.run(daemon.run())
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(daemon.run())
        return uvloop.run(daemon.run())
    finally:
        daemon.log_stream.flush_now()  # lines of the last 10 ms
