"""Score mailrelayd.feedback.parse_feedback against the feedback corpus.

    python bench/feedback_accuracy.py --corpus ../shared/corpus/feedback [--json] [--verbose] [--ablation]

The corpus (see its README.md) has one manifest row per expected recipient. A row is right when:

* hard_bounce / complaint / soft_bounce with a recipient: the parser reports that recipient
  (case-insensitively) with that kind. The corpus's ``soft_bounce`` means "record, do not
  suppress"; the parser splits that into ``soft_bounce`` (about the recipient), ``delayed``
  (a delay warning), ``reputation`` and ``policy`` (about the sender), and each of them is
  right for a soft_bounce row (the confusion table shows the split);
* a row without a recipient (two redacted complaints, every not_feedback row): the parser gives
  the file that kind (``unparsable`` also counts for not_feedback) and suppresses nobody.

A **false suppression** (the costly error) is a soft_bounce row whose recipient is suppressed
(reported as hard_bounce or complaint), or whose file suppresses an address that is none of
that file's expected hard/complaint recipients, or a not_feedback row whose file suppresses
anyone. Targets (issue 12): >= 98 % of hard_bounce + complaint rows right, no soft_bounce or
not_feedback row falsely suppressing; 1,000 mixed messages parsed in < 2 s.

Also reported: a confusion table (expected kind x predicted kind, "missed" when the expected
recipient is not in the report at all), which part of the parser decided each right row, and
parse speed (the whole corpus, then 1,000 messages cycled from it; wall clock and CPU time of
the process, since the wall clock on a loaded machine measures the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailrelayd.feedback.parse import (
    DEFAULT_OPTIONS,
    SUPPRESSING_KINDS,
    FeedbackReport,
    ParseOptions,
    parse_feedback,
)

KINDS = ("hard_bounce", "soft_bounce", "complaint", "not_feedback")
PREDICTED = ("hard_bounce", "soft_bounce", "delayed", "reputation", "policy", "complaint", "not_feedback",
             "unparsable", "missed")
# Parser kinds that are right for a corpus soft_bounce row: recorded, never suppressing.
SOFT_EQUIVALENT = frozenset({"soft_bounce", "delayed", "reputation", "policy"})
DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "feedback"


@dataclass(frozen=True)
class Row:
    """One manifest row."""

    file: str
    kind: str
    recipient: str
    status: str
    reason: str


@dataclass
class Score:
    """Result of scoring one corpus with one set of options."""

    rows: int = 0
    right: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    confusion: dict[str, Counter[str]] = field(default_factory=dict)
    false_suppressions: list[dict[str, str]] = field(default_factory=list)
    wrong: list[dict[str, str]] = field(default_factory=list)
    right_by_parser: Counter[str] = field(default_factory=Counter)
    files: int = 0
    parse_seconds: float = 0.0

    def share(self, *kinds: str) -> float:
        """Share of right rows over the given kinds."""
        total = sum(self.total[k] for k in kinds)
        return sum(self.right[k] for k in kinds) / total if total else 0.0

    @property
    def suppress_recall(self) -> float:
        """Share of hard_bounce + complaint rows right (target >= 0.98)."""
        return self.share("hard_bounce", "complaint")

    @property
    def false_suppression_rate(self) -> float:
        """False suppressions over soft_bounce + not_feedback rows (target: none)."""
        total = self.total["soft_bounce"] + self.total["not_feedback"]
        return len(self.false_suppressions) / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary."""
        return {
            "rows": self.rows,
            "files": self.files,
            "overall": self.share(*KINDS),
            "per_kind": {
                k: {"right": self.right[k], "total": self.total[k], "share": self.share(k)} for k in KINDS
            },
            "suppress_recall": self.suppress_recall,
            "false_suppression_rate": self.false_suppression_rate,
            "false_suppressions": self.false_suppressions,
            "confusion": {k: dict(v) for k, v in self.confusion.items()},
            "right_by_parser": dict(self.right_by_parser),
            "parse_seconds": self.parse_seconds,
            "wrong": self.wrong,
        }


