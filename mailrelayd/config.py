"""Configuration: one TOML file read with tomllib into frozen dataclasses.

Every error names the file and the key path (``mailrelayd.toml: listeners[1].tls: must be one
of starttls, implicit, none``). Relative paths resolve against the config file's directory.
Durations are ``"500ms"``, ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"`` (or a number of seconds);
sizes are ``"512KB"``, ``"25MB"``, ``"1GB"`` (binary multiples: 1 MB = 1024 KB = 1048576 bytes).

The loader is driven by the dataclass annotations below, so a new key is one typed field with a
default and a docstring comment; nothing else has to change.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(Exception):
    """A configuration problem, located by file (its path as the user gave it: ``-c``,
    ``$MAILRELAYD_CONFIG`` or the default) and key path."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


# --- value kinds ------------------------------------------------------------------------
class _Duration:
    """Marker: a duration string parsed to float seconds."""


class _Size:
    """Marker: a size string parsed to int bytes."""


class _Path:
    """Marker: a path resolved against the config file's directory."""


Duration = Annotated[float, _Duration]
Size = Annotated[int, _Size]
ConfPath = Annotated[Path, _Path]


class _Domain:
    """Marker: a domain name normalised on load by :func:`normalize_domain` (``"*"`` allowed
    where ``wildcard`` is set)."""

    def __init__(self, wildcard: bool = False) -> None:
        self.wildcard = wildcard


Domain = Annotated[str, _Domain()]
"""A domain as the rest of the code compares it: lower case, IDNA (A-labels), no trailing dot."""
DomainOrWildcard = Annotated[str, _Domain(wildcard=True)]


@dataclass(frozen=True)
class HostPort:
    """A ``host:port`` or ``[v6]:port`` endpoint."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _DefaultPort:
    """Marker: HostPort where the port may be omitted (defaults to the number given)."""

    def __init__(self, port: int) -> None:
        self.port = port


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KIB|K|MB|MIB|M|GB|GIB|G)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
"""TOML integers are 64-bit; tomllib accepts any length, which SQLite (and float() past 1e308) cannot take."""
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


MAX_DURATION = 100 * 365.25 * 86400.0


def parse_duration(value: Any) -> float:
    """Parse ``"30s"``-style durations (or a plain number of seconds) into seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        # Not repr(value): a table or array can be huge or nested past the recursion limit.
        raise ValueError(f"must be a duration like \"30s\", \"5m\", \"4h\" or \"5d\", not {_tname(value)}")
    seconds: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        seconds = float(value)
    else:
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None:
        raise ValueError(f"bad duration {value!r}: use a number with a unit, like \"30s\", \"5m\", \"4h\" or \"5d\"")
    if not math.isfinite(seconds):  # nan, inf, or a digit string too long for a float
        raise ValueError(f"bad duration {value!r}: must be a finite number of seconds")
    if seconds > MAX_DURATION:  # now + it must stay a date (datetime ends in 9999) and a 64-bit ms count
        raise ValueError(f"bad duration {value!r:.40}: at most 100 years")
    return seconds


def parse_size(value: Any) -> int:
    """Parse ``"25MB"``-style sizes (or a plain number of bytes) into bytes."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a size like \"25MB\", not {_tname(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            n = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]
            if n > _INT_MAX:  # also inf from a digit string too long for a float, which int() refuses
                raise ValueError(f"bad size {value!r}: too large")
            return int(n)
    raise ValueError(f"bad size {value!r}: use a number with a unit, like \"512KB\" or \"25MB\"")


def parse_hostport(value: Any, default_port: int | None = None) -> HostPort:
    """Parse ``host:port``, ``[v6]:port`` (and ``host`` alone when a default port is given)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a string \"host:port\" (IPv6 as \"[::1]:port\")")
    value = value.strip()
    host: str
    port_s: str | None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"bad address {value!r}: missing ']'")
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}")
        port_s = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad address {value!r}: {host!r} is not an IPv6 address") from None
    elif value.count(":") > 1:
        raise ValueError(f"bad address {value!r}: write IPv6 addresses as \"[{value}]:port\"")
    else:
        host, sep, port_s = value.partition(":")
        if not sep:
            port_s = None
    if port_s is None:
        if default_port is None:
            raise ValueError(f"bad address {value!r}: a port is required (\"host:port\")")
        port = default_port
    else:
        # ASCII digits only: isdigit() also takes "²" (which int() refuses) and any length (int() stops at 4300).
        if not (port_s.isascii() and port_s.isdigit() and len(port_s) <= 5) or int(port_s) > 65535:
            raise ValueError(f"bad address {value!r}: port must be a number from 0 to 65535")
        port = int(port_s)
    if not host:
        raise ValueError(f"bad address {value!r}: missing host")
    if not value.startswith("["):
        _check_host(value, host)
    return HostPort(host, port)


def _check_host(value: str, host: str) -> None:
    """An IPv4 address or a host name: "999.1.1.1" is neither (RFC 1123 §2.1: a host name's top
    label is never all digits), and would fail only when bound or connected to. Other names are
    left to the resolver (container names such as "mail_relay" are not RFC host names but resolve)."""
    if host.rpartition(".")[2].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"bad address {value!r}: {host!r} is not an IPv4 address") from None


def normalize_domain(value: str) -> str:
    """The one normal form of a domain name, used for config values (routes, local domains, DKIM,
    shaping) and SMTP envelope domains alike: lower case, IDNA-encoded (A-labels, RFC 5890), and
    without the root's trailing dot (``"Partner.Example."`` -> ``"partner.example"``).
    Raises ValueError if it is not a valid host name."""
    d = value.strip()
    if d.endswith(".") and not d.endswith(".."):
        d = d[:-1]  # one trailing dot is the DNS root; "a.." is malformed
    d = d.lower()
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"bad domain {value!r}") from None
    if not _DOMAIN_RE.match(d):
        raise ValueError(f"bad domain {value!r}")
    return d


def normalize_destination(value: str) -> str:
    """A delivery destination as [[shaping]] ``match`` and ``queue --domain`` name it: a domain
    (:func:`normalize_domain`), or an MX host suffix with its leading dot (``".google.com"``).
    Raises ValueError if it is neither."""
    d = value.strip()
    if d.startswith("."):
        return "." + normalize_domain(d[1:])
    return normalize_domain(d)


