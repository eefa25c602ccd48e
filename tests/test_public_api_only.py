"""Public library APIs only (guide, issue 11): no ``obj._private`` of asyncio, uvloop, aiosmtpd,
aiosmtplib or any other library anywhere in the package, no private module of another package
(``import a._b``, ``from a._b.c import d``, ``from a import _b``), and neither aiosmtpd nor
aiosmtplib on the runtime path.

An AST scan rather than a grep: it sees ``x._attr`` and ``getattr(x, "_attr")`` (the way such
accesses hide) and ignores comments and strings. Private attributes of our own classes are fine;
they are recognised as names the package itself assigns (``self._name = ...``), except for names
known from the libraries' internals, which are flagged wherever they appear.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mailrelayd"
PRIVATE = re.compile(r"_[a-z]")
# Internals of asyncio / uvloop / aiosmtpd / aiosmtplib / aiohttp that code has reached for before.
LIBRARY_INTERNALS = {
    "_buffer", "_limit", "_drain_helper", "_command_lock", "_reader", "_writer", "_transport", "_protocol",
    "_server", "_loop", "_waiter", "_paused", "_sock", "_ssl_protocol", "_app_protocol", "_tls_protocol",
    "_sslobj", "_extra", "_handler_coroutine", "_timeout_handle", "_sites", "_runner",
}
# Files exempt while another branch removes their private accesses (none since outbound-tls merged).
PENDING_ELSEWHERE: set[str] = set()
STRICT = ("smtp/", "intake.py")  # the inbound path: no private access on anything but self/cls


def _files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _own_private_names() -> set[str]:
    names: set[str] = set()
    for p in _files():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) \
                    and n.value.id in ("self", "cls") and PRIVATE.match(n.attr):
                names.add(n.attr)
            elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and PRIVATE.match(n.name):
                names.add(n.name)
    return names - LIBRARY_INTERNALS


def _violations(path: Path, own: set[str], strict: bool) -> list[str]:
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(n, ast.Attribute) and PRIVATE.match(n.attr):
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue
            name = n.attr
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) \
                and n.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(n.args) >= 2 \
                and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str) \
                and PRIVATE.match(n.args[1].value):
            name = n.args[1].value
        if name is not None and (strict or name not in own):
            out.append(f"{path.name}:{n.lineno}: {ast.unparse(n)[:80]}")
    return out


def _private_imports(path: Path) -> list[str]:
    """Imports of a private module (or private name) of a package other than mailrelayd: a dotted
    component after the first that starts with ``_``. Relative imports are our own."""
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            modules = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            modules = [n.module, *(f"{n.module}.{a.name}" for a in n.names)]
        else:
            continue
        if any(m.split(".")[0] != "mailrelayd" and any(PRIVATE.match(c) for c in m.split(".")[1:]) for m in modules):
            out.append(f"{path.name}:{n.lineno}: {ast.unparse(n)[:80]}")
    return out


def test_no_private_modules_of_libraries() -> None:
    """What a library's ``__init__`` re-exports is its API; its ``_modules`` are not (if the API
    cannot do what we need, we own that piece, as feedback/legacy.py owns the bounce formats)."""
    bad: list[str] = []
    for p in _files():
        if p.relative_to(PKG).as_posix() not in PENDING_ELSEWHERE:
            bad += _private_imports(p)
    assert bad == [], "private modules imported:\n" + "\n".join(bad)


def test_no_private_attributes_of_libraries() -> None:
    own = _own_private_names()
    bad: list[str] = []
    for p in _files():
        rel = p.relative_to(PKG).as_posix()
        if rel in PENDING_ELSEWHERE:
            continue
        bad += _violations(p, own, strict=rel.startswith(STRICT))
    assert bad == [], "private attributes used:\n" + "\n".join(bad)


def test_the_scan_catches_what_it_is_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(self, reader, proto, store):\n    reader._buffer.clear()\n"
                      "    getattr(proto, '_drain_helper')\n    self._mine = 1\n    store._mine\n")
    assert len(_violations(sample, {"_mine"}, strict=False)) == 2
    assert len(_violations(sample, {"_mine"}, strict=True)) == 3
    imports = tmp_path / "imports.py"
    imports.write_text(
        "from __future__ import annotations\nimport email.utils\nimport flufl.bounce._detectors\n"
        "from flufl.bounce._detectors import exim\nfrom flufl.bounce._detectors.exim import Exim\n"
        "from flufl.bounce import _scan\nfrom flufl.bounce import all_failures\n"
        "import mailrelayd.feedback._x\nfrom mailrelayd._y import z\nfrom . import _own\nfrom ._own import w\n"
        "def f():\n    import os._private as p\n")
    assert [v.split(":")[1] for v in _private_imports(imports)] == ["3", "4", "5", "6", "13"]


def test_the_daemon_imports_neither_aiosmtpd_nor_aiosmtplib() -> None:
    """Inbound and outbound SMTP are our own (docs/operations.md says why); both libraries serve the
    tests (and aiosmtpd the README's debugging sink)."""
    for p in _files():
        for n in ast.walk(ast.parse(p.read_text())):
            mods = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            for lib in ("aiosmtpd", "aiosmtplib"):
                assert not any(m.split(".")[0] == lib for m in mods), f"{p.relative_to(PKG)} imports {lib}"
