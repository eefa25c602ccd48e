"""``mailrelayd init DIR``: a complete development set-up on loopback high ports.

Writes a config, a self-signed certificate, a users file with one user (password printed once),
a DKIM key for a development domain, and routes every outbound message to 127.0.0.1:2526 so that
a development relay never sends mail to the Internet.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import textwrap
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailrelayd.dkim import generate_key, txt_record, write_private_key
from mailrelayd.users import User, atomic_write, hash_password, save_users

DEV_DOMAIN = "dev.mailrelayd.test"
BOUNCE_DOMAIN = "bounces.dev.mailrelayd.test"
DEV_USER = "dev"
SELECTOR = "dev"


@dataclass(frozen=True)
class DevSetup:
    directory: Path
    config: Path
    user: str
    password: str
    dkim_txt: str


def make_self_signed(cert_file: Path, key_file: Path, hostname: str = "localhost", days: int = 825) -> None:
    """A self-signed ECDSA certificate for ``hostname``, 127.0.0.1 and ::1 (key mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    atomic_write(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    atomic_write(cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def dev_config(secret: str) -> str:
    return textwrap.dedent(f"""\
        # Development configuration written by `mailrelayd init`. Every path is relative to this file.
        # Outbound mail goes to 127.0.0.1:2526 (see [[routes]]), never to the Internet. To see it:
        #   .venv/bin/python -m aiosmtpd -n -l 127.0.0.1:2526 -c aiosmtpd.handlers.Debugging

        [server]
        hostname = "localhost"
        spool_dir = "spool"
        state_dir = "state"
        shutdown_timeout = "10s"
        min_free_space = "50MB"

        [tls]
        cert_file = "tls/cert.pem"
        key_file = "tls/key.pem"

        [[listeners]]
        name = "relay"
        address = "127.0.0.1:2525"
        mode = "relay"
        tls = "starttls"

        [[listeners]]
        name = "submission"
        address = "127.0.0.1:2587"
        mode = "submission"
        tls = "starttls"

        [[listeners]]
        name = "submissions"
        address = "127.0.0.1:2465"
        mode = "submission"
        tls = "implicit"

        [http]
        address = "127.0.0.1:9025"

        [auth]
        users_file = "users.toml"

        [relay]
        local_domains = ["{BOUNCE_DOMAIN}"]
        trusted_networks = ["127.0.0.1/32", "::1/128"]

        [limits]
        max_message_size = "25MB"
        max_recipients = 100

        [[dkim]]
        domain = "{DEV_DOMAIN}"
        selector = "{SELECTOR}"
        key_file = "dkim/{DEV_DOMAIN}.{SELECTOR}.key"
        algorithm = "rsa-sha256"

        [delivery]
        retry_initial = "30s"
        retry_max = "5m"

        [[routes]]
        domain = "*"
        host = "127.0.0.1:2526"
        tls = "may"

        [feedback]
        bounce_domain = "{BOUNCE_DOMAIN}"
        verp_secret = "{secret}"

        [sendmail]
        # `mailrelayd sendmail` (cron, PHP mail(), scripts) submits as this user.
        user = "{DEV_USER}"
        domain = "{DEV_DOMAIN}"

        [api]
        # HTTP submission API (POST /v1/messages); keys: `mailrelayd user apikey {DEV_USER}`.
        address = "127.0.0.1:9026"

        [logging]
        format = "console"
        """)


def init_dev(directory: Path, *, password: str | None = None) -> DevSetup:
    """Create the development set-up in ``directory`` (which must not hold a config yet)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "mailrelayd.toml"
    if config.exists():
        raise FileExistsError(f"{config} already exists")
    (directory / "tls").mkdir(exist_ok=True)
    make_self_signed(directory / "tls" / "cert.pem", directory / "tls" / "key.pem")
    password = password or secrets.token_urlsafe(18)
    save_users(directory / "users.toml",
               {DEV_USER: User(DEV_USER, hash_password(password), (f"@{DEV_DOMAIN}",))})
    pem, pub = generate_key("rsa-sha256", 2048)
    write_private_key(directory / "dkim" / f"{DEV_DOMAIN}.{SELECTOR}.key", pem)
    atomic_write(config, dev_config(secrets.token_urlsafe(24)).encode(), mode=0o640)
    return DevSetup(directory, config, DEV_USER, password, txt_record(DEV_DOMAIN, SELECTOR, "rsa-sha256", pub))


def swaks_submission(user: str, password: str) -> str:
    return (f"swaks --server 127.0.0.1:2587 --tls --auth PLAIN --auth-user {user} --auth-password '{password}' "
            f"--from app@{DEV_DOMAIN} --to someone@example.net --h-Subject 'mailrelayd test'")


def swaks_relay() -> str:
    return (f"swaks --server 127.0.0.1:2525 --from app@{DEV_DOMAIN} --to someone@example.net "
            f"--h-Subject 'mailrelayd test'")