@dataclass(frozen=True)
class LocalDomains:
    """The domains whose mail we process ourselves (``relay.local_domains`` plus
    ``feedback.bounce_domain``), normalised. One object per config (``Config.local_domains``),
    shared by SMTP policy (accept from anyone) and the scheduler (hand to the feedback pipeline
    instead of the outbound transport), so the two can never disagree."""

    domains: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, cfg: Config) -> LocalDomains:
        local = set(cfg.relay.local_domains)
        if cfg.feedback.bounce_domain:
            local.add(cfg.feedback.bounce_domain)
        return cls(frozenset(local))

    def __contains__(self, domain: object) -> bool:
        # Callers pass domains already normalised where they entered (SMTP command, spool record).
        return domain in self.domains

    def __iter__(self) -> typing.Iterator[str]:
        return iter(sorted(self.domains))

    def __len__(self) -> int:
        return len(self.domains)


# --- the schema -------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    """Name used in the banner, EHLO, Received and Message-ID."""
    spool_dir: ConfPath = Path("spool")
    state_dir: ConfPath = Path("state")
    shutdown_timeout: Duration = 30.0
    """How long SIGTERM waits for in-flight SMTP sessions and deliveries before exiting."""
    min_free_space: Size = 100 * 1024**2
    """Below this much free space on the spool file system new mail gets 452 4.3.1 and /ready fails."""
    admin_socket: ConfPath | None = None
    """UNIX socket for the queue CLI; default: <state_dir>/admin.sock."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: ConfPath | None = None
    key_file: ConfPath | None = None


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    address: HostPort
    mode: Literal["submission", "relay"]
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    auth: bool = False
    """Relay listeners only: also offer AUTH (after TLS); authenticated clients may relay."""
    proxy_protocol: bool = False
    """Expect a PROXY protocol v1 or v2 header first on every connection (HAProxy, cloud TCP load
    balancers): the address in it is the client for policy, limits, logs and Received. A connection
    without a valid header is closed."""
    proxy_networks: list[Network] = field(default_factory=list)
    """With proxy_protocol: the proxies' own addresses; connections from elsewhere are closed (empty: any)."""
    greet_delay: Duration = 0.0
    """Pregreet test (Postfix postscreen's greet_wait): wait this long before the 220; a client that talks
    first is refused (554 5.5.1) and closed. 0 = off (greet at once)."""


GREET_DELAY_MAX = 60.0


@dataclass(frozen=True)
class HttpConfig:
    address: HostPort = HostPort("127.0.0.1", 9025)
    enabled: bool = True


@dataclass(frozen=True)
class AuthConfig:
    users_file: ConfPath | None = None
    max_failures: int = 5
    """AUTH failures from one IP within failure_window before that IP is locked out."""
    failure_window: Duration = 300.0
    lockout: Duration = 900.0
    received_show_user: bool = False
    """Name the authenticated user in the Received header (off: it leaks account names)."""
    default_rate: str = "unlimited"
    """Messages per user and period ("500/h", "20/min", "5000/d" or "unlimited"); users may override it."""


@dataclass(frozen=True)
class RelayConfig:
    local_domains: list[Domain] = field(default_factory=list)
    trusted_networks: list[Network] = field(default_factory=list)


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: Size = 25 * 1024**2
    max_recipients: int = 100
    max_recipient_overshoot: int = 1000
    """RCPT commands in one transaction that add nothing (over max_recipients, or a recipient already
    given) before each further one counts as an error (Postfix's smtpd_recipient_overshoot_limit)."""
    max_line_length: int = 1000
    """RFC 5321 §4.5.3.1.6: 1000 octets including CRLF."""
    max_header_size: Size = 100 * 1024
    """Largest header section (Postfix's header_size_limit); larger: 552 5.3.4. Bounds the work of
    reading the header block on the event loop (a 25 MB one of short lines took seconds)."""
    max_hops: int = 50
    """Received fields a message may carry, ours included (Postfix's hopcount_limit); more: 554 5.4.6.
    RFC 5321 §6.3: counting them is how a mail loop is stopped."""
    command_timeout: Duration = 300.0
    """RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for the next command."""
    data_timeout: Duration = 600.0
    """Longest a client may take to send the whole DATA payload."""
    tls_handshake_timeout: Duration = 30.0
    """A client that connects to an implicit-TLS port and says nothing (or plaintext) is closed after this."""
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_errors: int = 10
    """Error replies in one session before it is closed with 421."""
    max_junk_commands: int = 100
    """NOOP, RSET, VRFY, HELP and repeated HELO/EHLO a session may send between accepted messages
    before each further one counts as an error (Postfix's smtpd_junk_command_limit): otherwise a
    client that sends nothing else keeps its connection slot for ever, a NOOP at a time."""
    max_data_memory: Size = 256 * 1024**2
    """Message bytes held in memory across all connections (DATA being read or committed); past it, a
    new DATA is answered 451 4.3.2 until some is freed."""
    proxy_header_timeout: Duration = 10.0
    """How long a proxy_protocol listener waits for the PROXY header before closing the connection."""


@dataclass(frozen=True)
class DkimConfig:
    domain: Domain
    selector: str
    key_file: ConfPath
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


DEFAULT_SIGNED_HEADERS = [
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "Reply-To", "In-Reply-To", "References",
    "List-Unsubscribe", "List-Unsubscribe-Post",
]


