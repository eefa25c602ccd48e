"""What TLS an outbound connection to one MX host must have: pure decisions, no I/O.

Levels are Postfix's (``smtp_tls_security_level``): none, may, encrypt, verify, dane, dane-only.
On top of the level, a recipient domain's MTA-STS ``enforce`` policy (RFC 8461) raises ``none`` …
``encrypt`` to "authenticated TLS to a listed MX"; DANE (RFC 7672) wins over MTA-STS for a host that
has usable TLSA records (RFC 8461 §2). Failure results use RFC 8460 §4.3 result types, so one value
serves TLS-RPT, the metric and the DSN text.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

from mailrelayd.delivery.dane import DaneLookup, Tlsa
from mailrelayd.delivery.mta_sts import StsPolicy, host_allowed

LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")
LEVEL_ALIASES = {"require": "encrypt"}
"""Route values from before Postfix's names: "require" meant mandatory STARTTLS without checks."""

Auth = Literal["none", "pkix", "dane"]

# RFC 8460 §4.3.2: result types (negotiation and policy failures).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERT_HOST_MISMATCH = "certificate-host-mismatch"
CERT_EXPIRED = "certificate-expired"
CERT_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_FETCH_ERROR = "sts-policy-fetch-error"
STS_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"
RESULT_TYPES = (STARTTLS_NOT_SUPPORTED, CERT_HOST_MISMATCH, CERT_EXPIRED, CERT_NOT_TRUSTED, VALIDATION_FAILURE,
                TLSA_INVALID, DNSSEC_INVALID, DANE_REQUIRED, STS_FETCH_ERROR, STS_INVALID, STS_WEBPKI_INVALID)

# Metric label values for mailrelayd_delivery_tls_total{mode,result}: bounded by construction.
MODES = (*LEVELS, "mta-sts")
SUCCESS_RESULTS = ("verified", "dane", "encrypted", "plaintext")
FAILURE_RESULTS = (*(t.replace("-", "_") for t in RESULT_TYPES), "mx_not_in_policy")


