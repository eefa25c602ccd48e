"""Benchmark mailrelayd.dkim against plain dkimpy.

    python bench/dkim_sign.py [-n 2000] [--dkimpy-n 200] [--threads 2] [--json]

Signs 2 KB and 100 KB messages with RSA-2048, Ed25519 and both (dual signing, RFC 8463), and with
dkimpy's own ``dkim.sign`` (same key, headers, relaxed/relaxed). Prints signatures per second and
p50/p99 latency of one ``sign()`` call (all of a message's signatures, metrics included), then the
parts of a 100 KB signature, then multi-threaded throughput (does signing release the GIL?).

Targets (issue "DKIM signing"): p99 < 2 ms for RSA-2048 at 2 KB, < 0.5 ms for Ed25519 at 2 KB.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named dkim.py: drop its directory from sys.path so `import dkim` finds dkimpy.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from dkim.canonicalization import Relaxed  # noqa: E402

from mailrelayd.dkim import (  # noqa: E402
    DkimKeySpec,
    DkimSigner,
    LoadedKey,
    generate_key,
    load_keys,
    relaxed_body,
    split_message,
    write_private_key,
)

TARGETS_P99_MS = {("rsa-2048", "2KB"): 2.0, ("ed25519", "2KB"): 0.5}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "mail", "relay", "signature",
         "header", "body", "canonical", "delivery", "queue", "spool", "domain", "selector", "message"]


def make_message(size: int, seed: int = 1) -> bytes:
    """A plausible text message of about ``size`` bytes (CRLF, some double spaces and trailing WSP)."""
    rng = random.Random(seed)
    headers = (
        b"From: Example Notifications <notify@example.com>\r\n"
        b"To: Some Customer <customer@example.org>\r\n"
        b"Subject: Your order 12345 has shipped\r\n"
        b"Date: Mon, 16 Jun 2025 10:00:00 +0000\r\n"
        b"Message-ID: <20250616100000.12345@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"List-Unsubscribe: <https://example.com/u/abcdef>, <mailto:unsubscribe@example.com>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"\r\n"
    )
    lines = []
    total = len(headers)
    while total < size:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        line = " ".join(words)
        if rng.random() < 0.05:
            line += "  "
        if rng.random() < 0.05:
            line = line.replace(" ", "  ", 1)
        encoded = line.encode() + b"\r\n"
        lines.append(encoded)
        total += len(encoded)
    return headers + b"".join(lines)


def timed(fn: Callable[[], object], n: int, warmup: int = 20) -> list[float]:
    for _ in range(min(warmup, n)):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "per_second": len(samples) / sum(samples),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "n": len(samples),
    }


async def loop_latency(signer: DkimSigner, msg: bytes, mode: str, busy: bool, n: int) -> dict[str, float]:
    """Latency of one signature as the event loop sees it: inline, or awaited from a thread pool.

    With ``busy`` another task keeps the loop thread running Python code (~1 ms slices), as
    parsing and policy for other connections do in the daemon.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def spin() -> None:
        while not stop.is_set():
            x = 0
            for i in range(20_000):
                x += i
            await asyncio.sleep(0)

    spinner = asyncio.create_task(spin()) if busy else None
    samples = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(n):
            t0 = time.perf_counter()
            if mode == "inline":
                signer.sign(msg)
            else:
                await loop.run_in_executor(pool, signer.sign, msg)
            samples.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
        stop.set()
        if spinner is not None:
            await spinner
    return summary(samples)


