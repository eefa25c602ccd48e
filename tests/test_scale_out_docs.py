"""docs/scale-out.md: the example HAProxy config is valid for HAProxy itself (`haproxy -c`), and the
node configuration it shows is valid for mailrelayd."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest

from mailrelayd.config import ListenerConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scale-out.md"
HAPROXY_CFG = ROOT / "docs" / "scale-out" / "haproxy.cfg"


@cache
def _haproxy() -> str | None:
    """Path of haproxy; installs Debian's package when missing and we are root (as system-deps.sh)."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", "haproxy"]
    policy = Path("/usr/sbin/policy-rc.d")  # keep the package from starting a system haproxy
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        if subprocess.run(install, capture_output=True, env=env, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            subprocess.run(install, capture_output=True, env=env, timeout=900)
    finally:
        if made:
            policy.unlink(missing_ok=True)
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def test_example_haproxy_config_is_valid(tmp_path: Path) -> None:
    haproxy = _haproxy()
    if haproxy is None:
        pytest.skip("haproxy not found and could not be installed (apt-get install -y haproxy)")
    r = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # And it is not valid by accident: a broken copy is refused.
    broken = tmp_path / "broken.cfg"
    broken.write_text(HAPROXY_CFG.read_text().replace("send-proxy-v2", "send-proxy-v9", 1))
    r = subprocess.run([haproxy, "-c", "-f", str(broken)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode != 0


def test_example_haproxy_config_matches_the_doc() -> None:
    cfg = HAPROXY_CFG.read_text()
    text = DOC.read_text()
    assert "(scale-out/haproxy.cfg)" in text
    # Balanced SMTP listeners get the PROXY header; the health check is the sidecar's /ready.
    assert cfg.count("send-proxy-v2") == 6 and "option httpchk GET /ready" in cfg and "check port 9025" in cfg
    # The drain commands name backends and servers that exist in the example.
    for backend, server in re.findall(r"set server (\w+)/(\w+) state", text):
        assert f"backend {backend}" in cfg and f"server {server} " in cfg, (backend, server)


def test_node_config_in_the_doc_is_valid(tmp_path: Path) -> None:
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    snippet = tomllib.loads("\n".join(line[3:] if line.startswith("   ") else line
                                      for line in block.group(1).splitlines()))
    has_proxy = "proxy_protocol" in {f.name for f in dataclasses.fields(ListenerConfig)}
    users = tmp_path / "users.toml"
    users.write_text("")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    from mailrelayd.devsetup import make_self_signed
    make_self_signed(cert, key, "relay1.example.com")
    for lst in snippet["listeners"]:
        if not has_proxy:  # the PROXY protocol listener option comes with the inbound engine
            assert lst.pop("proxy_protocol") is True and lst.pop("proxy_networks")
    (tmp_path / "pg.password").write_text("x\n")
    snippet["feedback"]["store_password_file"] = str(tmp_path / "pg.password")
    cfg = parse_config({"server": {"hostname": "relay1.example.com"}, "tls": {"cert_file": str(cert),
                        "key_file": str(key)}, "auth": {"users_file": str(users)}, **snippet}, tmp_path / "m.toml")
    assert cfg.feedback.store == "postgresql://mailrelayd_node@db.example.com:5432/mailrelayd"
    assert [lst.name for lst in cfg.listeners] == ["relay", "submission", "submissions"]
    assert cfg.listeners[2].tls == "implicit" and cfg.listeners[2].proxy_protocol
