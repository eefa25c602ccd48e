"""Config loading: typed values, relative paths, and errors that name the file and the key."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from mailrelayd.config import ConfigError, HostPort, load_config, parse_duration, parse_hostport, parse_size
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config


def _write(tmp_path: Path, tls_files: tuple[Path, Path], over: dict[str, Any] | None = None,
           drop: tuple[str, ...] = ()) -> Path:
    data = deep_merge(base_config(tls_files), over or {})
    for k in drop:
        data.pop(k, None)
    return write_config(tmp_path, data)


def _error(path: Path) -> str:
    """The message, with the config file's path (which every message starts with) shortened."""
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    return "mailrelayd.toml" + str(e.value).removeprefix(str(path))


def test_valid_config_types_and_relative_paths(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    p = _write(tmp_path, tls_files, {"limits": {"max_message_size": "10MB", "command_timeout": "90s"},
                                     "dns": {"nameservers": ["127.0.0.1:5353", "[::1]:53", "127.0.0.2"]}})
    cfg = load_config(p)
    assert cfg.server.spool_dir == tmp_path / "spool"
    assert cfg.auth.users_file == tmp_path / "users.toml"
    assert cfg.limits.max_message_size == 10 * 1024 * 1024
    assert cfg.limits.command_timeout == 90.0
    assert cfg.dns.nameservers == [HostPort("127.0.0.1", 5353), HostPort("::1", 53), HostPort("127.0.0.2", 53)]
    assert cfg.listeners[2].tls == "implicit"
    assert str(cfg.relay.trusted_networks[0]) == "127.0.0.1/32"


@pytest.mark.parametrize(("value", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("4h", 14400),
                                                ("5d", 432000), (12, 12.0), ("1.5h", 5400)])
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["30", "5 minutes", "-1s", True, "", "1y"])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(("value", "n"), [("25MB", 25 * 2**20), ("512KB", 512 * 1024), ("1GB", 2**30), (1000, 1000),
                                          ("2mib", 2 * 2**20)])
def test_sizes(value: Any, n: int) -> None:
    assert parse_size(value) == n