@dataclass(frozen=True)
class SigningConfig:
    headers: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNED_HEADERS))
    parent_domains: bool = True
    """Mail from sub.example.com uses the example.com key when sub.example.com has none."""
    expire: Duration = 0.0
    """x= tag: signature lifetime; 0 = no expiry."""
    helper: bool = True
    """Sign in a helper process (mailrelayd.signworker), off the event loop's GIL; false: in the daemon."""


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    max_concurrency: int = 200
    """Outbound SMTP transactions at once, all destinations together."""
    domain_concurrency: int = 20
    """Outbound connections at once to one destination (domain or route)."""
    max_messages_per_connection: int = 100
    max_recipients_per_transaction: int = 50
    """Recipients in one outbound transaction; a message to more at one domain goes in several, on
    the same connection (Postfix's default_destination_recipient_limit). Receivers cap it too (often
    at 100): their 452 4.5.3 sends the rest in the next transaction at once, not at the next retry."""
    idle_timeout: Duration = 5.0
    """How long an idle outbound connection is kept for reuse."""
    retry_initial: Duration = 300.0
    retry_max: Duration = 4000.0
    """Ceiling of the exponential backoff (Postfix: maximal_backoff_time = 4000s)."""
    retry_jitter: float = 0.2
    max_queue_lifetime: Duration = 5 * 86400.0
    bounce_queue_lifetime: Duration = 5 * 86400.0
    """Lifetime of our own DSNs (null sender) in the queue."""
    delay_warning: Duration = 0.0
    """Send a 'delayed' DSN once a recipient has been deferred this long; 0 = never."""
    tls: Literal["none", "may", "encrypt", "verify", "dane", "dane-only"] = "may"
    """Postfix's smtp_tls_security_level for MX delivery (routes have their own ``tls``)."""
    tls_fallback_plaintext: bool = False
    """After a failed STARTTLS handshake, retry the same host in plaintext (opportunistic TLS only)."""
    mta_sts: bool = True
    """Honour recipient domains' MTA-STS policies (RFC 8461); cache in <state_dir>/mta-sts.json."""
    ca_file: ConfPath | None = None
    """Trust store (PEM) for tls = "verify" and MTA-STS; default: the system store."""
    connect_timeout: Duration = 30.0
    greeting_timeout: Duration = 300.0
    mail_timeout: Duration = 300.0
    rcpt_timeout: Duration = 300.0
    data_init_timeout: Duration = 120.0
    data_block_timeout: Duration = 180.0
    data_done_timeout: Duration = 600.0
    """RFC 5321 §4.5.3.2: 5 min greeting/MAIL/RCPT, 2 min DATA initiation, 3 min per block, 10 min after '.'."""
    ip_family: Literal["any", "ipv4", "ipv6", "prefer-ipv4", "prefer-ipv6"] = "prefer-ipv4"
    """Which MX addresses to use and in what order. prefer-ipv4: an IPv4 address when the MX has one,
    IPv6 only for IPv6-only MXes (large receivers hold IPv6 senders to stricter PTR/SPF rules)."""
    source_address: str | None = None
    """IPv4 address to bind outbound connections to (MX delivery and routes without their own)."""
    source_address6: str | None = None
    """IPv6 address to bind outbound connections to."""
    throttle_backoff: Duration | None = None
    """How long a destination without a [[shaping]] entry is suspended after a throttling reply
    (default: retry_initial)."""


@dataclass(frozen=True)
class DnsConfig:
    nameservers: list[Annotated[HostPort, _DefaultPort(53)]] = field(default_factory=list)
    timeout: Duration = 10.0


@dataclass(frozen=True)
class RouteConfig:
    domain: DomainOrWildcard
    """Recipient domain this route applies to, or "*" for every domain (smarthost)."""
    host: Annotated[HostPort, _DefaultPort(25)]
    tls: Literal["none", "may", "encrypt", "verify", "dane", "dane-only", "require"] = "may"
    """Postfix levels as in [delivery] tls; "require" (older name) is an alias of "encrypt"."""
    username: str | None = None
    password: str | None = None
    password_file: ConfPath | None = None
    source_address: str | None = None
    """Address (IPv4 or IPv6) to bind connections to this route's host; default [delivery] source_address(6)."""
    helo_name: str | None = None
    """Name sent in EHLO to this route's host; default server.hostname."""

    def __post_init__(self) -> None:
        if self.tls == "require":  # normalised once, at load: the rest of the code sees "encrypt"
            object.__setattr__(self, "tls", "encrypt")


@dataclass(frozen=True)
class ShapingConfig:
    match: str
    """A recipient domain ("example.net"), or an MX host suffix starting with a dot (".google.com")
    that groups every domain whose MX hosts are there into one destination."""
    max_connections: int | None = None
    """Transactions at once to the destination (default: delivery.domain_concurrency)."""
    max_messages_per_connection: int | None = None
    max_recipients_per_transaction: int | None = None
    max_rate: str | None = None
    """Messages per time unit to the destination: "600/min", "20/s", "10000/h", "50000/d"."""
    throttle_backoff: Duration | None = None
    """Suspend the destination this long after a throttling reply (default: delivery.throttle_backoff)."""


@dataclass(frozen=True)
class FeedbackConfig:
    bounce_domain: Domain | None = None
    """VERP return-path domain; its mail (bounces, complaints) is parsed into the suppression list."""
    verp_secret: str | None = None
    verp_secret_file: ConfPath | None = None
    """File whose first line is the current VERP secret and further lines previous ones."""
    verp_previous_secrets: list[str] = field(default_factory=list)
    verp_retention: Duration = 30 * 86400.0
    """How long the recipient behind a VERP token is remembered after delivery."""
    soft_bounce_threshold: int = 3
    soft_bounce_window: Duration = 7 * 86400.0
    case_insensitive_local_part: bool = False
    keep_unparsable: bool = True
    """Keep feedback messages that could not be parsed in <state_dir>/feedback-unparsable/ for inspection."""
    require_verp: bool = False
    """Act on bounces only when they arrive at a valid VERP address. Without it, a bounce that has no
    valid token is acted on only for recipients we sent to within ``sent_window``."""
    trusted_reporters: list[str] = field(default_factory=list)
    """Complaint (ARF/JMRP/SES) sources acted on without a VERP token: domains whose DKIM signature on
    the report verifies (``"fbl.yahoo.com"``), or IP networks of the sending host (``"192.0.2.0/24"``)."""
    sent_window: Duration = 7 * 86400.0
    """Feedback without a valid VERP token is acted on only for addresses we sent to within this window."""
    circuit_breaker: bool = False
    """Hold a sending domain's outbound mail when its bounce or complaint rate passes a pause level."""
    circuit_breaker_window: Duration = 86400.0
    circuit_breaker_min_volume: int = 200
    """Recipients a domain must have been sent to within the window before its rates count."""
    circuit_breaker_bounce_warn_rate: float = 0.02
    circuit_breaker_bounce_pause_rate: float = 0.10
    circuit_breaker_complaint_warn_rate: float = 0.001
    circuit_breaker_complaint_pause_rate: float = 0.005
    circuit_breaker_pause: Duration = 6 * 3600.0
    """How long a tripped domain stays held; 0 = until `mailrelayd queue release --sender @<domain>`."""
    store: str = "sqlite"
    """Where the suppression list lives: "sqlite" (<state_dir>/suppressions.db, this node only) or
    "postgresql://user@host:port/dbname", shared by every relay (no password here: store_password_file
    or PGPASSFILE). With PostgreSQL the AUTH-failure lockout is shared through it too."""
    store_password_file: ConfPath | None = None
    """File whose first line is the PostgreSQL password (else libpq's PGPASSFILE / ~/.pgpass)."""
    store_poll_interval: Duration = 1.0
    """How often each node checks the shared store's generation (fallback for LISTEN/NOTIFY) and health."""
    store_connect_timeout: Duration = 5.0
    """Connect/query timeout for PostgreSQL; past it the node runs degraded on its last known list."""


