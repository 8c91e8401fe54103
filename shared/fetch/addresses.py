"""Which addresses a fetch may connect to: the blocked ranges (loopback, private,
link-local/metadata, CGNAT, multicast, ... and IPv6 forms that embed an IPv4 address), minus
the operator's allowlist; and one resolution per host, whose answer is the only one used."""
from __future__ import annotations

import ipaddress
import socket

from shared.safefiles import FetchError

_BLOCKED_V4 = [(ipaddress.IPv4Network(net), label) for net, label in [
    ("0.0.0.0/8", "unspecified, 'this network'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT, shared address space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, incl. the 169.254.169.254 cloud metadata service"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
]]
_BLOCKED_V6 = [(ipaddress.IPv6Network(net), label) for net, label in [
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignment, incl. Teredo"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local, ULA"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
]]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a mapped, compatible, NAT64 or 6to4 IPv6 address leads to."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_error(host: str, ip, reason: str) -> FetchError:
    subject = f"{ip} is" if str(ip) == host else f"{host} resolves to {ip}, which is"
    return FetchError("url_address_blocked", f"{subject} in a blocked range ({reason}); refusing to connect")


def blocked_reason(ip) -> str | None:
    """Why connecting to `ip` is refused, or None when it is a public unicast address."""
    if ip.version == 6:
        ip = ipaddress.IPv6Address(int(ip))           # drop any zone id
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = blocked_reason(embedded)
            return f"{reason}; IPv4 {embedded} embedded in IPv6" if reason else None
        table = _BLOCKED_V6
    else:
        table = _BLOCKED_V4
    for network, label in table:
        if ip in network:
            return label
    # Catch-all for special ranges the tables above do not name.
    return None if ip.is_global else "non-global"


class AddressPolicy:
    """Blocked ranges, minus the operator's explicit allowlist (names, addresses, CIDRs)."""

    def __init__(self, allow_hosts: tuple[str, ...]):
        self.names: set[str] = set()
        self.networks = []
        for entry in allow_hosts:
            entry = entry.strip().lower().rstrip(".")
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)

    def _allowed(self, host: str, ip) -> bool:
        if host in self.names:
            return True
        candidates = [ip]
        if ip.version == 6 and _embedded_ipv4(ip) is not None:
            candidates.append(_embedded_ipv4(ip))
        return any(c.version == n.version and c in n for c in candidates for n in self.networks)

    def check(self, host: str, addresses: list) -> None:
        for ip in addresses:
            reason = blocked_reason(ip)
            if reason and not self._allowed(host, ip):
                raise blocked_error(host, ip, reason)


def resolve(host: str, port: int) -> list:
    """All addresses of `host`, from one getaddrinfo call."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError("source_unreachable", f"cannot resolve host {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError("source_unreachable", f"host {host!r} has no addresses")
    return addresses

