"""Checks for the systemd unit, sysusers.d and tmpfiles.d files in systemd/.

``systemd-analyze verify`` runs on a copy of the unit whose commands point at an existing
executable (the daemon is not installed at /usr/local/bin in a test environment); any output
from it is a failure. The directive checks do not need systemd. sysusers/tmpfiles are applied to
a temporary root when the tools are present (tmpfiles needs root to chown).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "mailrelayd.service"
SYSUSERS = ROOT / "systemd" / "mailrelayd.sysusers"
TMPFILES = ROOT / "systemd" / "mailrelayd.tmpfiles"
BINARY = "/usr/local/bin/mailrelayd"
CONFIG = "/etc/mailrelayd/mailrelayd.toml"
DEFAULT_SHUTDOWN_TIMEOUT = 30  # [server] shutdown_timeout default, seconds


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (in order; repeated keys accumulate, an empty value resets)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {lineno}: not 'Key=value' in a section: {raw!r}"
        assert not line.endswith("\\"), f"line {lineno}: continuation lines are not expected"
        key, value = (part.strip() for part in line.split("=", 1))
        if value == "":
            current[key] = []
        else:
            current.setdefault(key, []).append(value)
    return sections


def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(key: str) -> str:
    values = service().get(key, [])
    assert len(values) == 1, f"{key}= expected exactly once, found {values}"
    return values[0]


def seconds(timespan: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit or "s"]
    return total


def test_parse_unit() -> None:
    parsed = parse_unit("[Service]\n# c\nA=1\nA=2\nB=x\nB=\n[Install]\nWantedBy=multi-user.target\n")
    assert parsed == {"Service": {"A": ["1", "2"], "B": []}, "Install": {"WantedBy": ["multi-user.target"]}}
    assert seconds("45s") == 45 and seconds("1min 30s") == 90 and seconds("30") == 30


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "mailrelayd"),
        ("Group", "mailrelayd"),
        ("Restart", "on-failure"),
        ("WatchdogSec", "30s"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("StateDirectory", "mailrelayd"),
        ("StateDirectoryMode", "0750"),
        ("ConfigurationDirectory", "mailrelayd"),
        ("ConfigurationDirectoryMode", "0750"),
        ("RuntimeDirectory", "mailrelayd"),
        ("UMask", "0027"),
        ("LimitNOFILE", "65536"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ],
)
def test_directive(key: str, value: str) -> None:
    assert one(key) == value


def test_system_call_filter() -> None:
    assert service()["SystemCallFilter"][0] == "@system-service"
    assert set(" ".join(service()["SystemCallFilter"][1:]).lstrip("~").split()) >= {"@privileged", "@resources"}
    assert one("SystemCallErrorNumber") == "EPERM"


def test_process_metrics_stay_readable() -> None:
    # prometheus_client needs /proc/stat for process_* metrics (used by alerts and dashboard).
    assert "ProcSubset" not in service()


def test_address_families() -> None:
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_commands() -> None:
    assert one("ExecStart") == f"{BINARY} run -c {CONFIG}"
    assert one("ExecStartPre") == f"{BINARY} check-config -c {CONFIG}"
    reload = service()["ExecReload"]
    assert reload[-1] == "/bin/kill -HUP $MAINPID", reload
    assert all(cmd == "/bin/kill -HUP $MAINPID" or cmd.startswith(f"{BINARY} check-config") for cmd in reload)


def test_stop_timeout_covers_the_drain() -> None:
    stop = seconds(one("TimeoutStopSec"))
    assert DEFAULT_SHUTDOWN_TIMEOUT < stop <= DEFAULT_SHUTDOWN_TIMEOUT + 30, stop


def test_no_secrets_in_environment() -> None:
    for value in service().get("Environment", []) + service().get("EnvironmentFile", []):
        assert not re.search(r"(?i)pass|secret|token|key|credential", value), value


def test_install_section() -> None:
    assert parse_unit(UNIT.read_text())["Install"]["WantedBy"] == ["multi-user.target"]


def _verify(unit_text: str, tmp_path: Path) -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "mailrelayd.service"
    unit.write_text(unit_text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f"\n(exit {result.returncode})")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert BINARY in text
    # The daemon is not installed here; point the commands at an existing executable so that
    # verify checks everything else. Any remaining output is a real problem.
    output = _verify(text.replace(BINARY, "/bin/true"), tmp_path)
    assert output == "", output


def test_systemd_analyze_verify_reports_problems(tmp_path: Path) -> None:
    """Guard against the check above passing vacuously: verify must complain about a bad key."""
    text = UNIT.read_text().replace(BINARY, "/bin/true").replace("[Service]\n", "[Service]\nNoSuchKey=1\n", 1)
    assert "NoSuchKey" in _verify(text, tmp_path)


def _passwd_ids(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"{name} not created by sysusers")


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles not installed")
    if os.geteuid() != 0:
        pytest.skip("applying tmpfiles.d ownership to a temporary root needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)
    result = subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    uid, gid = _passwd_ids(root, "mailrelayd")
    assert uid < 1000, "must be a system user"
    group = next(line for line in (root / "etc" / "group").read_text().splitlines() if line.startswith("mailrelayd:"))
    assert int(group.split(":")[2]) == gid
    shell = next(line for line in (root / "etc" / "passwd").read_text().splitlines() if line.startswith("mailrelayd:"))
    assert shell.endswith(":/usr/sbin/nologin")

    result = subprocess.run([tmpfiles, "--create", f"--root={root}", str(TMPFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = {
        "var/lib/mailrelayd": (uid, gid),
        "etc/mailrelayd": (0, gid),
        "etc/mailrelayd/dkim": (0, gid),
    }
    for path, (owner, group_id) in expected.items():
        st = (root / path).stat()
        assert stat.S_ISDIR(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o750, (path, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (owner, group_id), path
