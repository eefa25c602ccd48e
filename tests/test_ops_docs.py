"""Checks for the operations docs: alert rules, their unit tests, runbooks and the Grafana dashboard.

- ``promtool check rules`` / ``promtool test rules`` pass (promtool is installed with apt when
  missing and we are root, otherwise these tests skip);
- every alert has a runbook, every runbook an alert, every ``runbook_url`` an existing file;
- every alert has a firing and a non-firing case in ``docs/alerts.test.yml``;
- every metric (and every label in a selector) used in the rules and in the dashboard exists in
  the real registry built by :mod:`mailrelayd.metrics`;
- the dashboard loads, has the required variables and every panel has a target.

PyYAML is not a dependency, so the YAML files are read with a small strict loader for the subset
they use (block mappings/sequences, quoted and plain scalars, ``|``/``>`` block scalars, ``[]``).
It raises on anything else, and its result is cross-checked against promtool's rule count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ALERTS = DOCS / "alerts.yml"
ALERT_TESTS = DOCS / "alerts.test.yml"
RUNBOOKS = DOCS / "runbooks"
DASHBOARD = DOCS / "grafana-dashboard.json"
RUNBOOK_URL_PREFIX = "https://github.com/mailrelayd/mailrelayd/blob/main/docs/runbooks/"


# --------------------------------------------------------------------------------------------
# Minimal YAML subset loader
# --------------------------------------------------------------------------------------------
class YamlSubsetError(ValueError):
    pass


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_insignificant(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _strip_comment(value: str) -> str:
    """Remove a trailing `` # comment`` from an unquoted value."""
    match = re.search(r"\s#", value)
    return value[: match.start()].rstrip() if match else value.rstrip()


def _scalar(raw: str, lineno: int) -> Any:
    value = raw.strip()
    if value.startswith("'"):
        match = re.fullmatch(r"'((?:[^']|'')*)'\s*(#.*)?", value)
        if not match:
            raise YamlSubsetError(f"line {lineno}: bad single-quoted scalar {value!r}")
        return match.group(1).replace("''", "'")
    if value.startswith('"'):
        match = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?', value)
        if not match:
            raise YamlSubsetError(f"line {lineno}: bad double-quoted scalar {value!r}")
        return json.loads('"' + match.group(1) + '"')
    value = _strip_comment(value)
    if value == "[]":
        return []
    if value == "{}":
        return {}
    if value[:1] in "[{&*!|>@`%":
        raise YamlSubsetError(f"line {lineno}: unsupported YAML construct {value!r}")
    return value