@dataclass(frozen=True)
class TlsRptConfig:
    """SMTP TLS Reporting (RFC 8460) of our outbound TLS results to recipient domains."""

    enabled: bool = False
    reporting_domain: str | None = None
    """The submitter named in reports (default: server.hostname)."""
    organization_name: str | None = None
    contact_info: str | None = None
    """Default: mailto:postmaster@<reporting_domain>."""


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


EVENT_KINDS = ("accepted", "delivered", "deferred", "bounced", "expired", "complained", "suppressed")
EventKind = Literal["accepted", "delivered", "deferred", "bounced", "expired", "complained", "suppressed"]


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    """http:// or https:// URL that receives the event POSTs."""
    secret_file: ConfPath
    """File holding the HMAC-SHA256 secret (surrounding whitespace stripped)."""
    events: list[EventKind] = field(default_factory=lambda: list(EVENT_KINDS))
    name: str | None = None
    """Label in metrics and logs, and the key of its delivery position; default: the URL's host[:port]."""
    batch_size: int = 100
    """Events per POST at most; 1 sends single event objects instead of {"events": [...]}."""
    timeout: Duration = 10.0


@dataclass(frozen=True)
class EventsConfig:
    max_backlog: int = 100_000
    """Events kept for webhooks that have not received them; past this the oldest are dropped (counted, logged)."""
    retry_initial: Duration = 1.0
    retry_max: Duration = 300.0
    """Backoff between failed POSTs to one webhook: doubles from retry_initial up to retry_max."""


@dataclass(frozen=True)
class HistoryConfig:
    retention: Duration = 30 * 86400.0
    """How long finished recipients stay queryable by `mailrelayd history`."""


@dataclass(frozen=True)
class SendmailConfig:
    user: str | None = None
    """Users-file user the `sendmail` command submits as (its allowed_from and rate apply); unset: disabled."""
    default_from: str | None = None
    """Envelope sender when neither -f nor a From header gives one; default: root@<server.hostname>."""
    domain: str | None = None
    """Domain appended to bare local parts ("root") in the envelope and From; default: server.hostname."""
    maildrop_dir: ConfPath | None = None
    """Where `sendmail` leaves messages while the daemon is down; default: <state_dir>/maildrop."""


