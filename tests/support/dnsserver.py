"""A real DNS responder on loopback for tests (UDP and TCP), built on dnspython's message API.

Usage::

    with DnsServer() as dns_srv:               # binds 127.0.0.1 on an ephemeral port
        dns_srv.add("example.com.", "MX", "10 mx1.example.com.", ttl=300)
        dns_srv.add("mx1.example.com.", "A", "127.0.0.1")
        dns_srv.add("s1._domainkey.example.com.", "TXT", '"v=DKIM1; k=rsa; p=..."')
        dns_srv.set_rcode("broken.example.", dns.rcode.SERVFAIL)
        dns_srv.set_timeout("slow.example.")    # never answers
        dns_srv.add("_25._tcp.mx1.example.com.", "TLSA", "3 1 1 <sha256 hex>")
        dns_srv.set_ad(True)                    # answers claim "DNSSEC-validated" (AD bit)
        nameserver = f"127.0.0.1:{dns_srv.port}"

Names not in the zone answer NXDOMAIN; names that exist with other types answer NOERROR/NODATA.
Every query is recorded in ``dns_srv.queries`` as (qname, qtype). Runs in a background thread so it
serves both asyncio tests and subprocess daemons.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
from collections import defaultdict

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._records: dict[dns.name.Name, dict[int, list[tuple[int, str]]]] = defaultdict(dict)
        self._rcodes: dict[dns.name.Name, int] = {}
        self._timeouts: set[dns.name.Name] = set()
        self._ad_all = False
        self._ad_names: set[dns.name.Name] = set()
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.TCPServer | None = None
        self.port = 0

    # --- zone editing -------------------------------------------------------------------
    def add(self, name: str, rtype: str, value: str, ttl: int = 300) -> None:
        """Add one record; ``value`` is in zone-file presentation format."""
        qname = dns.name.from_text(name)
        with self._lock:
            self._records[qname].setdefault(dns.rdatatype.from_text(rtype), []).append((ttl, value))

    def remove(self, name: str, rtype: str | None = None) -> None:
        qname = dns.name.from_text(name)
        with self._lock:
            if rtype is None:
                self._records.pop(qname, None)
            else:
                self._records.get(qname, {}).pop(dns.rdatatype.from_text(rtype), None)

    def set_rcode(self, name: str, rcode: int | None) -> None:
        """Answer every query for ``name`` with ``rcode`` (e.g. SERVFAIL); None clears it."""
        qname = dns.name.from_text(name)
        with self._lock:
            if rcode is None:
                self._rcodes.pop(qname, None)
            else:
                self._rcodes[qname] = rcode

    def set_timeout(self, name: str, on: bool = True) -> None:
        """Never answer queries for ``name`` (simulates a resolver timeout)."""
        qname = dns.name.from_text(name)
        with self._lock:
            (self._timeouts.add if on else self._timeouts.discard)(qname)

    def set_ad(self, on: bool = True, name: str | None = None) -> None:
        """Set the AD bit (RFC 4035 §3.2.3) on answers, as a validating resolver does for secure data:
        for every name, or only ``name``. Only queries with the DO or AD bit get it (RFC 6840 §5.7)."""
        with self._lock:
            if name is None:
                self._ad_all = on
            else:
                (self._ad_names.add if on else self._ad_names.discard)(dns.name.from_text(name))

    def query_count(self, name: str, rtype: str | None = None) -> int:
        name = name.rstrip(".").lower() + "."
        return sum(1 for n, t in self.queries if n == name and (rtype is None or t == rtype))

    # --- serving ------------------------------------------------------------------------
    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        with self._lock:
            self.queries.append((q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype)))
            wants_ad = bool(query.ednsflags & dns.flags.DO) or bool(query.flags & dns.flags.AD)
            if wants_ad and (self._ad_all or q.name in self._ad_names):
                response.flags |= dns.flags.AD
            if q.name in self._timeouts:
                return None
            if q.name in self._rcodes:
                response.set_rcode(self._rcodes[q.name])
                return response.to_wire()
            types = self._records.get(q.name)
            if types is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                return response.to_wire()
            entries = list(types.get(q.rdtype, []))
            cname = types.get(dns.rdatatype.CNAME)
        if not entries and cname and q.rdtype != dns.rdatatype.CNAME:
            # Follow one level of CNAME within our zone, as an authoritative server would.
            rrset = dns.rrset.from_text(q.name, cname[0][0], "IN", "CNAME", cname[0][1])
            response.answer.append(rrset)
            target = dns.name.from_text(cname[0][1])
            with self._lock:
                entries = list(self._records.get(target, {}).get(q.rdtype, []))
            if entries:
                response.answer.append(
                    dns.rrset.from_text_list(target, min(t for t, _ in entries), "IN",
                                             dns.rdatatype.to_text(q.rdtype), [v for _, v in entries])
                )
            return response.to_wire()
        if entries:
            ttl = min(t for t, _ in entries)
            response.answer.append(
                dns.rrset.from_text_list(q.name, ttl, "IN", dns.rdatatype.to_text(q.rdtype), [v for _, v in entries])
            )
        return response.to_wire()

    def start(self) -> DnsServer:
        server = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server.answer(data)
                if reply is not None:
                    if len(reply) > 512:
                        # Truncate so the client retries over TCP (RFC 1035 §4.2.1).
                        q = dns.message.from_wire(data)
                        r = dns.message.make_response(q)
                        r.flags |= dns.flags.TC
                        reply = r.to_wire()
                    sock.sendto(reply, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                with contextlib.suppress(OSError):
                    head = conn.recv(2)
                    if len(head) < 2:
                        return
                    (length,) = struct.unpack("!H", head)
                    data = b""
                    while len(data) < length:
                        chunk = conn.recv(length - len(data))
                        if not chunk:
                            return
                        data += chunk
                    reply = server.answer(data)
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)

        class UDP(socketserver.ThreadingUDPServer):
            daemon_threads = True
            allow_reuse_address = True

        class TCP(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        # Bind UDP on an ephemeral port, then TCP on the same number (retry on the rare clash).
        for _ in range(20):
            udp = UDP((self.host, 0), UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = TCP((self.host, port), TCPHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("could not bind a DNS test server")
        self._udp, self._tcp, self.port = udp, tcp, port
        for srv in (udp, tcp):
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def nameserver(self) -> str:
        """``host:port`` as the ``[dns] nameservers`` config key takes it."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