class _Loader:
    def __init__(self, text: str) -> None:
        if "\t" in text:
            raise YamlSubsetError("tabs are not supported")
        self.lines = text.split("\n")

    def _next(self, i: int) -> int:
        while i < len(self.lines) and _is_insignificant(self.lines[i]):
            i += 1
        return i

    def load(self) -> Any:
        i = self._next(0)
        if i == len(self.lines):
            return None
        value, i = self._node(i, _indent(self.lines[i]))
        i = self._next(i)
        if i != len(self.lines):
            raise YamlSubsetError(f"line {i + 1}: unexpected content {self.lines[i]!r}")
        return value

    def _node(self, i: int, indent: int) -> tuple[Any, int]:
        content = self.lines[i].strip()
        if content == "-" or content.startswith("- "):
            return self._seq(i, indent)
        return self._map(i, indent)

    def _seq(self, i: int, indent: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        while True:
            i = self._next(i)
            if i == len(self.lines) or _indent(self.lines[i]) != indent:
                break
            line = self.lines[i]
            content = line.strip()
            if not (content == "-" or content.startswith("- ")):
                break
            rest = content[1:].lstrip()
            if not rest:
                j = self._next(i + 1)
                if j == len(self.lines) or _indent(self.lines[j]) <= indent:
                    items.append(None)
                    i += 1
                    continue
                value, i = self._node(j, _indent(self.lines[j]))
            elif re.match(r"[^'\"\s][^:]*:(\s|$)", rest):
                # "- key: value" starts a mapping whose keys are aligned with "key".
                column = indent + (len(content) - len(rest))
                self.lines[i] = " " * column + rest
                value, i = self._map(i, column)
            else:
                value = _scalar(rest, i + 1)
                i += 1
            items.append(value)
        return items, i

    def _map(self, i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        while True:
            i = self._next(i)
            if i == len(self.lines):
                break
            line = self.lines[i]
            current = _indent(line)
            if current < indent:
                break
            if current > indent:
                raise YamlSubsetError(f"line {i + 1}: unexpected indentation {line!r}")
            content = line.strip()
            if content.startswith("- "):
                break
            match = re.fullmatch(r"([A-Za-z_][\w.-]*):(?:\s+(.*))?", content)
            if not match:
                raise YamlSubsetError(f"line {i + 1}: expected 'key: value', got {content!r}")
            key, raw = match.group(1), (match.group(2) or "")
            if key in result:
                raise YamlSubsetError(f"line {i + 1}: duplicate key {key!r}")
            raw_value = _strip_comment(raw) if not raw.lstrip().startswith(("'", '"')) else raw
            if raw_value in ("|", "|-", ">", ">-"):
                result[key], i = self._block_scalar(i + 1, indent, raw_value)
            elif raw_value == "":
                j = self._next(i + 1)
                if j < len(self.lines) and _indent(self.lines[j]) > indent:
                    result[key], i = self._node(j, _indent(self.lines[j]))
                elif (
                    j < len(self.lines)
                    and _indent(self.lines[j]) == indent
                    and (self.lines[j].strip().startswith("- "))
                ):
                    result[key], i = self._seq(j, indent)
                else:
                    result[key], i = None, i + 1
            else:
                result[key] = _scalar(raw, i + 1)
                i += 1
        return result, i

    def _block_scalar(self, i: int, parent_indent: int, style: str) -> tuple[str, int]:
        body: list[str] = []
        while i < len(self.lines) and (not self.lines[i].strip() or _indent(self.lines[i]) > parent_indent):
            body.append(self.lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        if not body:
            return "", i
        block_indent = _indent(body[0])
        if any(line.strip() and _indent(line) < block_indent for line in body):
            raise YamlSubsetError(f"line {i}: block scalar less indented than its first line")
        lines = [line[block_indent:] for line in body]
        if style.startswith("|"):
            text = "\n".join(lines)
        else:
            paragraphs: list[str] = []
            current: list[str] = []
            for line in lines:
                if line.strip():
                    current.append(line.strip())
                else:
                    paragraphs.append(" ".join(current))
                    current = []
            paragraphs.append(" ".join(current))
            text = "\n".join(paragraphs)
        return (text if style.endswith("-") else text + "\n"), i


def load_yaml(path: Path) -> Any:
    return _Loader(path.read_text()).load()


def test_yaml_subset_loader() -> None:
    text = (
        "# comment\n"
        "a: 1\n"
        "b: 'it''s # not a comment'\n"
        'c: "x\\"y"  # trailing\n'
        "d:\n"
        "  - e: f\n"
        "    g: []\n"
        "  - plain\n"
        "h: |\n"
        "  line1\n"
        "    indented\n"
        "i: >-\n"
        "  folded\n"
        "  text\n"
        "j:\n"
        "- same-indent item\n"
    )
    assert _Loader(text).load() == {
        "a": "1",
        "b": "it's # not a comment",
        "c": 'x"y',
        "d": [{"e": "f", "g": []}, "plain"],
        "h": "line1\n  indented\n",
        "i": "folded text",
        "j": ["same-indent item"],
    }
    for bad in ("a: 1\n   b: 2\n", "a: {x: 1}\n", "a: 1\na: 2\n", "a: |\n    x\n  y\n"):
        with pytest.raises(YamlSubsetError):
            _Loader(bad).load()


# --------------------------------------------------------------------------------------------
# Parsed documents
# --------------------------------------------------------------------------------------------
@cache
def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules, "no rules parsed from docs/alerts.yml"
    return rules


def alert_names() -> set[str]:
    return {rule["alert"] for rule in alert_rules()}


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels of collapsed rows
    return panels


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every target, annotation and query variable of the dashboard."""
    exprs = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for annotation in dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            exprs.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]\w*)\s*\)", query.strip())
            assert match, f"variable {variable['name']}: unsupported query {query!r}"
            exprs.append((f"variable {variable['name']!r}", match.group(1)))
    return exprs


# --------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------
@cache
def _promtool() -> str | None:
    """Path of promtool; installs Debian's "prometheus" package when missing and we are root."""
    found = shutil.which("promtool")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:  # package lists may be missing in a fresh container
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    return shutil.which("promtool")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = _promtool()
    if path is None:
        reason = (
            "could not install it with apt-get (Debian package 'prometheus')"
            if os.geteuid() == 0
            else "not root, so not installing it; run `apt-get install -y prometheus` (Debian) "
            "or put promtool from a Prometheus release on PATH"
        )
        pytest.skip(f"promtool not found and {reason}")
    return path


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Cross-check the YAML loader used by the other tests against Prometheus' own parser.
    match = re.search(r"SUCCESS: (\d+) rules found", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert int(match.group(1)) == len(alert_rules())


def test_promtool_unit_tests(promtool: str) -> None:
    result = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_dashboard_expressions_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Feed every dashboard expression to promtool as a recording rule (Grafana variables replaced)."""
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$instance": ".*",
        "$listener": ".*",
        "$sender_domain": ".*",
    }
    rules = []
    places = dashboard_expressions()
    for n, (where, expr) in enumerate(places):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expr_{n}", "expr": expr})
    rules_file = tmp_path / "dashboard.rules.json"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    failing = sorted({int(n) for n in re.findall(r"dashboard:expr_(\d+)", output)})
    assert result.returncode == 0, output + "".join(f"\nexpr_{n} is {places[n][0]}" for n in failing)


# --------------------------------------------------------------------------------------------
# Rules, tests, runbooks
# --------------------------------------------------------------------------------------------
def test_every_rule_has_severity_annotations_and_runbook() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Mailrelayd[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook_url"}, name
        assert "{{" in annotations["description"], f"{name}: description should show templated values"
        assert annotations["runbook_url"] == f"{RUNBOOK_URL_PREFIX}{name}.md", name


def test_runbook_urls_point_at_existing_files() -> None:
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL_PREFIX), url
        assert (RUNBOOKS / url.removeprefix(RUNBOOK_URL_PREFIX)).is_file(), url


def test_alerts_and_runbooks_match_one_to_one() -> None:
    runbooks = {path.stem for path in RUNBOOKS.glob("*.md") if path.name != "README.md"}
    assert sorted(alert_names() - runbooks) == [], "alerts without a runbook"
    assert sorted(runbooks - alert_names()) == [], "runbooks without an alert"


def test_runbooks_have_the_required_sections() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    for name in alert_names():
        text = (RUNBOOKS / f"{name}.md").read_text()
        assert text.startswith(f"# {name}\n"), name
        for heading in ("## What it means", "## Impact", "## First three checks", "## Fix", "## Escalate"):
            assert heading in text, f"{name}: missing {heading!r}"
        assert "```" in text, f"{name}: no exact commands"
        assert f"]({name}.md)" in index, f"runbooks/README.md does not link {name}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = load_yaml(ALERT_TESTS)
    assert doc["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    severities: set[tuple[str, str]] = set()
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            (fires if expected else quiet).add(case["alertname"])
            severities.update((case["alertname"], alert["exp_labels"]["severity"]) for alert in expected)
    assert sorted(alert_names() - fires) == [], "alerts never shown to fire"
    assert sorted(alert_names() - quiet) == [], "alerts never shown to stay quiet"
    rule_severities = {(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules()}
    assert sorted(rule_severities - severities) == [], "rules (alert, severity) never shown to fire"


# --------------------------------------------------------------------------------------------
# Metric names and labels against the real registry
# --------------------------------------------------------------------------------------------
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
_TARGET_LABELS = {"job", "instance"}
_ALLOWED_WITHOUT_REGISTRY = {"up": _TARGET_LABELS, "time": set()}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "bool", "inf", "nan", "atan2"}  # fmt: skip


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Sample name -> allowed label names, for everything the daemon's registry exposes."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import mailrelayd.metrics as metrics

    labelnames = {
        obj._name: set(obj._labelnames) for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)
    }
    series: dict[str, frozenset[str]] = {}
    for family in REGISTRY.collect():
        labels = labelnames.get(family.name, set()) | {k for s in family.samples for k in s.labels}
        labels |= _TARGET_LABELS
        for suffix in _SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else {"quantile"} if family.type == "summary" else set()
            series[family.name + suffix] = frozenset(labels | extra)
        for sample in family.samples:
            series.setdefault(sample.name, frozenset(labels | set(sample.labels)))
    assert "mailrelayd_sent_recipients_total" in series, "mailrelayd.metrics did not register its metrics"
    return {**series, **{k: frozenset(v) for k, v in _ALLOWED_WITHOUT_REGISTRY.items()}}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def promql_selectors(expr: str) -> tuple[set[str], list[tuple[str, set[str]]]]:
    """Metric names used in ``expr``, and (metric, label names) for every ``metric{...}`` selector."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\$\{?\w+(?::\w+)?\}?", "", text)  # Grafana variables
    selectors = [
        (m.group(1), set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2))))
        for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", text)
    ]
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue  # function call or keyword
        names.add(name)
    return names, selectors


