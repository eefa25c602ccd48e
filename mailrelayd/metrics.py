"""Every Prometheus metric mailrelayd exports, defined once.

The default prometheus-client registry is the only global mutable state in the
daemon (see DEVELOPERS.md). Label values are kept bounded: listener names come
from the config, domains go through :class:`BoundedLabel`.
"""

from __future__ import annotations

import itertools
import platform
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

from mailrelayd import __version__

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SIGN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class BoundedLabel:
    """Maps an unbounded value (a domain) onto a bounded label set.

    The first ``limit`` distinct values seen keep their own label; later ones
    become ``"other"``. ``always`` values (e.g. configured domains) never fall
    into ``"other"``.
    """

    OTHER = "other"

    def __init__(self, limit: int = 50) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._always: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def set_always(self, values: set[str] | frozenset[str]) -> None:
        """Declare values that always get their own label (configured domains)."""
        self._always = frozenset(v.lower() for v in values)

    def __call__(self, value: str | None) -> str:
        if not value:
            return "none"
        value = value.lower().rstrip(".")
        if value in self._always or value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return self.OTHER


destination_domain_label = BoundedLabel(50)
sender_domain_label = BoundedLabel(50)

BUILD_INFO = Info("mailrelayd_build", "Version of mailrelayd and its Python runtime.")
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})

# --- lifecycle / config -----------------------------------------------------------------
UP_SINCE = Gauge("mailrelayd_start_time_seconds", "Unix time the daemon started.")
READY = Gauge("mailrelayd_ready", "1 when every readiness check passes, else 0.")
READY_CHECK = Gauge("mailrelayd_ready_check", "Per readiness check: 1 ok, 0 failing.", ["check"])
CONFIG_RELOADS = Counter("mailrelayd_config_reloads_total", "Successful configuration reloads (SIGHUP).")
CONFIG_RELOAD_FAILURES = Counter(
    "mailrelayd_config_reload_failures_total", "Configuration reloads rejected because the new config was invalid."
)
CONFIG_LAST_RELOAD_SUCCESS = Gauge(
    "mailrelayd_config_last_reload_successful", "1 if the last reload attempt succeeded (or none was made), else 0."
)
TLS_CERT_NOT_AFTER = Gauge(
    "mailrelayd_tls_certificate_expiry_timestamp_seconds",
    "notAfter of the loaded server certificate, as a Unix time.",
)

# --- inbound SMTP -----------------------------------------------------------------------
CONNECTIONS = Counter(
    "mailrelayd_connections_total",
    "Inbound SMTP connections by listener and result "
    "(accepted, rejected_limit, rejected_per_ip, tls_failed, proxy_invalid, proxy_timeout, proxy_not_allowed, "
    "pregreet, draining).",
    ["listener", "result"],
)
CONNECTIONS_ACTIVE = Gauge("mailrelayd_connections_active", "Open inbound SMTP connections.", ["listener"])
DATA_MEMORY = Gauge(
    "mailrelayd_data_memory_bytes",
    "Message bytes held in memory by inbound connections (DATA being read or committed); "
    "bounded by limits.max_data_memory.",
)
MESSAGES_RECEIVED = Counter(
    "mailrelayd_messages_received_total", "Messages accepted into the spool (250 after DATA).", ["listener"]
)
RECIPIENTS_RECEIVED = Counter(
    "mailrelayd_recipients_received_total", "Recipients accepted into the spool.", ["listener"]
)
MESSAGE_SIZE = Histogram(
    "mailrelayd_message_size_bytes",
    "Size of accepted messages.",
    ["listener"],
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
)
SMTP_REPLIES = Counter(
    "mailrelayd_smtp_replies_total",
    "SMTP replies sent to clients, by listener, command and reply code class (2xx, 4xx, 5xx).",
    ["listener", "command", "class"],
)
AUTH_ATTEMPTS = Counter("mailrelayd_auth_attempts_total", "AUTH attempts by result.", ["listener", "result"])
AUTH_FAILURES = Counter("mailrelayd_auth_failures_total", "Failed AUTH attempts (535 5.7.8).", ["listener"])
AUTH_THROTTLED = Counter(
    "mailrelayd_auth_throttled_total", "AUTH attempts refused (421 4.7.0) because the client IP is cooling down.",
    ["listener"],
)
TLS_HANDSHAKE_FAILURES = Counter(
    "mailrelayd_tls_handshake_failures_total", "Failed inbound TLS handshakes (implicit TLS or STARTTLS).",
    ["listener"],
)
ACCEPT_DURATION = Histogram(
    "mailrelayd_accept_duration_seconds",
    "From the end of DATA to the 250 reply (policy, signing, durable spool commit).",
    ["listener"],
    buckets=_LATENCY_BUCKETS,
)