@dataclass(frozen=True)
class ApiConfig:
    address: HostPort | None = None
    """HTTP submission API address (e.g. "127.0.0.1:9026"); unset: no API."""
    tls: bool = True
    """TLS with the [tls] certificate; false is allowed on loopback addresses only."""


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    tls: TlsConfig = field(default_factory=TlsConfig)
    listeners: list[ListenerConfig] = field(default_factory=list)
    http: HttpConfig = field(default_factory=HttpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dkim: list[DkimConfig] = field(default_factory=list)
    signing: SigningConfig = field(default_factory=SigningConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    routes: list[RouteConfig] = field(default_factory=list)
    shaping: list[ShapingConfig] = field(default_factory=list)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    webhooks: list[WebhookConfig] = field(default_factory=list)
    events: EventsConfig = field(default_factory=EventsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    tls_rpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    source: Path = field(default=Path("mailrelayd.toml"), metadata={"internal": True})
    source_name: str = field(default="mailrelayd.toml", metadata={"internal": True})
    """The config file's path as given (``-c``, ``$MAILRELAYD_CONFIG`` or the default): what errors name."""

    @property
    def admin_socket(self) -> Path:
        return self.server.admin_socket or (self.server.state_dir / "admin.sock")

    @property
    def maildrop_dir(self) -> Path:
        return self.sendmail.maildrop_dir or (self.server.state_dir / "maildrop")

    def webhook_name(self, i: int) -> str:
        w = self.webhooks[i]
        if w.name:
            return w.name
        from urllib.parse import urlsplit

        # host[:port]: never the user info, a credential (it becomes a metrics label and is logged).
        return urlsplit(w.url).netloc.rpartition("@")[2] or f"webhook{i}"

    def verp_secrets(self) -> list[bytes]:
        """Current VERP secret first, then previous ones (rotation)."""
        fb = self.feedback
        secrets: list[str] = []
        if fb.verp_secret:
            secrets.append(fb.verp_secret)
        if fb.verp_secret_file is not None:
            lines = [ln.strip() for ln in fb.verp_secret_file.read_text().splitlines()]
            secrets.extend(ln for ln in lines if ln and not ln.startswith("#"))
        secrets.extend(fb.verp_previous_secrets)
        return [s.encode() for s in secrets]

    @functools.cached_property
    def local_domains(self) -> LocalDomains:
        """Our own domains, built once per loaded config and shared by policy and scheduler."""
        return LocalDomains.from_config(self)

    def route_for(self, domain: str) -> RouteConfig | None:
        """The route for a recipient domain: exact match, then parent domains, then "*".
        Route domains are normalised on load (see :data:`Domain`)."""
        by_domain = {r.domain: r for r in self.routes}
        d = domain.lower().rstrip(".")
        while d:
            if d in by_domain:
                return by_domain[d]
            _, _, d = d.partition(".")
        return by_domain.get("*")


# --- the loader -------------------------------------------------------------------------
class _Loader:
    def __init__(self, file: Path, shown: str | None = None) -> None:
        self.file = file
        self.shown = shown or str(file)
        self.base = file.parent

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.shown, key, message)

    def build(self, cls: type, data: Any, key: str) -> Any:
        if not isinstance(data, dict):
            raise self.err(key, f"must be a table, not {_tname(data)}")
        hints = get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            k = _join(key, unknown[0])
            raise self.err(k, f"unknown key (known keys here: {', '.join(sorted(fields))})")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            k = _join(key, name)
            if name in data:
                kwargs[name] = self.convert(hints[name], data[name], k)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.err(k, "missing required key")
        return cls(**kwargs)

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        marker = None
        if get_origin(tp) is Annotated:
            tp, *extras = get_args(tp)
            marker = extras[0]
        origin = get_origin(tp)
        try:
            if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
                raise ValueError("integer out of range (TOML integers are 64-bit)")
            if marker is _Duration:
                return parse_duration(value)
            if marker is _Size:
                return parse_size(value)
            if isinstance(marker, _Domain):
                if not isinstance(value, str):
                    raise ValueError(f"must be a domain name string, not {_tname(value)}")
                if marker.wildcard and value.strip() == "*":
                    return "*"
                try:
                    return normalize_domain(value)
                except ValueError:
                    raise ValueError(f"{value!r} is not a valid domain name") from None
            if origin in (typing.Union, types.UnionType):
                args = [a for a in get_args(tp) if a is not type(None)]
                if tp == Network or set(args) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
                    return self._network(value)
                return self.convert(args[0] if len(args) == 1 else tp, value, key)
            if marker is _Path or tp is Path:
                if not isinstance(value, str):
                    raise ValueError(f"must be a path string, not {_tname(value)}")
                if not value.strip():
                    raise ValueError("must be a path, not an empty string (leave the key out instead)")
                if "\0" in value:  # no system call takes it; Path.is_file() would just say False
                    raise ValueError("must not contain a NUL character")
                p = Path(os.path.expanduser(value))
                return p if p.is_absolute() else (self.base / p)
            if isinstance(marker, _DefaultPort):
                return parse_hostport(value, marker.port)
            if tp is HostPort:
                return parse_hostport(value)
            if origin is Literal:
                choices = get_args(tp)
                if value not in choices:
                    raise ValueError(f"must be one of {', '.join(choices)}")
                return value
            if origin is list:
                if not isinstance(value, list):
                    raise ValueError(f"must be an array, not {_tname(value)}")
                (item,) = get_args(tp)
                return [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
            if dataclasses.is_dataclass(tp):
                return self.build(tp, value, key)
            if tp is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"must be true or false, not {_tname(value)}")
                return value
            if tp is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"must be an integer, not {_tname(value)}")
                if value < 0:
                    raise ValueError("must not be negative")
                return value
            if tp is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"must be a number, not {_tname(value)}")
                if not math.isfinite(value):
                    raise ValueError(f"must be a finite number, not {value}")
                return float(value)
            if tp is str:
                if not isinstance(value, str):
                    raise ValueError(f"must be a string, not {_tname(value)}")
                return value
        except ConfigError:
            raise
        except ValueError as e:
            raise self.err(key, str(e)) from None
        raise self.err(key, f"unsupported type {tp!r}")  # pragma: no cover - schema bug

    @staticmethod
    def _network(value: Any) -> Network:
        if not isinstance(value, str):
            raise ValueError(f"must be a network string like \"10.0.0.0/8\", not {_tname(value)}")
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"bad network {value!r}: use CIDR like \"10.0.0.0/8\" or \"::1/128\"") from None


