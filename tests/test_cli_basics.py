"""The everyday CLI verbs in a subprocess: --help, check-config errors naming file and key,
$MAILRELAYD_CONFIG, user add/list/del (password from stdin, stored only as a scrypt hash), and
``init`` producing a set-up the daemon starts from.

(load_config's messages themselves are tested in test_config.py; here the CLI's exit code and
stderr are.)"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import stat
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mailrelayd.users import UsersFileError, load_users, verify_password
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.proc import DaemonProcess
from tests.support.smtptalk import SmtpTalk


def _cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mailrelayd_cmd(), *args], capture_output=True, text=True, env=env, timeout=60,
                          input=stdin if stdin is not None else "")


def test_help_lists_the_verbs(cli_env: dict[str, str]) -> None:
    r = _cli("--help", env=cli_env)
    assert r.returncode == 0, r.stderr
    for verb in ("run", "check-config", "init", "user", "dkim", "queue", "suppress", "feedback", "doctor"):
        assert re.search(rf"\b{verb}\b", r.stdout), verb
    r = _cli("user", "--help", env=cli_env)
    assert r.returncode == 0 and all(v in r.stdout for v in ("add", "del", "list"))
    r = _cli("--version", env=cli_env)
    assert r.returncode == 0 and r.stdout.startswith("mailrelayd ")
    r = _cli("no-such-verb", env=cli_env)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def _listener_without_cert(data: dict[str, Any]) -> dict[str, Any]:
    del data["tls"]
    data["listeners"] = [{"name": "mx", "address": "127.0.0.1:0", "mode": "relay", "tls": "starttls"}]
    return data


def _bad_address(data: dict[str, Any]) -> dict[str, Any]:
    data["listeners"][0]["address"] = "127.0.0.1:99999"
    return data


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: deep_merge(d, {"limits": {"max_mesage_size": "1MB"}}), "limits.max_mesage_size: unknown key"),
    (lambda d: deep_merge(d, {"delivery": {"retry_initial": "soon"}}), "delivery.retry_initial: bad duration"),
    (_bad_address, "listeners[0].address: bad address"),
    (lambda d: deep_merge(d, {"tls": {"cert_file": "missing/cert.pem"}}), "tls.cert_file: file not found"),
    (_listener_without_cert, 'listeners[0].tls: tls = "starttls" needs [tls] cert_file and key_file'),
], ids=["unknown-key", "bad-duration", "bad-address", "missing-cert", "starttls-without-cert"])
def test_check_config_errors_name_file_and_key(tmp_path: Path, tls_files, cli_env: dict[str, str],
                                               mutate: Any, expected: str) -> None:
    cfg = write_config(tmp_path, mutate(base_config(tls_files)))
    r = _cli("check-config", "-c", str(cfg), env=cli_env)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"mailrelayd: {cfg}: {expected}"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("verb", [("check-config",), ("user", "list")])
def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path, tls_files, cli_env: dict[str, str],
                                            verb: tuple[str, ...]) -> None:
    # `mailrelayd user list | head -1`: the reader went away; no "[Errno 32] Broken pipe", no traceback.
    cfg = write_config(tmp_path, base_config(tls_files))
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        r = subprocess.run([*mailrelayd_cmd(), *verb, "-c", str(cfg)], stdout=w_fd, stderr=subprocess.PIPE,
                           text=True, env=cli_env, timeout=60)
    finally:
        os.close(w_fd)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_config_path_from_environment(tmp_path: Path, tls_files, cli_env: dict[str, str]) -> None:
    good = write_config(tmp_path / "good", base_config(tls_files))
    bad = write_config(tmp_path / "bad", deep_merge(base_config(tls_files), {"smtpd": {}}))
    r = _cli("check-config", env=dict(cli_env, MAILRELAYD_CONFIG=str(bad)))
    assert r.returncode == 1 and "mailrelayd.toml: smtpd: unknown key" in r.stderr
    # -c wins over the environment.
    r = _cli("check-config", "-c", str(good), env=dict(cli_env, MAILRELAYD_CONFIG=str(bad)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: OK (3 listeners, 2 users, 0 DKIM keys)")
    # The users file named by the environment's config is the one `user list` reads.
    r = _cli("user", "list", env=dict(cli_env, MAILRELAYD_CONFIG=str(good)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["alice\t@example.com", "bob\tbob@example.org"]
    r = _cli("check-config", env=dict(cli_env, MAILRELAYD_CONFIG=str(tmp_path / "nope.toml")))
    assert r.returncode == 1 and "nope.toml" in r.stderr and "Traceback" not in r.stderr


def test_user_add_list_del(tmp_path: Path, tls_files, cli_env: dict[str, str]) -> None:
    cfg = write_config(tmp_path, base_config(tls_files), users={})
    users_file = tmp_path / "users.toml"
    secret = "s3cret-Pa55word-for-carol"
    r = _cli("user", "add", "carol", "--allow-from", "@x.example", "--allow-from", "ops@y.example",
             "-c", str(cfg), env=cli_env, stdin=secret + "\n")
    assert r.returncode == 0, r.stderr
    assert "added user carol" in r.stdout and secret not in r.stdout + r.stderr
    text = users_file.read_text()
    assert secret not in text and "$scrypt$ln=" in text
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640
    carol = load_users(users_file)["carol"]
    assert carol.allowed_from == ("@x.example", "ops@y.example")
    assert verify_password(secret, carol.password_hash) and not verify_password("wrong", carol.password_hash)

    # --users-file works without a config; a second user; list is sorted, tab-separated.
    r = _cli("user", "add", "alice", "--allow-from", "*", "--users-file", str(users_file),
             env=cli_env, stdin="another-password\n")
    assert r.returncode == 0, r.stderr
    r = _cli("user", "list", "-c", str(cfg), env=cli_env)
    assert r.returncode == 0 and r.stdout.splitlines() == ["alice\t*", "carol\t@x.example, ops@y.example"]

    # Changing the password keeps the allowed senders.
    r = _cli("user", "add", "carol", "-c", str(cfg), env=cli_env, stdin="new-password\n")
    assert r.returncode == 0 and "updated user carol" in r.stdout
    carol = load_users(users_file)["carol"]
    assert carol.allowed_from == ("@x.example", "ops@y.example") and verify_password("new-password",
                                                                                     carol.password_hash)
    # Empty password on stdin and a bad pattern are usage errors; the file is untouched.
    before = users_file.read_bytes()
    assert _cli("user", "add", "dave", "--allow-from", "@x.example", "-c", str(cfg), env=cli_env,
                stdin="\n").returncode == 2
    r = _cli("user", "add", "dave", "--allow-from", "example.com", "-c", str(cfg), env=cli_env, stdin="pw\n")
    assert r.returncode == 2 and "--allow-from" in r.stderr
    assert users_file.read_bytes() == before

    r = _cli("user", "del", "carol", "-c", str(cfg), env=cli_env)
    assert r.returncode == 0 and "deleted user carol" in r.stdout
    assert list(load_users(users_file)) == ["alice"]
    r = _cli("user", "del", "carol", "-c", str(cfg), env=cli_env)
    assert r.returncode == 1 and "no user 'carol'" in r.stderr
    # The daemon's own check accepts the file the CLI wrote.
    r = _cli("check-config", "-c", str(cfg), env=cli_env)
    assert r.returncode == 0 and "1 users" in r.stdout, r.stderr


def test_init_creates_a_setup_the_daemon_runs(tmp_path: Path, cli_env: dict[str, str], client_tls) -> None:
    d = tmp_path / "dev"
    r = _cli("init", str(d), env=cli_env)
    assert r.returncode == 0, r.stderr
    password = re.search(r"password: (\S+)", r.stdout).group(1)  # type: ignore[union-attr]
    cfg = d / "mailrelayd.toml"
    for f in (cfg, d / "tls" / "cert.pem", d / "tls" / "key.pem", d / "users.toml",
              d / "dkim" / "dev.mailrelayd.test.dev.key"):
        assert f.is_file(), f
    for secret_file in (d / "tls" / "key.pem", d / "dkim" / "dev.mailrelayd.test.dev.key"):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600, secret_file
    assert password not in (d / "users.toml").read_text() and password not in cfg.read_text()
    assert "$scrypt$" in (d / "users.toml").read_text()
    assert "v=DKIM1" in r.stdout

    r = _cli("check-config", "-c", str(cfg), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "(3 listeners, 1 users, 1 DKIM keys)" in r.stdout
    # A second init refuses to overwrite.
    r = _cli("init", str(d), env=cli_env)
    assert r.returncode == 1 and "already exists" in r.stderr

    # The daemon starts from it (on ephemeral ports, so parallel test runs do not clash), is ready,
    # and the printed password authenticates the printed user.
    cfg.write_text(re.sub(r'address = "127\.0\.0\.1:\d+"', 'address = "127.0.0.1:0"', cfg.read_text()))
    daemon = DaemonProcess(cfg).wait_ready()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/ready", timeout=10) as resp:
            ready = json.loads(resp.read())
        assert resp.status == 200 and ready["checks"]["dkim"] == "ok", ready

        async def auth() -> int:
            t = await SmtpTalk.connect(daemon.ports["submission"])
            await t.ehlo()
            await t.starttls(client_tls)
            await t.ehlo()
            code, _ = await t.cmd("AUTH PLAIN " + base64.b64encode(f"\0dev\0{password}".encode()).decode())
            await t.cmd("QUIT")
            await t.close()
            return code

        assert asyncio.run(auth()) == 235
    finally:
        assert daemon.stop() == 0


def test_allow_from_patterns_checked_alike_and_repairable(tmp_path: Path, tls_files, cli_env: dict[str, str]) -> None:
    """One check of sender patterns for user add, user set and the users-file loader. `user set
    --allow-from ''` wrote [""], after which check-config, reload and `user set` itself failed."""
    cfg = write_config(tmp_path, base_config(tls_files), users={"dev": ("@example.com",)})
    users_file = tmp_path / "users.toml"
    before = users_file.read_bytes()
    for verb, pattern, words in (("set", "", "empty pattern"), ("set", "@@", "'@@': invalid domain"),
                                 ("add", "a b@c.example", "invalid character in local part")):
        r = _cli("user", verb, "dev", "--allow-from", pattern, "-c", str(cfg), env=cli_env, stdin="pw\n")
        assert (r.returncode, words in r.stderr) == (2, True), (verb, pattern, r.stderr)
    assert users_file.read_bytes() == before
    # Normalised once, where it enters: domains as SMTP sessions see them.
    r = _cli("user", "set", "dev", "--allow-from", "@Bücher.Example.", "--allow-from", "Ops@Example.ORG",
             "-c", str(cfg), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert load_users(users_file)["dev"].allowed_from == ("@xn--bcher-kva.example", "Ops@example.org")
    # A file broken by hand: the loader says where and how; `user set` of that user repairs it.
    users_file.write_text(users_file.read_text().replace('"@xn--bcher-kva.example"', '"@@"'))
    with pytest.raises(UsersFileError, match=r"users.dev.allowed_from\[0\]: '@@': invalid domain"):
        load_users(users_file)  # what check-config and the reload run
    r = _cli("user", "set", "dev", "--rate", "5/h", "-c", str(cfg), env=cli_env)
    assert r.returncode == 1 and "user set dev --allow-from" in r.stderr, r.stderr
    r = _cli("user", "set", "dev", "--allow-from", "@example.com", "-c", str(cfg), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert load_users(users_file)["dev"].allowed_from == ("@example.com",)


def test_run_names_the_key_whose_port_is_taken(tmp_path: Path, tls_files, cli_env: dict[str, str]) -> None:
    """A port taken by another process: `run` exits 1 naming the key, and the DKIM signing helper,
    left without its daemon, exits without a BrokenPipeError traceback."""
    import socket

    from mailrelayd.dkim import generate_key, write_private_key

    pem, _ = generate_key("ed25519-sha256")
    write_private_key(tmp_path / "dkim.key", pem)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = deep_merge(base_config(tls_files), {"dkim": [{"domain": "example.com", "selector": "s1",
                                                             "key_file": "dkim.key",
                                                             "algorithm": "ed25519-sha256"}]})
        data["listeners"][2]["address"] = f"127.0.0.1:{port}"
        cfg = write_config(tmp_path, data)
        r = _cli("run", "-c", str(cfg), "--log-format", "json", env=cli_env)
    # stderr is read to its end: the helper, which inherited it, has exited too.
    assert r.returncode == 1, r.stderr
    assert f"mailrelayd: {cfg}: listeners[2].address: cannot bind 127.0.0.1:{port}: address already in use" \
        in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
