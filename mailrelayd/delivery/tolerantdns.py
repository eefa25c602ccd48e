"""DNS answers read record by record: a resolver whose Do53 queries skip the records that do not parse.

dnspython refuses a whole message when one RR's rdata does not parse (2.9 refuses a TLSA digest whose
length does not fit its matching type): over UDP the resolver drops the answer as garbage and times
out, over TCP it raises. RFC 7672 §2.1.1 (RFC 6698 §2.1) makes only that record unusable, so the
TLSA answer is read with ``continue_on_error``, which skips the bad RR and lists it in
``Message.errors``. Everything else (retries, TC -> TCP, rcodes, CNAMEs, lifetime, cache, the DO
bit) stays the resolver's. dnspython's query functions do not take ``continue_on_error``, so the
Do53 exchange is ours, built from dnspython's public pieces (``send_udp``, ``send_tcp``, ``from_wire``).
"""

from __future__ import annotations

import copy
import ipaddress
import socket
import struct
import time

import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.inet
import dns.message
import dns.nameserver
import dns.query


def _remaining(expiration: float) -> float:
    return max(expiration - time.time(), 0.0)


def _same_peer(got: tuple[object, ...], want: tuple[object, ...]) -> bool:
    try:
        return got[1] == want[1] and ipaddress.ip_address(str(got[0])) == ipaddress.ip_address(str(want[0]))
    except (ValueError, IndexError):
        return False


async def _recv_exactly(sock: dns.asyncbackend.StreamSocket, count: int, expiration: float) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await sock.recv(count - len(data), _remaining(expiration))
        if not chunk:
            raise EOFError("EOF")
        data += chunk
    return data


def _read_response(wire: bytes, request: dns.message.Message, truncation: bool, one_rr_per_rrset: bool,
                   ignore_trailing: bool) -> dns.message.Message:
    return dns.message.from_wire(wire, keyring=request.keyring, request_mac=request.mac,
                                 one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing,
                                 raise_on_truncation=truncation, continue_on_error=True)


class _TolerantDo53(dns.nameserver.Do53Nameserver):
    """Do53 as dnspython does it, but the response is parsed with ``continue_on_error`` (see above)."""

    async def async_query(self, request: dns.message.QueryMessage, timeout: float, source: str | None,
                          source_port: int, max_size: bool, backend: dns.asyncbackend.Backend,
                          one_rr_per_rrset: bool = False, ignore_trailing: bool = False) -> dns.message.Message:
        expiration = time.time() + timeout
        af = dns.inet.af_for_address(self.address)
        src = None
        if source or source_port:
            src = (source or ("::" if af == socket.AF_INET6 else "0.0.0.0"), source_port)
        if max_size:
            async with await backend.make_socket(af, socket.SOCK_STREAM, 0, src, (self.address, self.port),
                                                 timeout) as sock:
                await dns.asyncquery.send_tcp(sock, request, expiration)
                (length,) = struct.unpack("!H", await _recv_exactly(sock, 2, expiration))
                wire = await _recv_exactly(sock, length, expiration)
            response = _read_response(wire, request, False, one_rr_per_rrset, ignore_trailing)
            if not request.is_response(response):
                raise dns.query.BadResponse
            return response
        destination = dns.inet.low_level_address_tuple((self.address, self.port), af)
        connect = (self.address, self.port) if backend.datagram_connection_required() else None
        async with await backend.make_socket(af, socket.SOCK_DGRAM, 0, src, connect) as sock:
            await dns.asyncquery.send_udp(sock, request, destination, expiration)
            while True:
                wire, sender = await sock.recvfrom(65535, _remaining(expiration))
                if not _same_peer(sender, destination):
                    continue  # as dnspython's ignore_unexpected
                try:
                    response = _read_response(wire, request, True, one_rr_per_rrset, ignore_trailing)
                except dns.message.Truncated as e:
                    if request.is_response(e.message()):
                        raise  # the resolver retries over TCP (RFC 7766 §5)
                    continue
                except Exception:
                    continue  # not a DNS message at all: wait for the answer, as dnspython's ignore_errors
                if request.is_response(response):
                    return response


def tolerant(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """``resolver`` with its Do53 nameservers reading answers tolerantly. A shallow copy keeps every
    setting as it is (EDNS and the DO bit, flags, timeouts, lifetime, ports, TSIG) and shares the cache."""
    tolerant = copy.copy(resolver)
    servers: list[str | dns.nameserver.Nameserver] = []
    for ns in resolver.nameservers:
        if isinstance(ns, dns.nameserver.Do53Nameserver):
            servers.append(_TolerantDo53(ns.address, ns.port))
        elif isinstance(ns, str) and dns.inet.is_address(ns):
            servers.append(_TolerantDo53(ns, resolver.nameserver_ports.get(ns, resolver.port)))
        else:
            servers.append(ns)
    tolerant.nameservers = servers
    return tolerant


