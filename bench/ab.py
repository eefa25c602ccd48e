#!/usr/bin/env python3
"""Interleaved A/B of two revisions of the daemon, for changes smaller than this machine's noise.

On a shared VM the same code accepts 380/s in one run and 580/s a minute later, so two runs one
after the other cannot show a 10-20% change. This starts both daemons side by side (bench/accept.toml,
each idle while the other is driven, one Postfix smtp-sink for both), then alternates short
``smtp-source -s 20`` runs between them, A first in even rounds and B first in odd ones, and prints
each round's rates and the daemon's CPU per message (all its threads, from /proc; not the DKIM
helper's, a separate process), then the median
of the per-round ratios B/A and in how many rounds B was faster. A real change shows in (nearly)
every round; an A/A run of the same revision gave per-round ratios of 0.79-1.06.

A and B are git revisions (checked out into temporary worktrees) or source directories. Both run
with this virtualenv's Python and libraries.

    .venv/bin/python bench/ab.py HEAD~1 HEAD [--dkim dual] [--messages 2000] [--rounds 8]

Needs Debian's postfix package (smtp-source, smtp-sink) and root for smtp-sink's -u.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SINK = "127.0.0.1:2526"  # bench/accept.toml routes "*" here


def tool(name: str) -> str:
    for d in ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/bin"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    sys.exit(f"{name} not found: apt-get install -y postfix")


def source_tree(rev: str, scratch: Path, label: str) -> Path:
    """A directory holding revision ``rev`` (a git worktree), or ``rev`` itself if it is a directory."""
    if Path(rev, "mailrelayd").is_dir():
        return Path(rev).resolve()
    tree = scratch / label
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
    return tree


class Daemon:
    def __init__(self, tree: Path, work: Path, port: int, dkim: str) -> None:
        from accept import write_config  # bench/ is sys.path[0]: the same set-up as the Postfix comparison

        work.mkdir(parents=True)
        cfg = write_config(work, port, dkim)
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "mailrelayd", "run", "-c", str(cfg), "--log-format",
                                      "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tree,
                                     env=dict(os.environ, PYTHONPATH=str(tree)))
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                if json.loads(raw).get("event") == "daemon.ready":
                    break
            except ValueError:
                continue
        else:
            sys.exit(f"the daemon from {tree} did not start")
        # Keep draining its log so that it never blocks on a full pipe.
        self.drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, every thread

    def drive(self, messages: int) -> tuple[float, float]:
        """(messages/s, CPU µs per message including the deliveries that follow)."""
        c0, t0 = self.cpu_ticks(), time.perf_counter()
        subprocess.run([tool("smtp-source"), "-s", "20", "-m", str(messages), "-l", "2048",
                        "-M", "client.bench.invalid", "-f", "sender@client.bench.invalid",
                        "-t", "rcpt@dest.bench.invalid", f"127.0.0.1:{self.port}"], check=True, capture_output=True)
        rate = messages / (time.perf_counter() - t0)
        time.sleep(0.5)  # let the deliveries finish, so that their CPU counts for this round
        hz = os.sysconf("SC_CLK_TCK")
        return rate, (self.cpu_ticks() - c0) * 1e6 / hz / messages

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.drain.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="git revision or source directory (the reference)")
    ap.add_argument("b", help="git revision or source directory (the change)")
    ap.add_argument("--dkim", choices=("off", "rsa", "ed25519", "dual"), default="off")
    ap.add_argument("--messages", type=int, default=2000, help="per run (default 2000)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--ports", default="2541,2542")
    a = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mailrelayd-ab-"))
    sink = subprocess.Popen([tool("smtp-sink"), "-u", "postfix", "-c", SINK, "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    daemons: dict[str, Daemon] = {}
    trees: list[Path] = []
    try:
        for label, rev, port in zip("AB", (a.a, a.b), map(int, a.ports.split(",")), strict=True):
            tree = source_tree(rev, scratch, label)
            trees.append(tree)
            daemons[label] = Daemon(tree, scratch / f"run-{label}", port, a.dkim)
        for d in daemons.values():
            d.drive(a.messages)  # warm-up: caches, the sink's connections, the first WAL checkpoint
        rates: list[float] = []
        costs: list[float] = []
        for r in range(a.rounds):
            res = {label: daemons[label].drive(a.messages) for label in ("AB" if r % 2 == 0 else "BA")}
            rates.append(res["B"][0] / res["A"][0])
            costs.append(res["B"][1] / res["A"][1])
            print(f"round {r}: A {res['A'][0]:.0f}/s {res['A'][1]:.0f} µs/msg   B {res['B'][0]:.0f}/s "
                  f"{res['B'][1]:.0f} µs/msg   rate B/A {rates[-1]:.3f}   CPU B/A {costs[-1]:.3f}", flush=True)
        faster = sum(x > 1 for x in rates)
        print(f"B/A (dkim={a.dkim}): median rate {statistics.median(rates):.3f} (B faster in {faster} of "
              f"{len(rates)} rounds), median CPU per message {statistics.median(costs):.3f}")
    finally:
        for d in daemons.values():
            d.stop()
        sink.terminate()
        sink.wait(10)
        for tree in trees:
            if tree.is_relative_to(scratch):
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