# --- spool ------------------------------------------------------------------------------
SPOOL_COMMIT_SECONDS = Histogram(
    "mailrelayd_spool_commit_duration_seconds", "Duration of one durable spool commit (a group of writes).",
    buckets=_LATENCY_BUCKETS,
)
SPOOL_COMMIT_BATCH = Histogram(
    "mailrelayd_spool_commit_batch_size", "Writes made durable together by one commit (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
SPOOL_WRITE_ERRORS = Counter(
    "mailrelayd_spool_write_errors_total", "Spool writes that failed (disk full, I/O error); the client got 4xx."
)
SPOOL_FREE_BYTES = Gauge("mailrelayd_spool_free_bytes", "Free bytes on the spool file system.")
QUEUE_RECIPIENTS = Gauge(
    "mailrelayd_queue_recipients", "Recipients in the queue by state (pending, inflight, deferred, held).", ["state"]
)
QUEUE_MESSAGES = Gauge("mailrelayd_queue_messages", "Messages in the queue (not yet finished for every recipient).")
QUEUE_OLDEST_AGE = Gauge(
    "mailrelayd_queue_oldest_message_age_seconds", "Age of the oldest message still in the queue (0 when empty)."
)

# --- delivery ---------------------------------------------------------------------------
DELIVERY_ATTEMPTS = Counter(
    "mailrelayd_delivery_attempts_total",
    "Per-recipient delivery attempts by result (delivered, deferred, bounced, expired, suppressed) "
    "and destination domain (top domains only; the rest are 'other').",
    ["result", "domain"],
)
DELIVERY_DURATION = Histogram(
    "mailrelayd_delivery_duration_seconds",
    "Duration of one SMTP delivery transaction (connect or reuse through the final reply).",
    ["result"],
    buckets=_DELIVERY_BUCKETS,
)
DELIVERY_LATENCY = Histogram(
    "mailrelayd_delivery_latency_seconds",
    "From acceptance to final outcome (delivered or bounced), per recipient.",
    ["result"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 14400, 86400, 432000),
)
SENT_RECIPIENTS = Counter(
    "mailrelayd_sent_recipients_total",
    "Final per-recipient outcomes by sending (header From) domain: delivered, bounced, expired, suppressed. "
    "Bounce rate = bounced / (delivered + bounced).",
    ["sender_domain", "result"],
)
DELIVERY_CONNECTIONS = Counter(
    "mailrelayd_delivery_connections_total",
    "Outbound SMTP connections by result (ok, refused, refused_greeting, timeout, tls_failed, loop).",
    ["result"],
)
OUTBOUND_TLS = Counter(
    "mailrelayd_delivery_tls_total",
    "Outbound sessions by TLS mode (the level, or mta-sts when an enforced policy applied) and result "
    "(verified, dane, encrypted, plaintext, or an RFC 8460 failure type with '_' for '-', or mx_not_in_policy).",
    ["mode", "result"],
)
DNS_FAILURES = Counter(
    "mailrelayd_dns_lookup_failures_total",
    "Failed DNS lookups by record type and reason (nxdomain, servfail, timeout, nodata, error).",
    ["type", "reason"],
)
DSN_SENT = Counter("mailrelayd_dsn_generated_total", "Delivery status notifications generated.", ["action"])

# --- DKIM -------------------------------------------------------------------------------
DKIM_SIGN_SECONDS = Histogram(
    "mailrelayd_dkim_sign_seconds", "Time to DKIM-sign one message (all its signatures).", buckets=_SIGN_BUCKETS
)
DKIM_SIGNATURES = Counter(
    "mailrelayd_dkim_signatures_total", "DKIM signatures by signing domain, algorithm and result (ok, error).",
    ["domain", "algorithm", "result"],
)
DKIM_UNSIGNED = Counter(
    "mailrelayd_dkim_unsigned_messages_total",
    "Messages sent unsigned because no key is configured for their header From domain.",
)
DKIM_KEYS_LOADED = Gauge("mailrelayd_dkim_keys_loaded", "DKIM keys currently loaded.")

# --- feedback ---------------------------------------------------------------------------
FEEDBACK_RECEIVED = Counter(
    "mailrelayd_feedback_received_total",
    "Inbound feedback messages by kind (hard_bounce, soft_bounce, complaint, delayed, reputation, policy, "
    "not_feedback, unparsable, untrusted) "
    "and the sending domain they refer to (when known).",
    ["kind", "sender_domain"],
)
# Label values of the feedback families (kept bounded; the processor maps anything else to "other").
FEEDBACK_KINDS = ("hard_bounce", "soft_bounce", "complaint", "delayed", "reputation", "policy", "not_feedback",
                  "unparsable", "untrusted")
REPUTATION_REASONS = ("blocked", "badreputation", "requireptr", "authfailure", "spamdetected", "virusdetected",
                      "speeding", "toomanyconn", "rejected", "norelaying", "policyviolation", "securityerror",
                      "contenterror", "notcompliantrfc", "syntaxerror", "failedstarttls", "other")
REPUTATION_EVENTS = Counter(
    "mailrelayd_reputation_events_total",
    "Failures about our own sending (blocklist, PTR, SPF/DKIM/DMARC, spam/content, rate limits) by sending "
    "domain and reason; never counted against the recipient.",
    ["domain", "reason"],
)
REPUTATION_EVENTS_BY_DESTINATION = Counter(
    "mailrelayd_reputation_events_by_destination_total",
    "The same reputation/policy failures by destination (recipient) domain and reason.",
    ["destination", "reason"],
)
CIRCUIT_BREAKER_TRIPS = Counter(
    "mailrelayd_circuit_breaker_trips_total",
    "Sending domains whose outbound mail the feedback circuit breaker held, by domain and reason "
    "(bounce_rate, complaint_rate).",
    ["domain", "reason"],
)
SUPPRESSIONS = Gauge("mailrelayd_suppressions", "Addresses on the suppression list by kind.", ["kind"])
SUPPRESSED_REJECTIONS = Counter(
    "mailrelayd_suppressed_rejections_total",
    "Recipients refused or skipped because they are suppressed, by stage (rcpt, delivery).",
    ["stage"],
)
SUPPRESSION_STORE_UP = Gauge(
    "mailrelayd_suppression_store_up",
    "1 while the suppression store is usable (always for sqlite); 0 while a shared PostgreSQL store is "
    "unreachable: RCPT checks use the last known list and new feedback waits in the local outbox.",
)
SUPPRESSION_OUTBOX = Gauge(
    "mailrelayd_suppression_outbox_records",
    "Feedback records kept in the local outbox while the shared suppression store is unreachable.",
)

# --- applications: webhooks, per-user limits, HTTP API, sendmail ---------------------------
WEBHOOK_EVENTS_SENT = Counter(
    "mailrelayd_webhook_events_sent_total", "Events delivered to a webhook (its receiver answered 2xx).",
    ["webhook"],
)
WEBHOOK_EVENTS_FAILED = Counter(
    "mailrelayd_webhook_events_failed_total",
    "Events in webhook POSTs that failed (connection error, timeout or non-2xx reply); each POST is retried "
    "with backoff, so one event may count several times.",
    ["webhook"],
)
WEBHOOK_BACKLOG = Gauge(
    "mailrelayd_webhook_backlog_events", "Events stored for a webhook and not yet delivered to it.", ["webhook"]
)
WEBHOOK_EVENTS_DROPPED = Counter(
    "mailrelayd_webhook_events_dropped_total",
    "Events deleted undelivered because the stored backlog passed events.max_backlog.",
)
USER_RATE_LIMITED = Counter(
    "mailrelayd_user_rate_limited_total", "Messages refused (451 4.7.1) because the user is over their sending rate.",
    ["user"],
)
API_REQUESTS = Counter(
    "mailrelayd_api_requests_total", "HTTP API submissions by HTTP status code.", ["status"]
)
MAILDROP_MESSAGES = Counter(
    "mailrelayd_maildrop_messages_total",
    "Messages picked up from the sendmail maildrop directory, by result (queued, failed: kept in maildrop/failed).",
    ["result"],
)

# --- label values known at start -----------------------------------------------------------
# A labelled family has no series until its first ``labels(...)`` call, so a fresh scrape lacks
# it: dashboards show "No data" and ``rate()``-based alerts have nothing to evaluate. Every
# labelled family therefore declares the label values it can have, and ``init_known_labels()``
# (called by the daemon at start and on every reload) creates each combination at zero.
#
# How to declare (next to the metric's definition, or here):
#
#     declare_labels(MY_COUNTER, listener=LISTENERS, result=("ok", "error"))
#
# Each label of the family gets either a tuple of fixed values or a :class:`Dimension` whose
# values come from the config (listener names, configured domains); every combination is
# created. Families whose combinations are not a cross product (a DKIM key's domain goes with its
# algorithm) use ``declare_label_sets(METRIC, fn)`` with ``fn(dimensions) -> [{label: value}]``.
# tests/test_prometheus_e2e.py checks every alert expression and dashboard query against a real
# Prometheus, so a family left undeclared shows up there.

@dataclass(frozen=True)
class Dimension:
    """A label whose known values are supplied at :func:`init_known_labels` time."""

    name: str


LISTENERS = Dimension("listeners")
"""Names of the configured listeners."""
SENDER_DOMAINS = Dimension("sender_domains")
"""Configured sending (DKIM) domains, plus "other" and "none" (see :class:`BoundedLabel`)."""
DESTINATION_DOMAINS = Dimension("destination_domains")
"""Route domains plus "other"."""
DKIM_KEYS = Dimension("dkim_keys")
"""(domain, algorithm) of each configured key, as "domain algorithm" strings."""
WEBHOOKS = Dimension("webhooks")
"""Names of the configured [[webhooks]]."""
USERS = Dimension("users")
"""Users of the users file."""

LabelSpec = tuple[str, ...] | Dimension
_DECLARED: list[tuple[Any, dict[str, LabelSpec]]] = []
_DECLARED_SETS: list[tuple[Any, Callable[[Mapping[str, Sequence[str]]], Iterable[Mapping[str, str]]]]] = []


def declare_labels(metric: Any, **labels: LabelSpec) -> None:
    """Declare the known values of every label of ``metric`` (see the comment above)."""
    _DECLARED.append((metric, labels))


def declare_label_sets(metric: Any, fn: Callable[[Mapping[str, Sequence[str]]], Iterable[Mapping[str, str]]]
                       ) -> None:
    """Declare explicit label sets, computed from the dimensions at init time."""
    _DECLARED_SETS.append((metric, fn))


def init_known_labels(*, listeners: Iterable[str] = (), sender_domains: Iterable[str] = (),
                      destination_domains: Iterable[str] = (), dkim_keys: Iterable[tuple[str, str]] = (),
                      webhooks: Iterable[str] = (), users: Iterable[str] = ()) -> int:
    """Create every declared label combination (at zero; existing series keep their values).
    Returns how many combinations were touched."""
    dims: dict[str, Sequence[str]] = {
        LISTENERS.name: tuple(dict.fromkeys(listeners)),
        SENDER_DOMAINS.name: tuple(dict.fromkeys([*sender_domains, BoundedLabel.OTHER, "none"])),
        DESTINATION_DOMAINS.name: tuple(dict.fromkeys([*destination_domains, BoundedLabel.OTHER])),
        DKIM_KEYS.name: tuple(f"{d} {a}" for d, a in dict.fromkeys(dkim_keys)),
        WEBHOOKS.name: tuple(dict.fromkeys(webhooks)),
        USERS.name: tuple(dict.fromkeys(users)),
    }
    n = 0
    for metric, spec in _DECLARED:
        names = list(spec)
        axes = [dims[v.name] if isinstance(v, Dimension) else v for v in spec.values()]
        for combo in itertools.product(*axes):
            metric.labels(**dict(zip(names, combo, strict=True)))
            n += 1
    for metric, fn in _DECLARED_SETS:
        for labels in fn(dims):
            metric.labels(**labels)
            n += 1
    return n


_REPLY_COMMANDS = ("CONNECT", "HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT")
_REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")

# READY_CHECK is not declared: a check that does not apply (dkim without keys) must not read as failing;
# the daemon sets every applicable check before it serves /metrics.
declare_labels(CONNECTIONS, listener=LISTENERS,
               result=("accepted", "rejected_limit", "rejected_per_ip", "draining", "pregreet", "tls_failed",
                       "proxy_invalid", "proxy_timeout", "proxy_not_allowed"))
for _m in (CONNECTIONS_ACTIVE, MESSAGES_RECEIVED, RECIPIENTS_RECEIVED, MESSAGE_SIZE, AUTH_FAILURES, AUTH_THROTTLED,
           TLS_HANDSHAKE_FAILURES, ACCEPT_DURATION):
    declare_labels(_m, listener=LISTENERS)
declare_labels(SMTP_REPLIES, listener=LISTENERS, command=_REPLY_COMMANDS, **{"class": _REPLY_CLASSES})
declare_labels(AUTH_ATTEMPTS, listener=LISTENERS, result=("success", "failure"))
declare_labels(QUEUE_RECIPIENTS, state=("pending", "inflight", "deferred", "held"))
declare_labels(DELIVERY_ATTEMPTS, result=("delivered", "deferred", "bounced", "expired", "suppressed"),
               domain=DESTINATION_DOMAINS)
declare_labels(DELIVERY_DURATION, result=("delivered", "deferred", "bounced", "mixed"))
declare_labels(DELIVERY_LATENCY, result=("delivered", "bounced", "expired", "suppressed"))
declare_labels(SENT_RECIPIENTS, sender_domain=SENDER_DOMAINS,
               result=("delivered", "bounced", "expired", "suppressed"))
declare_labels(DELIVERY_CONNECTIONS, result=("ok", "loop", "refused", "refused_greeting", "timeout", "tls_failed"))
declare_labels(OUTBOUND_TLS, mode=("may",), result=("verified", "encrypted", "plaintext"))
declare_labels(DNS_FAILURES, type=("MX", "A", "AAAA"), reason=("nxdomain", "servfail", "timeout", "nodata", "error"))
declare_labels(DSN_SENT, action=("failed", "delayed"))
declare_label_sets(DKIM_SIGNATURES, lambda dims: [
    {"domain": key.split(" ")[0], "algorithm": key.split(" ")[1], "result": result}
    for key in dims[DKIM_KEYS.name] for result in ("ok", "error")])
declare_labels(FEEDBACK_RECEIVED, sender_domain=SENDER_DOMAINS, kind=FEEDBACK_KINDS)
declare_labels(REPUTATION_EVENTS, domain=SENDER_DOMAINS, reason=REPUTATION_REASONS)
declare_labels(REPUTATION_EVENTS_BY_DESTINATION, destination=DESTINATION_DOMAINS, reason=REPUTATION_REASONS)
declare_labels(CIRCUIT_BREAKER_TRIPS, domain=SENDER_DOMAINS, reason=("bounce_rate", "complaint_rate"))
declare_labels(SUPPRESSIONS, kind=("hard_bounce", "soft_bounce", "complaint", "manual"))
declare_labels(SUPPRESSED_REJECTIONS, stage=("rcpt", "delivery"))

for _m in (WEBHOOK_EVENTS_SENT, WEBHOOK_EVENTS_FAILED, WEBHOOK_BACKLOG):
    declare_labels(_m, webhook=WEBHOOKS)
declare_labels(USER_RATE_LIMITED, user=USERS)
declare_labels(API_REQUESTS, status=("202", "400", "401", "403", "404", "405", "408", "413", "415", "422", "429",
                                     "503"))
declare_labels(MAILDROP_MESSAGES, result=("queued", "failed"))
# --- delivery control -------------------------------------------------------------------
destination_label = BoundedLabel(100)
DESTINATION_SUSPENDED = Gauge(
    "mailrelayd_destination_suspended",
    "Destinations (recipient domain or [[shaping]] MX group) suspended after a throttling reply: 1 or 0 per "
    "destination; configured [[shaping]] destinations always have their own label, the first 100 others too, "
    "the rest count together under 'other'.",
    ["destination"],
)
DESTINATION_POSTPONED = Counter(
    "mailrelayd_destination_postponed_total",
    "Transactions postponed by shaping, by reason (suspended, connections, rate).",
    ["reason"],
)
QUEUE_HELD = Gauge("mailrelayd_queue_held_rules", "Hold rules in force (queue hold --domain/--sender/--user).")
declare_labels(DESTINATION_POSTPONED, reason=("suspended", "connections", "rate"))