def test_hostport() -> None:
    assert parse_hostport("[2001:db8::1]:25") == HostPort("2001:db8::1", 25)
    assert parse_hostport("mx.example.com", 25) == HostPort("mx.example.com", 25)
    for bad in ("::1:25", "host:99999", "host", ":25", "[::1"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_unknown_key_names_path(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    msg = _error(_write(tmp_path, tls_files, {"limits": {"max_mesage_size": "1MB"}}))
    assert msg.startswith("mailrelayd.toml: limits.max_mesage_size: unknown key")


def test_unknown_top_level_table(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    assert "mailrelayd.toml: smtpd: unknown key" in _error(_write(tmp_path, tls_files, {"smtpd": {"x": 1}}))


def test_bad_duration_names_key(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    msg = _error(_write(tmp_path, tls_files, {"limits": {"data_timeout": "ten minutes"}}))
    assert msg.startswith("mailrelayd.toml: limits.data_timeout: bad duration")


def test_bad_address_names_listener_index(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    data = base_config(tls_files)
    data["listeners"][1]["address"] = "127.0.0.1:notaport"
    msg = _error(write_config(tmp_path, data))
    assert msg.startswith("mailrelayd.toml: listeners[1].address: bad address")


def test_bad_enum_lists_choices(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    data = base_config(tls_files)
    data["listeners"][1]["tls"] = "yes"
    assert _error(write_config(tmp_path, data)) == \
        "mailrelayd.toml: listeners[1].tls: must be one of starttls, implicit, none"


def test_wrong_type(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    msg = _error(_write(tmp_path, tls_files, {"limits": {"max_recipients": "100"}}))
    assert msg == "mailrelayd.toml: limits.max_recipients: must be an integer, not a string"


def test_missing_cert_file(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    msg = _error(_write(tmp_path, tls_files, {"tls": {"cert_file": "nope/cert.pem"}}))
    assert msg.startswith("mailrelayd.toml: tls.cert_file: file not found:")
    assert "nope/cert.pem" in msg


def test_starttls_relay_without_cert(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    data = base_config(tls_files)
    del data["tls"]
    data["listeners"] = [{"name": "mx", "address": "127.0.0.1:0", "mode": "relay", "tls": "starttls"}]
    assert _error(write_config(tmp_path, data)) == \
        'mailrelayd.toml: listeners[0].tls: tls = "starttls" needs [tls] cert_file and key_file'


def test_plaintext_submission_refused(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    data = base_config(tls_files)
    data["listeners"][1]["tls"] = "none"
    assert "listeners[1].tls: submission listeners need TLS" in _error(write_config(tmp_path, data))


def test_missing_required_key(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    data = base_config(tls_files)
    del data["server"]["hostname"]
    assert _error(write_config(tmp_path, data)) == "mailrelayd.toml: server.hostname: missing required key"


def test_toml_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[server\nhostname = 1\n")
    assert _error(p).startswith("mailrelayd.toml: TOML syntax error")  # _error shortens the path


def test_route_auth_requires_tls(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    msg = _error(_write(tmp_path, tls_files, {"routes": [{"domain": "*", "host": "smarthost.example:587",
                                                          "username": "u", "password": "p", "tls": "may"}]}))
    assert msg.startswith("mailrelayd.toml: routes[0].tls: AUTH to a route needs")


def test_route_lookup_order(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cfg = load_config(_write(tmp_path, tls_files, {"routes": [
        {"domain": "*", "host": "127.0.0.1:2526"}, {"domain": "example.net", "host": "127.0.0.1:2527"}]}))
    assert cfg.route_for("example.net").host.port == 2527  # type: ignore[union-attr]
    assert cfg.route_for("mail.example.net").host.port == 2527  # type: ignore[union-attr]
    assert cfg.route_for("example.org").host.port == 2526  # type: ignore[union-attr]


def test_check_config_cli(tmp_path: Path, tls_files: tuple[Path, Path], cli_env: dict[str, str]) -> None:
    good = _write(tmp_path / "good", tls_files)
    r = subprocess.run([*mailrelayd_cmd(), "check-config", "-c", str(good)], capture_output=True, text=True,
                       env=cli_env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    bad = _write(tmp_path / "bad", tls_files, {"limits": {"command_timeout": "forever"}})
    r = subprocess.run([*mailrelayd_cmd(), "check-config", "-c", str(bad)], capture_output=True, text=True,
                       env=cli_env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith(f"mailrelayd: {bad}: limits.command_timeout: bad duration")
    assert "Traceback" not in r.stderr


def test_check_config_reports_bad_key_file(tmp_path: Path, tls_files: tuple[Path, Path],
                                           cli_env: dict[str, str]) -> None:
    """A cert that exists but is not a certificate is found by check-config, not at first STARTTLS."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    p = _write(tmp_path, tls_files, {"tls": {"cert_file": str(junk)}})
    r = subprocess.run([*mailrelayd_cmd(), "check-config", "-c", str(p)], capture_output=True, text=True,
                       env=cli_env, timeout=60)
    assert r.returncode == 1
    assert "tls.cert_file" in r.stderr and "Traceback" not in r.stderr


def test_config_env_default(tmp_path: Path, tls_files: tuple[Path, Path], cli_env: dict[str, str]) -> None:
    p = _write(tmp_path, tls_files)
    env = dict(cli_env, MAILRELAYD_CONFIG=str(p))
    r = subprocess.run([*mailrelayd_cmd(), "check-config"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr


def test_example_production_config_is_schema_valid() -> None:
    """config/mailrelayd.toml uses only real keys with valid values (its files live on a server,
    so only the schema is checked here, not file existence)."""
    import tomllib

    from mailrelayd.config import Config, _Loader

    path = Path(__file__).resolve().parents[1] / "config" / "mailrelayd.toml"
    loaded = _Loader(path).build(Config, tomllib.loads(path.read_text()), "")
    assert loaded.server.hostname and loaded.listeners


def test_errors_name_the_config_path_as_given(tmp_path: Path, tls_files: tuple[Path, Path],
                                              cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every config error starts with the config file's path as given, not its base name (`null:
    server: ...` for -c /dev/null), including those about the files it names, which say in words
    what is wrong instead of OpenSSL's "[SSL] PEM lib"."""
    from mailrelayd.daemon import SetupError, check
    from mailrelayd.devsetup import make_self_signed

    if not Path("/etc/mailrelayd/mailrelayd.toml").exists():
        r = subprocess.run([*mailrelayd_cmd(), "check-config"], capture_output=True, text=True, env=cli_env,
                           timeout=60)
        assert (r.returncode, r.stderr) == (1, "mailrelayd: /etc/mailrelayd/mailrelayd.toml: file not found\n")
    with pytest.raises(ConfigError, match=r"^/dev/null: server: missing required key$"):
        load_config("/dev/null")
    monkeypatch.chdir(tmp_path)
    make_self_signed(tmp_path / "other.pem", tmp_path / "other.key", "other.example")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for tls, expected in (
            ({"key_file": str(tmp_path / "other.key")}, "tls.key_file: .*: the key does not match the certificate"),
            ({"cert_file": "../junk.pem"}, "tls.cert_file: .*junk.pem: not a PEM certificate"),
            ({"key_file": "../junk.pem"}, "tls.key_file: .*junk.pem: not a PEM private key")):
        _write(tmp_path / "rel", tls_files, {"tls": tls})
        with pytest.raises(SetupError, match=f"^rel/mailrelayd.toml: {expected}"):
            check(Path("rel/mailrelayd.toml"))
    _write(tmp_path / "rel", tls_files, {"tls": {"cert_file": ""}})
    with pytest.raises(ConfigError, match=r"^rel/mailrelayd.toml: tls.cert_file: must be a path, not an empty"):
        load_config("rel/mailrelayd.toml")


@pytest.mark.parametrize(("over", "expected"), [
    ({"http": {"address": "127.0.0.1:42587"}, "listeners": 2},
     "http.address: 127.0.0.1:42587 clashes with listeners[2].address = 127.0.0.1:42587"),
    ({"api": {"address": "127.0.0.1:42587", "tls": False}, "listeners": 0},
     "api.address: 127.0.0.1:42587 clashes with listeners[0].address = 0.0.0.0:42587"),
    ({"listeners": 1, "second": 2}, "listeners[2].address: 127.0.0.1:42587 clashes with listeners[1].address"),
    ({"http": {"address": "[::]:42587"}, "listeners": 2}, None),  # IPv6 sockets are V6ONLY: no clash
    ({"bad_ip": 1}, "listeners[1].address: bad address '999.1.1.1:42587': '999.1.1.1' is not an IPv4 address"),
], ids=["http-listener", "api-wildcard", "two-listeners", "v6-wildcard-and-v4", "bad-ip"])
def test_bind_address_clashes_and_bad_ips(tmp_path: Path, tls_files: tuple[Path, Path], over: dict[str, Any],
                                          expected: str | None) -> None:
    """`run` failed at the second bind with "[Errno 98] ... address already in use" and no key; and
    a listener on 999.1.1.1 passed check-config."""
    data = deep_merge(base_config(tls_files), {k: v for k, v in over.items() if k in ("http", "api")})
    if "listeners" in over:
        i = over["listeners"]
        data["listeners"][i]["address"] = "0.0.0.0:42587" if "api" in over else "127.0.0.1:42587"
    if "second" in over:
        data["listeners"][over["second"]]["address"] = "127.0.0.1:42587"
    if "bad_ip" in over:
        data["listeners"][1]["address"] = "999.1.1.1:42587"
    p = write_config(tmp_path, data)
    if expected is None:
        load_config(p)
    else:
        assert _error(p).startswith(f"mailrelayd.toml: {expected}")
