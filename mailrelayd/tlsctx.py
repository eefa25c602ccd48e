"""Server-side TLS: contexts for STARTTLS and implicit TLS (RFC 8314), TLS 1.2 and later only."""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


class TlsSetupError(Exception):
    """The certificate or key cannot be used; the message names the config key and file."""


@dataclass(frozen=True)
class CertInfo:
    not_after: float
    subject: str
    dns_names: tuple[str, ...]


def read_cert_info(cert_file: Path) -> CertInfo:
    """The leaf certificate's expiry and names (for metrics, /ready and `doctor`)."""
    data = cert_file.read_bytes()
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except ValueError as e:
        raise TlsSetupError(f"tls.cert_file: {cert_file}: not a PEM certificate ({e})") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(cert.not_valid_after_utc.timestamp(), cert.subject.rfc4514_string(), names)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context with our certificate; raises :class:`TlsSetupError` with a clear cause."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No client certificates; no compression (CRIME); prefer our cipher order.
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    load_chain(ctx, cert_file, key_file)
    return ctx


def load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load (or replace, on reload) the certificate chain of ``ctx``."""
    for key, p in (("tls.cert_file", cert_file), ("tls.key_file", key_file)):
        if not p.is_file():
            raise TlsSetupError(f"{key}: file not found: {p}")
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as e:
        why = chain_problem(cert_file, key_file)
        raise TlsSetupError(why or f"tls.cert_file/tls.key_file: {cert_file}, {key_file}: cannot load: "
                            f"{e.reason or e}") from None
    except OSError as e:
        raise TlsSetupError(f"tls.key_file: {key_file}: cannot read: {e.strerror}") from None


def chain_problem(cert_file: Path, key_file: Path) -> str | None:
    """What is wrong with a certificate and key OpenSSL refused, in words and naming the key
    (OpenSSL says "[SSL] PEM lib" for most of it); None when no reason is found here."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except OSError as e:
        return f"tls.cert_file: {cert_file}: cannot read: {e.strerror}"
    except ValueError:
        return f"tls.cert_file: {cert_file}: not a PEM certificate (no valid -----BEGIN CERTIFICATE----- block)"
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as e:
        return f"tls.key_file: {key_file}: cannot read: {e.strerror}"
    except TypeError:  # cryptography's word for "it needs a password"
        return f"tls.key_file: {key_file}: the private key is encrypted; give it without a passphrase"
    except (ValueError, UnsupportedAlgorithm):
        return f"tls.key_file: {key_file}: not a PEM private key (no valid -----BEGIN ... PRIVATE KEY----- block)"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        return (f"tls.key_file: {key_file}: the key does not match the certificate in tls.cert_file {cert_file} "
                "(its first certificate must be the server's own, the chain after it)")
    return None


def days_left(info: CertInfo, now: float | None = None) -> float:
    now = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    return (info.not_after - now) / 86400
