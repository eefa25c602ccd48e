"""MX resolution against a real DNS responder on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import dns.rcode
import pytest

from mailrelayd.config import DnsConfig, HostPort
from mailrelayd.delivery.mx import DnsPermanentError, DnsTemporaryError, MxResolver
from tests.support.dnsserver import DnsServer


@pytest.fixture
def dns_srv() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv


def _resolver(srv: DnsServer, timeout: float = 2.0) -> MxResolver:
    return MxResolver(DnsConfig(nameservers=[HostPort("127.0.0.1", srv.port)], timeout=timeout))


async def test_mx_ordered_by_preference_with_both_families(dns_srv: DnsServer) -> None:
    dns_srv.add("example.test.", "MX", "20 backup.example.test.")
    dns_srv.add("example.test.", "MX", "10 primary.example.test.")
    dns_srv.add("primary.example.test.", "A", "127.0.0.2")
    dns_srv.add("primary.example.test.", "AAAA", "::1")
    dns_srv.add("backup.example.test.", "A", "127.0.0.3")
    hosts = await _resolver(dns_srv).resolve("Example.TEST.", 2525)
    assert [h.name for h in hosts] == ["primary.example.test", "backup.example.test"]
    assert hosts[0].addresses == ("::1", "127.0.0.2")  # IPv6 and IPv4 both tried
    assert hosts[1].addresses == ("127.0.0.3",)
    assert all(h.port == 2525 for h in hosts)


async def test_equal_preferences_are_shuffled(dns_srv: DnsServer) -> None:
    for i in range(4):
        dns_srv.add("spread.test.", "MX", f"10 mx{i}.spread.test.")
        dns_srv.add(f"mx{i}.spread.test.", "A", f"127.0.0.{i + 2}")
    r = _resolver(dns_srv)
    firsts = {(await r.resolve("spread.test", 25))[0].name for _ in range(40)}
    assert len(firsts) > 1


async def test_implicit_mx_from_address_records(dns_srv: DnsServer) -> None:
    dns_srv.add("nomx.test.", "A", "127.0.0.5")
    hosts = await _resolver(dns_srv).resolve("nomx.test", 25)
    assert [(h.name, h.addresses) for h in hosts] == [("nomx.test", ("127.0.0.5",))]


async def test_null_mx_is_permanent_5_1_10(dns_srv: DnsServer) -> None:
    dns_srv.add("nullmx.test.", "MX", "0 .")
    dns_srv.add("nullmx.test.", "A", "127.0.0.5")
    with pytest.raises(DnsPermanentError) as ei:
        await _resolver(dns_srv).resolve("nullmx.test", 25)
    assert ei.value.enhanced == "5.1.10"


async def test_nxdomain_is_permanent_5_1_2(dns_srv: DnsServer) -> None:
    with pytest.raises(DnsPermanentError) as ei:
        await _resolver(dns_srv).resolve("nonexistent.test", 25)
    assert ei.value.enhanced == "5.1.2"


async def test_name_without_mx_or_address_is_permanent(dns_srv: DnsServer) -> None:
    dns_srv.add("txtonly.test.", "TXT", '"hello"')
    with pytest.raises(DnsPermanentError):
        await _resolver(dns_srv).resolve("txtonly.test", 25)


async def test_servfail_defers(dns_srv: DnsServer) -> None:
    dns_srv.set_rcode("broken.test.", dns.rcode.SERVFAIL)
    with pytest.raises(DnsTemporaryError) as ei:
        await _resolver(dns_srv).resolve("broken.test", 25)
    assert ei.value.enhanced.startswith("4.")


async def test_timeout_defers(dns_srv: DnsServer) -> None:
    dns_srv.set_timeout("slow.test.")
    with pytest.raises(DnsTemporaryError):
        await _resolver(dns_srv, timeout=0.5).resolve("slow.test", 25)


async def test_mx_host_without_address_defers_when_none_resolve(dns_srv: DnsServer) -> None:
    dns_srv.add("dangling.test.", "MX", "10 gone.dangling.test.")
    with pytest.raises(DnsTemporaryError):
        await _resolver(dns_srv).resolve("dangling.test", 25)


async def test_unresolvable_mx_hosts_are_skipped(dns_srv: DnsServer) -> None:
    dns_srv.add("partial.test.", "MX", "10 gone.partial.test.")
    dns_srv.add("partial.test.", "MX", "20 ok.partial.test.")
    dns_srv.add("ok.partial.test.", "A", "127.0.0.9")
    hosts = await _resolver(dns_srv).resolve("partial.test", 25)
    assert [h.name for h in hosts] == ["ok.partial.test"]


async def test_cache_honours_ttl(dns_srv: DnsServer) -> None:
    dns_srv.add("cached.test.", "MX", "10 mx.cached.test.", ttl=300)
    dns_srv.add("mx.cached.test.", "A", "127.0.0.7", ttl=300)
    dns_srv.add("short.test.", "MX", "10 mx.short.test.", ttl=0)
    dns_srv.add("mx.short.test.", "A", "127.0.0.8", ttl=0)
    r = _resolver(dns_srv)
    for _ in range(3):
        await r.resolve("cached.test", 25)
        await r.resolve("short.test", 25)
    assert dns_srv.query_count("cached.test.", "MX") == 1
    assert dns_srv.query_count("short.test.", "MX") == 3


async def test_route_host_literal_needs_no_dns(dns_srv: DnsServer) -> None:
    hosts = await _resolver(dns_srv).resolve_host("127.0.0.1", 2526)
    assert [(h.addresses, h.port) for h in hosts] == [(("127.0.0.1",), 2526)]
    assert dns_srv.queries == []