def dkimpy_signer(key: LoadedKey, pem: bytes, include: list[bytes]) -> Callable[[bytes], bytes]:
    """dkimpy's dkim.sign with the same key (its key file format) and headers."""
    if key.algorithm == "ed25519-sha256":
        privkey = base64.b64encode(key.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))
    else:
        privkey = pem

    def sign(msg: bytes) -> bytes:
        return dkim.sign(msg, key.selector.encode(), key.domain.encode(), privkey,
                         canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.algorithm.encode(),
                         include_headers=include)

    return sign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="sign() calls per mailrelayd scenario")
    parser.add_argument("--dkimpy-n", type=int, default=200, help="calls per dkimpy scenario (it is slow)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the throughput run")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        rsa_pem, _ = generate_key("rsa-sha256", 2048)
        ed_pem, _ = generate_key("ed25519-sha256")
        write_private_key(Path(tmp) / "rsa.key", rsa_pem)
        write_private_key(Path(tmp) / "ed.key", ed_pem)
        rsa_key, ed_key = load_keys([
            DkimKeySpec("example.com", "rsa", Path(tmp) / "rsa.key", "rsa-sha256"),
            DkimKeySpec("example.com", "ed", Path(tmp) / "ed.key", "ed25519-sha256"),
        ])

    messages = {"2KB": make_message(2048), "100KB": make_message(100 * 1024)}
    signers = {
        "rsa-2048": DkimSigner([rsa_key]),
        "ed25519": DkimSigner([ed_key]),
        "dual": DkimSigner([rsa_key, ed_key]),
    }
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
               b"list-unsubscribe", b"list-unsubscribe-post", b"from"]
    try:
        import nacl.signing  # noqa: F401  (dkimpy signs Ed25519 only with pynacl)
    except ImportError:
        print("bench/dkim_sign.py: pynacl is missing; `make bench-dkim` installs it (the bench extra: "
              "pip install -e '.[bench]')", file=sys.stderr)
        return 2
    dkimpy_signers = {
        "rsa-2048": dkimpy_signer(rsa_key, rsa_pem, include),
        "ed25519": dkimpy_signer(ed_key, ed_pem, include),
    }

    rows = []
    for size, msg in messages.items():
        for name, signer in signers.items():
            result = signer.sign(msg)
            assert result.status == "signed", result
            rows.append({"impl": "mailrelayd", "alg": name, "size": size,
                         **summary(timed(lambda s=signer, m=msg: s.sign(m), args.n))})
        for name, sign in dkimpy_signers.items():
            samples = timed(lambda s=sign, m=msg: s(m), args.dkimpy_n, warmup=3)
            rows.append({"impl": "dkimpy", "alg": name, "size": size, **summary(samples)})

    # Where the time goes for one 100 KB message.
    big = messages["100KB"]
    _, body = split_message(big)
    parts = {
        "split_message (mailrelayd)": summary(timed(lambda: split_message(big), 300)),
        "rfc822_parse (dkimpy)": summary(timed(lambda: dkim.rfc822_parse(big), 100)),
        "relaxed_body (mailrelayd)": summary(timed(lambda: relaxed_body(body), 300)),
        "Relaxed.canonicalize_body (dkimpy)": summary(timed(lambda: Relaxed.canonicalize_body(body), 100)),
        "PEM parse per call (dkimpy)": summary(timed(lambda: dkim.crypto.parse_pem_private_key(rsa_pem),
                                                     100)),
        "RSA-2048 key op (cryptography)": summary(timed(lambda: rsa_key.sign_digest(b"\x01" * 32), 500)),
        "Ed25519 key op (cryptography)": summary(timed(lambda: ed_key.sign_digest(b"\x01" * 32), 2000)),
    }

    # Throughput with several threads: more than 1x means the key operation releases the GIL.
    threaded = []
    for name in ("rsa-2048", "ed25519"):
        msg = messages["2KB"]
        signer = signers[name]
        count = args.n
        for threads in sorted({1, args.threads}):
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _i, s=signer, m=msg: s.sign(m), range(threads * 10)))  # warm up
                t0 = time.perf_counter()
                list(pool.map(lambda _i, s=signer, m=msg: s.sign(m), range(count)))
                elapsed = time.perf_counter() - t0
            threaded.append({"alg": name, "size": "2KB", "threads": threads, "per_second": count / elapsed})

    # Inline on the event loop vs a thread pool hop, with the loop idle and busy.
    loop_rows = []
    for size in ("2KB", "100KB"):
        for busy in (False, True):
            for mode in ("inline", "thread"):
                stats = asyncio.run(loop_latency(signers["rsa-2048"], messages[size], mode, busy, 300))
                loop_rows.append({"alg": "rsa-2048", "size": size, "loop": "busy" if busy else "idle",
                                  "mode": mode, **stats})

    targets = []
    for (alg, size), limit in TARGETS_P99_MS.items():
        row = next(r for r in rows if r["impl"] == "mailrelayd" and r["alg"] == alg and r["size"] == size)
        targets.append({"alg": alg, "size": size, "p99_ms": row["p99_ms"], "target_ms": limit,
                        "ok": row["p99_ms"] < limit})

    if args.json:
        print(json.dumps({"sign": rows, "parts_100KB": parts, "threads": threaded, "event_loop": loop_rows,
                          "targets": targets}, indent=2))
        return 0 if all(t["ok"] for t in targets) else 1

    print(f"{'impl':<11} {'alg':<9} {'size':>5} {'sig/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs dkimpy':>9}")
    for row in rows:
        base = next((r for r in rows if r["impl"] == "dkimpy" and r["size"] == row["size"]
                     and r["alg"] == ("rsa-2048" if row["alg"] == "dual" else row["alg"])), None)
        speedup = f"{base['p50_ms'] / row['p50_ms']:.1f}x" if base and row["impl"] != "dkimpy" else ""
        print(f"{row['impl']:<11} {row['alg']:<9} {row['size']:>5} {row['per_second']:>9.0f} "
              f"{row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {speedup:>9}")
    print("\n(dual is compared with dkimpy RSA alone)\n\nparts of one 100 KB message:")
    for name, s in parts.items():
        print(f"  {name:<36} p50 {s['p50_ms']:.3f} ms")
    print("\nthroughput by threads (2 KB):")
    for t in threaded:
        print(f"  {t['alg']:<9} {t['threads']} thread(s): {t['per_second']:.0f} messages/s")
    print("\nsign latency seen by the event loop (RSA-2048; busy = the loop thread runs Python meanwhile):")
    for r in loop_rows:
        print(f"  {r['size']:>5} loop {r['loop']:<4} {r['mode']:<6} p50 {r['p50_ms']:7.3f} ms  "
              f"p99 {r['p99_ms']:8.3f} ms")
    print("\ntargets:")
    for t in targets:
        print(f"  {t['alg']} {t['size']}: p99 {t['p99_ms']:.3f} ms < {t['target_ms']} ms: "
              f"{'OK' if t['ok'] else 'MISSED'}")
    return 0 if all(t["ok"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