def test_promql_selector_parser() -> None:
    names, selectors = promql_selectors(
        'histogram_quantile(0.99, sum by (le, listener) (rate(a_bucket{listener=~"$listener", x="}"}[5m])))'
        " / ignoring (class) group_left sum(rate(b_total[$__rate_interval] offset 1h)) by (listener)"
        " > 1e3 and on (instance) up == bool 0 unless time() - c"
    )
    assert names == {"a_bucket", "b_total", "up", "c"}
    assert selectors == [("a_bucket", {"listener", "x"})]


def _unknown_metrics_and_labels(where: str, expr: str) -> list[str]:
    exported = exported_series()
    names, selectors = promql_selectors(expr)
    problems = [f"{where}: unknown metric {name!r}" for name in sorted(names - exported.keys())]
    for name, labels in selectors:
        if name in exported and labels - exported[name]:
            problems.append(f"{where}: {name} has no label(s) {sorted(labels - exported[name])}")
    return problems


def test_unknown_metric_is_detected() -> None:
    assert _unknown_metrics_and_labels("x", 'rate(mailrelayd_sent_recipients_total{sender_domian="a"}[5m])')
    assert _unknown_metrics_and_labels("x", "mailrelayd_queue_depth > 1")
    assert _unknown_metrics_and_labels("x", "mailrelayd_spool_write_errors > 1")  # counter without _total
    assert not _unknown_metrics_and_labels("x", 'mailrelayd_build_info{version="1", instance="a"}')


def test_alert_rules_use_only_exported_metrics_and_labels() -> None:
    problems = []
    for rule in alert_rules():
        problems += _unknown_metrics_and_labels(f"alert {rule['alert']}", rule["expr"])
    assert problems == []


def test_dashboard_uses_only_exported_metrics_and_labels() -> None:
    problems = []
    for where, expr in dashboard_expressions():
        problems += _unknown_metrics_and_labels(where, expr)
    assert problems == []


# --------------------------------------------------------------------------------------------
# Dashboard structure
# --------------------------------------------------------------------------------------------
def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 38
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("sender_domain", "listener"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}", name
    exprs = [expr for _, expr in dashboard_expressions()]
    assert any("$sender_domain" in e for e in exprs) and any("$listener" in e for e in exprs)

    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), title
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        targets = panel.get("targets", [])
        assert targets, f"panel {title!r} has no target"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {title!r} has an empty target"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title