def normalize_level(value: str) -> str:
    """The one place old route values become Postfix level names."""
    return LEVEL_ALIASES.get(value, value)


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The policy a session is reported under (RFC 8460 §4.4 "policy")."""

    type: Literal["sts", "tlsa", "no-policy-found"]
    domain: str
    strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HostPlan:
    """How to talk to one MX host."""

    mode: str
    """Label for the metric: the level, or "mta-sts" when an enforced policy raised it."""
    require_tls: bool
    auth: Auth
    report: ReportPolicy
    tlsa: tuple[Tlsa, ...] = ()
    sts_testing: bool = False
    """An MTA-STS testing policy: check like enforce, but only report a failure (RFC 8461 §5)."""
    refuse: str = ""
    """Non-empty: do not connect to this host; the reason, for the DSN and the log."""
    refuse_result: str = ""
    why: str = ""
    """What demanded authentication, for failure texts ("MTA-STS policy for example.com")."""
    report_success: bool = True
    """False after a testing-policy failure was reported: the fallback session is not a success."""


def _sts_report(domain: str, sts: StsPolicy) -> ReportPolicy:
    return ReportPolicy("sts", domain, tuple(sts.lines()), sts.mx)


def plan_host(level: str, domain: str, mx: str, sts: StsPolicy | None, dane: DaneLookup | None) -> HostPlan:
    """Decide the TLS requirement for delivering ``domain``'s mail to MX host ``mx``.

    ``sts`` is the domain's cached MTA-STS policy (None: none, or MTA-STS off, or a route);
    ``dane`` is the TLSA lookup for ``mx`` (None unless the level is dane or dane-only).
    """
    level = normalize_level(level)
    none_found = ReportPolicy("no-policy-found", domain)
    if level == "none":
        return HostPlan("none", False, "none", none_found)
    if dane is not None and level in ("dane", "dane-only"):
        tlsa_report = ReportPolicy("tlsa", domain, tuple(r.text() for r in dane.records), (mx,))
        if dane.state == "failed":
            # RFC 7672 §2.2: a failed (e.g. bogus) TLSA lookup must not be read as "no TLSA".
            return HostPlan(level, True, "dane", tlsa_report, refuse=f"DANE: {dane.detail}",
                            refuse_result=DNSSEC_INVALID)
        if dane.state == "usable":
            return HostPlan(level, True, "dane", tlsa_report, dane.usable_records, why=f"DANE TLSA for {mx}")
        enforced = sts is not None and sts.mode == "enforce"
        if dane.state == "unusable" and not enforced:
            # §2.2: unusable TLSA records still mean TLS is mandatory, just not authenticated.
            return HostPlan(level, True, "none", tlsa_report, why=f"DANE TLSA for {mx}")
        # Unusable records under an enforce policy: only usable TLSA records take precedence over
        # MTA-STS (RFC 8461 §2), so the policy below applies (mandatory TLS too, and authenticated).
        if level == "dane-only" and dane.state != "unusable":
            return HostPlan(level, True, "dane", none_found,
                            refuse=f"dane-only: no usable DNSSEC-validated TLSA record for {mx} ({dane.detail})",
                            refuse_result=DANE_REQUIRED)
        level = "may"  # Postfix "dane" without secure TLSA records is "may" (and MTA-STS still applies)
    if sts is not None and sts.mode == "enforce":
        why = f"MTA-STS policy for {domain}"
        report = _sts_report(domain, sts)
        if not host_allowed(sts, mx):
            return HostPlan("mta-sts", True, "pkix", report, why=why,
                            refuse=f"{why} does not list MX host {mx} (mx: {', '.join(sts.mx)})",
                            refuse_result="mx_not_in_policy")
        return HostPlan("mta-sts", True, "pkix", report, why=why)
    testing = sts is not None and sts.mode == "testing"
    report = _sts_report(domain, sts) if testing and sts is not None else none_found
    if level == "verify":
        return HostPlan("verify", True, "pkix", report, why="tls = \"verify\"")
    if level == "encrypt":
        return HostPlan("encrypt", True, "none", report, sts_testing=testing,
                        why=f"MTA-STS policy for {domain} (testing)" if testing else "")
    return HostPlan("may", False, "none", report, sts_testing=testing,
                    why=f"MTA-STS policy for {domain} (testing)" if testing else "")


def proven_auth(plan: HostPlan, tls: bool) -> Auth:
    """What a finished session to the plan's host proved: "pkix" (a WebPKI certificate for the host
    name: verify, MTA-STS enforce or testing), "dane" (the plan's TLSA records matched), "none"."""
    if not tls:
        return "none"
    if plan.auth == "dane":
        return "dane"
    return "pkix" if plan.auth == "pkix" or plan.sts_testing else "none"


def session_satisfies(plan: HostPlan, tls: bool, auth: Auth, tlsa: tuple[Tlsa, ...]) -> bool:
    """Whether a session already open to the plan's host may carry mail under ``plan`` (connection
    reuse across recipient domains that share an MX host): it must have proved at least what a new
    connection would have to. A testing policy asks for a verified session too, so that nothing it
    would have checked and reported is skipped (RFC 8461 §5)."""
    if plan.refuse or (plan.require_tls and not tls):
        return False
    if plan.auth == "dane":
        return auth == "dane" and tlsa == plan.tlsa
    if plan.auth == "pkix" or plan.sts_testing:
        return auth == "pkix"
    return True


def testing_mx_mismatch(plan: HostPlan, sts: StsPolicy | None, mx: str) -> bool:
    """A testing policy that does not list ``mx``: report it, deliver anyway (RFC 8461 §5)."""
    return plan.sts_testing and sts is not None and not host_allowed(sts, mx)


# OpenSSL X509_V_ERR_* codes (x509_vfy.h) for certificate failures, mapped to RFC 8460 types.
_VERIFY_CODES = {10: CERT_EXPIRED, 9: CERT_EXPIRED, 62: CERT_HOST_MISMATCH,
                 2: CERT_NOT_TRUSTED, 18: CERT_NOT_TRUSTED, 19: CERT_NOT_TRUSTED, 20: CERT_NOT_TRUSTED,
                 21: CERT_NOT_TRUSTED, 27: CERT_NOT_TRUSTED}


def classify_tls_error(exc: BaseException) -> tuple[str, str]:
    """(RFC 8460 result type, short reason) for a failed STARTTLS handshake."""
    e: BaseException | None = exc
    while e is not None and not isinstance(e, ssl.SSLError):
        e = e.__cause__ or e.__context__
    if isinstance(e, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(e.verify_code, VALIDATION_FAILURE), e.verify_message or str(e)
    if isinstance(e, ssl.SSLError):
        return VALIDATION_FAILURE, e.reason or str(e)
    return VALIDATION_FAILURE, " ".join(str(exc).split()) or type(exc).__name__


def metric_result(result_type: str) -> str:
    return result_type.replace("-", "_")


def failure_text(plan: HostPlan, mx: str, reason: str) -> str:
    """The DSN/history text: who demanded what, and what we got."""
    if plan.auth == "pkix" and plan.why:
        return f"{plan.why} requires a valid certificate for {mx}; got {reason}"
    if plan.auth == "dane" and plan.why:
        return f"{plan.why} requires a matching certificate; got {reason}"
    return reason
