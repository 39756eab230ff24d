"""One reading of client addresses, for every guard that keys on them. Pure: no I/O.

A dual-stack listener, or a proxy in front of one (nginx `listen [::]:80 ipv6only=off`, HAProxy
`v4v6`), writes an IPv4 client as an IPv4-mapped IPv6 address: `::ffff:10.1.2.3`, or
`::ffff:a01:203`, or with leading zeros and capitals. Compared as text or as an IPv6 address,
that client would slip past an `ip: 10.0.0.0/8` rule, count its failed logins under another
name and appear in the audit log as someone else. So every address the gateway reads (the
peer's, each X-Forwarded-For hop, `--ip` of `policy explain`) and every network it is given
(policy `ip:`, `trusted_proxies`) passes through here once, and everything after compares the
canonical forms: an IPv4-mapped address is its IPv4 address (as Go's net.IP, and so docker_auth,
reads it), IPv6 is in its compressed form, and a zone is dropped.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_ip(text: str) -> IPAddress | None:
    """The address `text` names, IPv4-mapped ones as IPv4; None when it names none. A port
    some proxies add (`10.1.2.3:40001`, `[2001:db8::1]:443`, Azure's X-Forwarded-For) and
    brackets are not part of the address."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port; an IPv6 address has more colons
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(ip.packed)
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


def canonical_ip(text: str) -> str:
    """`text` in its one canonical form when it is an address; otherwise unchanged (it is then
    no trusted proxy, and forwarding.client_view refuses a client known by it)."""
    # The common case costs a few string checks: a plain dotted quad is canonical already
    # unless a part has a leading zero, which ipaddress refuses (as Go does) and so do we.
    if ":" not in text and text.count(".") == 3 and text.replace(".", "").isdigit():
        parts = text.split(".")
        if all(len(part) == 1 or (part[0] != "0" and int(part) < 256) for part in parts):
            return text
    ip = parse_ip(text)
    return text if ip is None else str(ip)


def canonical_peer(text: str) -> str:
    """`canonical_ip` for an address the kernel wrote (a socket's peer): an IPv4 one is in its
    canonical form already, so only one with a colon (a dual-stack listener's ::ffff:a.b.c.d,
    IPv6) needs reading. Called for every request, so it costs one `in` for IPv4."""
    return canonical_ip(text) if ":" in text else text


def canonical_network(network: IPNetwork) -> IPNetwork:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it covers, so that it matches
    the IPv4 form every address is read in."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None  # inside ::ffff:0:0/96
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_network(text: str) -> IPNetwork:
    """A CIDR (or a single address) as `canonical_network` reads it; ValueError when it is none."""
    return canonical_network(ipaddress.ip_network(text.strip(), strict=False))


def lockout_key(address: str) -> str:
    """What failed logins are counted by: the address, but for IPv6 its /64. One IPv6 host or
    site is given a whole /64 to pick addresses from, so counting single addresses would give a
    guesser 2**64 fresh starts."""
    ip = parse_ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address