_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _join(prefix: str, name: str) -> str:
    if not _BARE_KEY_RE.match(name):
        name = json.dumps(name, ensure_ascii=False)  # quoted as in TOML, so "" or "a.b" stay visible
    return f"{prefix}.{name}" if prefix else name


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def load_config(path: Path | str) -> Config:
    """Read, parse and validate a config file. Raises :class:`ConfigError`."""
    shown = str(path)  # what the user gave: /etc/mailrelayd/mailrelayd.toml, not its base name
    file = Path(path).absolute()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(shown, "", "file not found") from None
    except OSError as e:
        raise ConfigError(shown, "", f"cannot read: {e.strerror}") from None
    except ValueError:  # a NUL in the path
        raise ConfigError(shown, "", "cannot read: bad file name") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(shown, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(shown, "", f"TOML syntax error: {e}") from None
    except ValueError as e:  # tomllib lets int()'s 4300-digit limit through as a plain ValueError
        raise ConfigError(shown, "", f"TOML syntax error: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(shown, "", "TOML syntax error: arrays or tables nested too deeply") from None
    return parse_config(data, file, shown)


def parse_config(data: dict[str, Any], file: Path, shown: str | None = None) -> Config:
    """Build a :class:`Config` from already-parsed TOML data; validate cross-key rules. Errors name
    the file as ``shown`` (default: ``file``)."""
    loader = _Loader(file, shown)
    cfg: Config = loader.build(Config, data, "")
    cfg = dataclasses.replace(cfg, source=file, source_name=loader.shown)
    _validate(cfg, loader)
    return cfg


def _validate(cfg: Config, ld: _Loader) -> None:
    if not cfg.server.hostname.strip():
        raise ld.err("server.hostname", "must not be empty")
    try:
        normalize_domain(cfg.server.hostname)
    except ValueError:
        raise ld.err("server.hostname", f"{cfg.server.hostname!r} is not a valid host name") from None
    if not cfg.listeners:
        raise ld.err("listeners", "at least one [[listeners]] entry is required")
    names: set[str] = set()
    need_tls = False
    for i, lst in enumerate(cfg.listeners):
        key = f"listeners[{i}]"
        if not lst.name or not re.match(r"^[A-Za-z0-9_.-]+$", lst.name):
            raise ld.err(f"{key}.name", "must be a short name of letters, digits, '_', '-', '.'")
        if lst.name in names:
            raise ld.err(f"{key}.name", f"duplicate listener name {lst.name!r}")
        names.add(lst.name)
        if lst.tls != "none":
            need_tls = True
            if cfg.tls.cert_file is None or cfg.tls.key_file is None:
                raise ld.err(f"{key}.tls", f"tls = \"{lst.tls}\" needs [tls] cert_file and key_file")
        if lst.mode == "submission":
            if lst.tls == "none":
                raise ld.err(f"{key}.tls", "submission listeners need TLS (starttls or implicit): "
                             "AUTH is never offered over plaintext")
            if cfg.auth.users_file is None:
                raise ld.err("auth.users_file", f"required by submission listener {lst.name!r}")
        if lst.auth and lst.mode == "relay" and lst.tls == "none":
            raise ld.err(f"{key}.auth", "AUTH on a relay listener needs TLS (starttls or implicit)")
        if lst.proxy_networks and not lst.proxy_protocol:
            raise ld.err(f"{key}.proxy_networks", "only meaningful with proxy_protocol = true")
        if not 0 <= lst.greet_delay <= GREET_DELAY_MAX:
            # RFC 5321 §4.5.3.2.1: clients wait 5 minutes for the greeting; real ones give up far sooner.
            raise ld.err(f"{key}.greet_delay", f"must be between 0 and {GREET_DELAY_MAX:g}s")
        if lst.auth and cfg.auth.users_file is None:
            raise ld.err("auth.users_file", f"required by listener {lst.name!r} (auth = true)")
    _check_bind_clashes(cfg, ld)
    if need_tls:
        for k in ("cert_file", "key_file"):
            _check_file(ld, f"tls.{k}", getattr(cfg.tls, k))
    if cfg.auth.max_failures < 1:
        raise ld.err("auth.max_failures", "must be at least 1")
    for i, d in enumerate(cfg.relay.local_domains):
        _check_domain(ld, f"relay.local_domains[{i}]", d)
    lim = cfg.limits
    if lim.max_message_size < 1024:
        raise ld.err("limits.max_message_size", "must be at least 1KB")
    if lim.max_recipients < 1:
        raise ld.err("limits.max_recipients", "must be at least 1")
    if not 512 <= lim.max_line_length <= 100_000:
        raise ld.err("limits.max_line_length", "must be between 512 and 100000")
    if lim.max_header_size < 1024:  # above max_message_size it never applies: no error for that
        raise ld.err("limits.max_header_size", "must be at least 1KB")
    for k in ("max_connections", "max_connections_per_ip", "max_errors", "max_hops"):
        if getattr(lim, k) < 1:
            raise ld.err(f"limits.{k}", "must be at least 1")
    for k in ("max_junk_commands", "max_recipient_overshoot"):
        if getattr(lim, k) < 0:
            raise ld.err(f"limits.{k}", "must be at least 0")
    if lim.max_data_memory < lim.max_message_size:
        raise ld.err("limits.max_data_memory", "must be at least limits.max_message_size")
    for k in ("command_timeout", "data_timeout", "tls_handshake_timeout", "proxy_header_timeout"):
        if getattr(lim, k) <= 0:
            raise ld.err(f"limits.{k}", "must be greater than 0")
    seen_keys: set[tuple[str, str]] = set()
    for i, d in enumerate(cfg.dkim):
        _check_domain(ld, f"dkim[{i}].domain", d.domain)
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", d.selector):
            raise ld.err(f"dkim[{i}].selector", f"bad selector {d.selector!r}")
        k2 = (d.domain.lower().rstrip("."), d.selector.lower())
        if k2 in seen_keys:
            raise ld.err(f"dkim[{i}].selector", f"duplicate selector {d.selector!r} for {d.domain}")
        seen_keys.add(k2)
        _check_file(ld, f"dkim[{i}].key_file", d.key_file)
    for i, h in enumerate(cfg.signing.headers):
        if not re.match(r"^[!-9;-~]+$", h):
            raise ld.err(f"signing.headers[{i}]", f"bad header name {h!r}")
    dl = cfg.delivery
    if not 1 <= dl.port <= 65535:
        raise ld.err("delivery.port", "must be a port number from 1 to 65535")
    for k in ("max_concurrency", "domain_concurrency", "max_messages_per_connection",
              "max_recipients_per_transaction"):
        if getattr(dl, k) < 1:
            raise ld.err(f"delivery.{k}", "must be at least 1")
    if dl.retry_initial <= 0:
        raise ld.err("delivery.retry_initial", "must be greater than 0")
    if dl.retry_max < dl.retry_initial:
        raise ld.err("delivery.retry_max", "must not be less than delivery.retry_initial")
    if not 0 <= dl.retry_jitter < 1:
        raise ld.err("delivery.retry_jitter", "must be at least 0 and less than 1")
    if dl.max_queue_lifetime <= 0:
        raise ld.err("delivery.max_queue_lifetime", "must be greater than 0")
    route_domains: set[str] = set()
    for i, r in enumerate(cfg.routes):
        if r.domain != "*":
            _check_domain(ld, f"routes[{i}].domain", r.domain)
        if r.domain.lower() in route_domains:
            raise ld.err(f"routes[{i}].domain", f"duplicate route for {r.domain!r}")
        route_domains.add(r.domain.lower())
        if r.host.port == 0:
            raise ld.err(f"routes[{i}].host", "port must not be 0")
        if (r.password is not None or r.password_file is not None) and r.username is None:
            raise ld.err(f"routes[{i}].username", "required when a password is set")
        if r.username is not None and r.password is None and r.password_file is None:
            raise ld.err(f"routes[{i}].password", "username is set but neither password nor password_file")
        if r.username is not None and r.tls in ("none", "may", "dane"):
            raise ld.err(f"routes[{i}].tls", "AUTH to a route needs tls = \"encrypt\" (alias \"require\"), "
                         "\"verify\" or \"dane-only\" (never send a password in plaintext)")
        if r.password_file is not None:
            _check_file(ld, f"routes[{i}].password_file", r.password_file)
    if dl.ca_file is not None:
        _check_file(ld, "delivery.ca_file", dl.ca_file)
    if cfg.tls_rpt.reporting_domain is not None:
        _check_domain(ld, "tls_rpt.reporting_domain", cfg.tls_rpt.reporting_domain)
    _validate_delivery_control(cfg, ld)
    fb = cfg.feedback
    if fb.bounce_domain is not None:
        _check_domain(ld, "feedback.bounce_domain", fb.bounce_domain)
        if not fb.verp_secret and fb.verp_secret_file is None:
            raise ld.err("feedback.verp_secret", "required when feedback.bounce_domain is set "
                         "(or set feedback.verp_secret_file)")
    if fb.verp_secret is not None and len(fb.verp_secret) < 16:
        raise ld.err("feedback.verp_secret", "must be at least 16 characters")
    if fb.verp_secret_file is not None:
        _check_file(ld, "feedback.verp_secret_file", fb.verp_secret_file)
    if fb.soft_bounce_threshold < 1:
        raise ld.err("feedback.soft_bounce_threshold", "must be at least 1")
    for i, reporter in enumerate(fb.trusted_reporters):
        if not isinstance(reporter, str) or not reporter.strip():
            raise ld.err(f"feedback.trusted_reporters[{i}]", "must be a domain or an IP network")
        try:
            ipaddress.ip_network(reporter.strip(), strict=False)
        except ValueError:
            try:
                normalize_domain(reporter)
            except ValueError:
                raise ld.err(f"feedback.trusted_reporters[{i}]",
                             f"{reporter!r} is neither a domain nor an IP network") from None
    if fb.sent_window <= 0:
        raise ld.err("feedback.sent_window", "must be greater than 0")
    for k in ("circuit_breaker_bounce_warn_rate", "circuit_breaker_bounce_pause_rate",
              "circuit_breaker_complaint_warn_rate", "circuit_breaker_complaint_pause_rate"):
        if not 0 <= getattr(fb, k) <= 1:
            raise ld.err(f"feedback.{k}", "must be a share from 0 to 1 (0.02 = 2 %; 0 turns that level off)")
    if fb.circuit_breaker_window <= 0:
        raise ld.err("feedback.circuit_breaker_window", "must be greater than 0")
    if fb.circuit_breaker and fb.circuit_breaker_window > fb.verp_retention:
        raise ld.err("feedback.circuit_breaker_window", "must not be longer than feedback.verp_retention "
                     "(the delivery history it counts is kept that long)")
    if fb.circuit_breaker_min_volume < 1:
        raise ld.err("feedback.circuit_breaker_min_volume", "must be at least 1")
    if fb.sent_window > fb.verp_retention:
        raise ld.err("feedback.sent_window", "must not be longer than feedback.verp_retention "
                     "(the delivery history is kept that long)")
    if fb.store != "sqlite":
        try:
            parse_store_url(fb.store)
        except ValueError as e:
            raise ld.err("feedback.store", str(e)) from None
    if fb.store_password_file is not None:
        _check_file(ld, "feedback.store_password_file", fb.store_password_file)
    if fb.store_poll_interval <= 0 or fb.store_poll_interval > 60:
        raise ld.err("feedback.store_poll_interval", "must be greater than 0 and at most 60s")
    if fb.store_connect_timeout <= 0:
        raise ld.err("feedback.store_connect_timeout", "must be greater than 0")
    _validate_app_features(cfg, ld)


def parse_store_url(value: str) -> str:
    """Validate a ``postgresql://user@host:port/dbname`` store URL; returns it unchanged.

    A password in the URL is refused: the config file is world-readable more often than not, and
    the URL ends up in error messages. Raises ``ValueError`` with the reason."""
    from urllib.parse import parse_qs, urlsplit

    text = value.strip()
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as e:
        raise ValueError(f"bad PostgreSQL URL: {e}") from None
    if url.scheme not in ("postgresql", "postgres"):
        raise ValueError('must be "sqlite" or a URL like "postgresql://user@host:5432/dbname"')
    if url.password is not None or "password" in {k.lower() for k in parse_qs(url.query)}:
        raise ValueError("must not contain a password: use feedback.store_password_file or PGPASSFILE")
    if not url.hostname:
        raise ValueError("the URL needs a host (postgresql://user@host:5432/dbname)")
    if port == 0:
        raise ValueError("port must not be 0")
    if not url.path.strip("/"):
        raise ValueError("the URL needs a database name (postgresql://user@host:5432/dbname)")
    return text


def _validate_app_features(cfg: Config, ld: _Loader) -> None:
    """[auth] default_rate, [[webhooks]], [events], [sendmail], [api]."""
    from urllib.parse import urlsplit

    from mailrelayd.ratelimit import parse_rate

    try:
        parse_rate(cfg.auth.default_rate)
    except ValueError as e:
        raise ld.err("auth.default_rate", str(e)) from None
    names: set[str] = set()
    for i, w in enumerate(cfg.webhooks):
        key = f"webhooks[{i}]"
        try:
            u = urlsplit(w.url)
            u.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError as e:  # e.g. "http://[::1" (unclosed IPv6 bracket)
            raise ld.err(f"{key}.url", f"bad URL: {e}") from None
        # The URL is not quoted: its user info or query may be the receiver's credentials.
        if u.scheme not in ("http", "https"):
            given = f"not {u.scheme}:" if u.scheme else "no scheme given"
            raise ld.err(f"{key}.url", f"must be an http:// or https:// URL, {given}")
        if not u.hostname:
            raise ld.err(f"{key}.url", "has no host name")
        _check_file(ld, f"{key}.secret_file", w.secret_file)
        if not w.events:
            raise ld.err(f"{key}.events", "must name at least one event")
        if not 1 <= w.batch_size <= 1000:
            raise ld.err(f"{key}.batch_size", "must be between 1 and 1000")
        if w.timeout <= 0:
            raise ld.err(f"{key}.timeout", "must be greater than 0")
        name = cfg.webhook_name(i)
        if name in names:
            raise ld.err(f"{key}.name", f"duplicate webhook name {name!r} (set name = \"...\" to tell them apart)")
        names.add(name)
    ev = cfg.events
    if ev.max_backlog < 1:
        raise ld.err("events.max_backlog", "must be at least 1")
    if ev.retry_initial <= 0:
        raise ld.err("events.retry_initial", "must be greater than 0")
    if ev.retry_max < ev.retry_initial:
        raise ld.err("events.retry_max", "must not be less than events.retry_initial")
    if cfg.history.retention < 86400:
        raise ld.err("history.retention", "must be at least 1d")
    sm = cfg.sendmail
    if sm.user is not None and cfg.auth.users_file is None:
        raise ld.err("sendmail.user", "needs auth.users_file (the user is looked up there)")
    if sm.domain is not None:
        _check_domain(ld, "sendmail.domain", sm.domain)
    if sm.default_from is not None and "@" not in sm.default_from:
        raise ld.err("sendmail.default_from", "must be a whole address like \"root@host.example.com\"")
    api = cfg.api
    if api.address is not None:
        if cfg.auth.users_file is None:
            raise ld.err("api.address", "needs auth.users_file (API keys belong to users)")
        if api.tls:
            if cfg.tls.cert_file is None or cfg.tls.key_file is None:
                raise ld.err("api.tls", "needs [tls] cert_file and key_file (or tls = false on a loopback address)")
        elif not _is_loopback(api.address.host):
            raise ld.err("api.tls", f"tls = false is only allowed on a loopback address, not {api.address.host}: "
                         "API keys would cross the network in plaintext")


def _bound_addresses(cfg: Config) -> list[tuple[str, HostPort]]:
    """(key, address) of everything the daemon binds: listeners, the sidecar, the API."""
    out = [(f"listeners[{i}].address", lst.address) for i, lst in enumerate(cfg.listeners)]
    if cfg.http.enabled:
        out.append(("http.address", cfg.http.address))
    if cfg.api.address is not None:
        out.append(("api.address", cfg.api.address))
    return out


def _binds_clash(a: HostPort, b: HostPort) -> bool:
    """Whether binding both would fail with "address already in use": the same port on the same
    address, or on a wildcard (0.0.0.0, ::) and any address of its family (IPv6 sockets are bound
    IPV6_V6ONLY, so :: and 0.0.0.0 do not clash). Port 0 is a new port each time."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    try:
        ia, ib = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:  # a host name: its addresses are known only when it is bound
        return False
    return ia.version == ib.version and (ia == ib or ia.is_unspecified or ib.is_unspecified)


def _check_bind_clashes(cfg: Config, ld: _Loader) -> None:
    """check-config finds the port two keys would both bind, rather than `run` failing at the second."""
    bound = _bound_addresses(cfg)
    for j, (key, addr) in enumerate(bound):
        for other_key, other in bound[:j]:
            if _binds_clash(addr, other):
                raise ld.err(key, f"{addr} clashes with {other_key} = {other}: the same port on the same "
                             "address (a wildcard address takes the port on every address)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_file(ld: _Loader, key: str, path: Path) -> None:
    # Path.is_file() answers False for a missing file, but raises OSError for a name too long or a
    # directory we may not enter.
    try:
        if path.is_file():
            return
    except OSError as e:
        raise ld.err(key, f"cannot access {path}: {e.strerror}") from None
    raise ld.err(key, f"file not found: {path}")


def _check_domain(ld: _Loader, key: str, value: str) -> None:
    try:
        normalize_domain(value)
    except ValueError:
        raise ld.err(key, f"{value!r} is not a valid domain name") from None


def parse_rate(value: str) -> tuple[int, float]:
    """Parse ``"600/min"`` into (600, 60.0): a count per period in seconds (the syntax of
    :func:`mailrelayd.ratelimit.parse_rate`, where "unlimited" is not a rate here)."""
    from mailrelayd.ratelimit import parse_rate as parse_limit

    rate = parse_limit(value)
    if rate is None:
        raise ValueError(f"bad rate {value!r}: use a count per unit, like \"600/min\" or \"20/s\"")
    return rate.limit, rate.period


def _ip_of(value: str, version: int | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    if version is not None and ip.version != version:
        raise ValueError(f"{value!r} is not an IPv{version} address")
    return ip


def _validate_delivery_control(cfg: Config, ld: _Loader) -> None:
    """[delivery] source addresses, per-route source/EHLO name, [[shaping]]."""
    dl = cfg.delivery
    for key, version in (("source_address", 4), ("source_address6", 6)):
        v = getattr(dl, key)
        if v is not None:
            try:
                _ip_of(v, version)
            except ValueError as e:
                raise ld.err(f"delivery.{key}", str(e)) from None
    if dl.ip_family == "ipv4" and dl.source_address6 and not dl.source_address:
        raise ld.err("delivery.source_address6", "set, but ip_family = \"ipv4\" never uses IPv6")
    for i, r in enumerate(cfg.routes):
        if r.source_address is not None:
            try:
                _ip_of(r.source_address, None)
            except ValueError as e:
                raise ld.err(f"routes[{i}].source_address", str(e)) from None
        if r.helo_name is not None:
            try:
                normalize_domain(r.helo_name)
            except ValueError:
                raise ld.err(f"routes[{i}].helo_name", f"{r.helo_name!r} is not a valid host name") from None
    seen: set[str] = set()
    for i, sh in enumerate(cfg.shaping):
        key = f"shaping[{i}]"
        m = sh.match.strip().lower().rstrip(".")
        try:
            normalize_domain(m[1:] if m.startswith(".") else m)
        except ValueError:
            raise ld.err(f"{key}.match", f"{sh.match!r} is not a domain or an MX suffix like \".google.com\"") \
                from None
        if m in seen:
            raise ld.err(f"{key}.match", f"duplicate [[shaping]] entry for {sh.match!r}")
        seen.add(m)
        for k in ("max_connections", "max_messages_per_connection", "max_recipients_per_transaction"):
            if getattr(sh, k) is not None and getattr(sh, k) < 1:
                raise ld.err(f"{key}.{k}", "must be at least 1")
        if sh.max_rate is not None:
            try:
                parse_rate(sh.max_rate)
            except ValueError as e:
                raise ld.err(f"{key}.max_rate", str(e)) from None
