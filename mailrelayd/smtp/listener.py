"""Listeners: one asyncio server per ``[[listeners]]`` entry, connection limits, drain on stop."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from mailrelayd import metrics
from mailrelayd.config import Config, ListenerConfig
from mailrelayd.intake import Intake, Signer
from mailrelayd.smtp.auth import Authenticator, AuthThrottle
from mailrelayd.smtp.connection import SmtpConnection
from mailrelayd.smtp.dataread import MemoryBudget
from mailrelayd.smtp.policy import Policy
from mailrelayd.smtp.protocol import Hooks, Settings
from mailrelayd.smtp.tlsaccept import ImplicitTlsServer
from mailrelayd.spool.store import NewMessage, Spool


@dataclass(frozen=True)
class SmtpContext:
    """Everything a session needs, swapped as a whole on reload (new connections see the new one)."""

    cfg: Config
    policy: Policy
    tls_context: ssl.SSLContext | None
    authenticator: Authenticator | None
    throttle: AuthThrottle
    signer: Signer | None
    spool: Spool
    on_accepted: Callable[[NewMessage], None]
    intake: Intake  # header policy, trace, DKIM, durable commit, scheduling (shared with other front ends)
    budget: MemoryBudget | None = None  # message bytes in memory, across all listeners (limits.max_data_memory)


class ConnectionLimiter:
    """Caps concurrent inbound connections overall and per client IP (shared by all listeners)."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> str | None:
        """Take a slot; returns None, or the refusal reason for the connections metric."""
        if self.total >= self.max_total:
            return "rejected_limit"
        n = self._per_ip.get(ip, 0)
        if n >= self.max_per_ip:
            return "rejected_per_ip"
        self._per_ip[ip] = n + 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        n = self._per_ip.get(ip, 0) - 1
        if n <= 0:
            self._per_ip.pop(ip, None)
        else:
            self._per_ip[ip] = n
        self.total -= 1


class SmtpListener:
    """An SMTP server socket for one listener config."""

    def __init__(self, config: ListenerConfig, context: SmtpContext, limiter: ConnectionLimiter) -> None:
        self.config = config
        self.context = context
        self.limiter = limiter
        self.sessions: set[SmtpConnection] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | ImplicitTlsServer | None = None
        self._replies: dict[tuple[str, str], Counter] = {}
        self._active = metrics.CONNECTIONS_ACTIVE.labels(config.name)
        self._active.set_function(lambda: len(self.sessions))
        self._parts: tuple[SmtpContext, Settings, Hooks] | None = None

    def protocol_parts(self) -> tuple[Settings, Hooks]:
        """The protocol's settings and hooks under the current context (rebuilt when it changes)."""
        ctx = self.context
        if self._parts is None or self._parts[0] is not ctx:
            lim = ctx.cfg.limits
            policy = ctx.policy
            settings = Settings(hostname=ctx.cfg.server.hostname, tls_mode=self.config.tls,
                                submission=self.config.mode == "submission", auth_offered=policy.auth_offered,
                                max_message_size=lim.max_message_size, max_line_length=lim.max_line_length,
                                max_errors=lim.max_errors, max_junk_commands=lim.max_junk_commands,
                                max_recipient_overshoot=lim.max_recipient_overshoot,
                                command_timeout=lim.command_timeout,
                                data_timeout=lim.data_timeout)
            hooks = Hooks(policy=policy, check_space=ctx.spool.check_space, auth_locked=self._auth_locked,
                          draining=lambda: self.draining, budget=ctx.budget, on_reply=self.count_reply,
                          on_suppressed=metrics.SUPPRESSED_REJECTIONS.labels("rcpt").inc)
            self._parts = (ctx, settings, hooks)
        return self._parts[1], self._parts[2]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def bound(self) -> tuple[str, int] | None:
        """The address actually bound (port 0 in the config gives an ephemeral port)."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def _auth_locked(self, ip: str) -> bool:
        locked = self.context.throttle.is_locked(ip)
        if locked:
            metrics.AUTH_THROTTLED.labels(self.config.name).inc()
        return locked

    def count_reply(self, command: str, cls: str) -> None:
        key = (command, cls)
        c = self._replies.get(key)
        if c is None:
            c = self._replies[key] = metrics.SMTP_REPLIES.labels(self.config.name, command, f"{cls}xx")
        c.inc()

    async def start(self) -> None:
        addr = self.config.address
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        implicit = self.config.tls == "implicit"
        if implicit and self.context.tls_context is None:
            raise OSError(f"listener {self.name}: implicit TLS without a TLS context")
        if implicit:
            # Our own accept loop: handshake failures counted with the peer, PROXY header before TLS.
            server = ImplicitTlsServer(self)
            await server.start(addr.host, addr.port, family)
            self._server = server
            return
        self._server = await asyncio.get_running_loop().create_server(
            lambda: SmtpConnection(self), host=addr.host, port=addr.port, family=family,
            reuse_address=True, backlog=1024,
        )

    async def stop_accepting(self) -> None:
        """Close the listening socket; sessions in progress carry on (graceful drain)."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for sess in list(self.sessions):
            sess.drain()

    def abort_sessions(self) -> int:
        """Close every remaining session (end of the drain timeout). Returns how many."""
        n = 0
        for sess in list(self.sessions):
            if sess.transport is not None:
                sess.abort()
                n += 1
        return n