def load_manifest(corpus: Path) -> list[Row]:
    """Rows of ``manifest.csv``."""
    with (corpus / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return [
            Row(r["file"], r["kind"], r["recipient"].strip().lower(), r["status"], r["reason"])
            for r in csv.DictReader(fh)
        ]


def parse_corpus(
    corpus: Path, files: list[str], options: ParseOptions
) -> tuple[dict[str, FeedbackReport], float]:
    """Parse every file once; returns the reports and the total parse time (seconds)."""
    reports: dict[str, FeedbackReport] = {}
    elapsed = 0.0
    for name in files:
        raw = (corpus / name).read_bytes()
        start = time.perf_counter()
        reports[name] = parse_feedback(raw, options=options)
        elapsed += time.perf_counter() - start
    return reports, elapsed


def score_corpus(corpus: Path, options: ParseOptions = DEFAULT_OPTIONS) -> Score:
    """Parse and score the whole corpus."""
    rows = load_manifest(corpus)
    files = sorted({row.file for row in rows})
    reports, elapsed = parse_corpus(corpus, files, options)
    expected_suppressed: dict[str, set[str]] = {}
    for row in rows:
        if row.kind in SUPPRESSING_KINDS and row.recipient:
            expected_suppressed.setdefault(row.file, set()).add(row.recipient)

    score = Score(rows=len(rows), files=len(files), parse_seconds=elapsed)
    score.confusion = {k: Counter() for k in KINDS}
    for row in rows:
        report = reports[row.file]
        by_address = {r.address.lower(): r for r in report.recipients}
        suppressed = {r.address.lower() for r in report.suppressions}
        score.total[row.kind] += 1
        if row.recipient:
            found = by_address.get(row.recipient)
            predicted = found.kind if found else "missed"
            right = found is not None and (
                found.kind == row.kind or (row.kind == "soft_bounce" and found.kind in SOFT_EQUIVALENT)
            )
        else:
            predicted = report.kind
            ok_kinds = {row.kind, "unparsable"} if row.kind == "not_feedback" else {row.kind}
            right = report.kind in ok_kinds and not suppressed
        score.confusion[row.kind][predicted] += 1
        if right:
            score.right[row.kind] += 1
            score.right_by_parser[report.parser.split(":")[0]] += 1
        else:
            score.wrong.append(
                {
                    "file": row.file,
                    "expected": row.kind,
                    "recipient": row.recipient,
                    "reason": row.reason,
                    "predicted": predicted,
                    "report_kind": report.kind,
                    "parser": report.parser,
                    "got": ", ".join(f"{r.address}:{r.kind}:{r.reason}" for r in report.recipients),
                }
            )
        if row.kind == "soft_bounce":
            unexpected = suppressed - expected_suppressed.get(row.file, set())
            if row.recipient in suppressed or unexpected:
                score.false_suppressions.append(
                    {
                        "file": row.file,
                        "expected": row.kind,
                        "recipient": row.recipient,
                        "suppressed": ", ".join(sorted(suppressed)),
                    }
                )
        elif row.kind == "not_feedback" and suppressed:
            score.false_suppressions.append(
                {
                    "file": row.file,
                    "expected": row.kind,
                    "recipient": row.recipient,
                    "suppressed": ", ".join(sorted(suppressed)),
                }
            )
    return score


def throughput(corpus: Path, count: int = 1000) -> tuple[float, int, float]:
    """(wall seconds, count, CPU seconds) to parse ``count`` messages cycled from the corpus
    (files read beforehand)."""
    files = sorted({row.file for row in load_manifest(corpus)})
    blobs = [(corpus / name).read_bytes() for name in files]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        parse_feedback(blobs[i % len(blobs)])
    return time.perf_counter() - start, count, time.process_time() - cpu


ABLATIONS = {
    "all": DEFAULT_OPTIONS,
    "no standard (RFC 3464/5965/JMRP/MDN)": ParseOptions(standard=False),
    "no legacy formats": ParseOptions(legacy=False),
    "no heuristics": ParseOptions(heuristics=False),
    "standard only": ParseOptions(legacy=False, heuristics=False),
    "legacy formats only": ParseOptions(standard=False, heuristics=False),
    "heuristics only": ParseOptions(standard=False, legacy=False),
}


def _print_score(score: Score, verbose: bool) -> None:
    print(f"rows {score.rows}, files {score.files}")
    print(f"overall right: {score.share(*KINDS):.1%}")
    for kind in KINDS:
        print(f"  {kind:<13} {score.right[kind]:>4}/{score.total[kind]:<4} {score.share(kind):.1%}")
    print(f"hard_bounce+complaint right (target >= 98%): {score.suppress_recall:.1%}")
    print(
        f"false suppressions (target 0 of soft+not_feedback rows): {len(score.false_suppressions)} "
        f"= {score.false_suppression_rate:.2%}"
    )
    for fs in score.false_suppressions:
        print(
            f"  FALSE SUPPRESSION {fs['file']} expected {fs['expected']} {fs['recipient']}"
            f" -> {fs['suppressed']}"
        )
    print("\nconfusion (rows: expected, columns: predicted)")
    print(" " * 14 + "".join(f"{p[:12]:>13}" for p in PREDICTED))
    for kind in KINDS:
        print(f"{kind:<14}" + "".join(f"{score.confusion[kind][p]:>13}" for p in PREDICTED))
    print(
        "\nright rows by deciding parser: "
        + ", ".join(f"{k} {v}" for k, v in score.right_by_parser.most_common())
    )
    print(
        f"\nparse time: {score.parse_seconds:.3f} s for {score.files} files "
        f"({1000 * score.parse_seconds / max(score.files, 1):.2f} ms/message)"
    )
    if verbose:
        print("\nwrong rows:")
        for w in score.wrong:
            print(
                f"  {w['file']}: expected {w['expected']} {w['recipient']} ({w['reason']}) "
                f"predicted {w['predicted']} [{w['parser']}] got {w['got']}"
            )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; always exits 0 (it measures, it does not gate)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--verbose", action="store_true", help="list every wrong row")
    parser.add_argument(
        "--ablation", action="store_true", help="also score with parts of the parser disabled"
    )
    parser.add_argument("--count", type=int, default=1000, help="messages for the throughput run")
    args = parser.parse_args(argv)
    if not (args.corpus / "manifest.csv").is_file():
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 0
    score = score_corpus(args.corpus)
    seconds, count, cpu_seconds = throughput(args.corpus, args.count)
    ablation = {}
    if args.ablation:
        for name, options in ABLATIONS.items():
            s = score if name == "all" else score_corpus(args.corpus, options)
            ablation[name] = {
                "overall": s.share(*KINDS),
                "hard_complaint": s.suppress_recall,
                "soft": s.share("soft_bounce"),
                "not_feedback": s.share("not_feedback"),
                "false_suppressions": len(s.false_suppressions),
            }
    if args.json:
        doc = score.as_dict()
        doc["throughput"] = {"messages": count, "seconds": seconds, "cpu_seconds": cpu_seconds,
                             "ms_per_message": 1000 * seconds / count}
        if ablation:
            doc["ablation"] = ablation
        if not args.verbose:
            doc.pop("wrong")
        print(json.dumps(doc, indent=2, default=lambda o: asdict(o)))
        return 0
    _print_score(score, args.verbose)
    print(f"throughput: {count} messages in {seconds:.3f} s wall, {cpu_seconds:.3f} s CPU "
          f"({1000 * seconds / count:.2f} ms/message)")
    if ablation:
        print("\nablation (share right; false suppressions)")
        print(f"{'':<40}{'overall':>9}{'hard+cmp':>10}{'soft':>8}{'not_fb':>8}{'false':>7}")
        for name, a in ablation.items():
            print(
                f"{name:<40}{a['overall']:>9.1%}{a['hard_complaint']:>10.1%}{a['soft']:>8.1%}"
                f"{a['not_feedback']:>8.1%}{a['false_suppressions']:>7}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
