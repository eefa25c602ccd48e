"""Every `make bench-*` target works on a fresh clone: it installs the bench extra it needs (and not the
test extras), and every bench script starts without pytest or the test suite."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def make_rules() -> dict[str, tuple[list[str], list[str]]]:
    """{target: (prerequisites, recipe lines)} from the Makefile."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: str | None = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s:#=][^:=]*):(?!=)\s*(.*)$", line)
        if m:
            current = m.group(1).strip()
            rules[current] = (m.group(2).replace("|", " ").split(), [])
        elif line.startswith("\t") and current is not None:
            rules[current][1].append(line.strip())
        elif line.strip():
            current = None
    return rules


def target_scripts() -> list[str]:
    """The bench scripts that `make bench-*` runs (other scripts in bench/ may use the test suite's
    helpers: they are run by hand from a test set-up)."""
    out = set()
    for t, (_, recipe) in make_rules().items():
        m = re.search(r"bench/(\w+\.py)", " ".join(recipe)) if t.startswith("bench-") else None
        if m:
            out.add(m.group(1))
    return sorted(out)


SCRIPTS = target_scripts()


def test_every_bench_target_installs_the_bench_extra() -> None:
    rules = make_rules()
    targets = [t for t in rules if t.startswith("bench-")]
    assert {"bench-accept", "bench-dkim", "bench-feedback", "bench-latency"} <= set(targets)
    installer = "$(VENV)/.bench-installed"
    assert any("'.[bench]'" in line for line in rules[installer][1])
    for t in targets:
        assert installer in rules[t][0], t
        script = re.search(r"bench/(\w+\.py)", " ".join(rules[t][1]))
        assert script and (BENCH / script.group(1)).is_file(), t
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.lower().startswith("pynacl") for req in extras["bench"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_scripts_do_not_import_the_test_suite(script: str) -> None:
    tree = ast.parse((BENCH / script).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("pytest", "tests")]


def _run_without(modules: tuple[str, ...], script: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = (f"import runpy, sys\nfor m in {modules!r}: sys.modules[m] = None\n"
            f"sys.argv = [{script!r}, *{list(args)!r}]\nrunpy.run_path({str(BENCH / script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_scripts_start_without_pytest(script: str) -> None:
    r = _run_without(("pytest",), script, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def test_dkim_bench_says_how_to_get_pynacl() -> None:
    r = _run_without(("pytest", "nacl", "nacl.signing"), "dkim_sign.py", "-n", "1")
    assert r.returncode == 2, r.stderr
    assert "make bench-dkim" in r.stderr
