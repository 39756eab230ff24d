"""Client addresses read one way (gateway/addresses.py) and request targets redacted one way
(audit.loggable_target): pure tables."""

from __future__ import annotations

import pytest

from gateway import acl
from gateway.addresses import canonical_ip, lockout_key, parse_network
from gateway.audit import loggable_target


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::ffff:a01:203", "10.1.2.3"),
        ("0:0:0:0:0:FFFF:0A01:0203", "10.1.2.3"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::10.1.2.3", "::a01:203"),  # IPv4-compatible, deprecated: not IPv4 (as Go reads it)
        (" 10.1.2.3 ", "10.1.2.3"),
        ("010.1.2.3", "010.1.2.3"),  # not an address (leading zero): unchanged, matches nothing
        ("1.2.3.256", "1.2.3.256"),
        ("unknown", "unknown"),
        ("", ""),
    ],
)
def test_every_spelling_of_an_address_reads_as_one(written: str, read: str) -> None:
    assert canonical_ip(written) == read


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:10.1.2.3", "10.1.2.3/32"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::ffff:0:0/80", "::/80"),  # wider than the mapped block: stays IPv6
        ("2001:db8::/32", "2001:db8::/32"),
    ],
)
def test_networks_are_read_as_addresses_are(written: str, read: str) -> None:
    assert str(parse_network(written)) == read


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_failed_logins_are_counted_by_address_and_ipv6_by_64(address: str, key: str) -> None:
    assert lockout_key(address) == key


DENY_OFFICE = (
    acl.Entry(acl.Match(ip=parse_network("10.0.0.0/8")), frozenset()),
    acl.Entry(acl.Match(), frozenset({"pull"})),
)


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("::ffff:a01:203", False),
        ("192.0.2.1", True),
        ("::ffff:192.0.2.1", True),
    ],
)
def test_an_ip_rule_meets_every_spelling(ip: str, allowed: bool) -> None:
    request = acl.Request(account="bob", type="repository", name="app", actions=frozenset({"pull"}), ip=ip)
    assert acl.evaluate(DENY_OFFICE, request).allows({"pull"}) is allowed


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/v2/team/app/manifests/1", "/v2/team/app/manifests/1"),
        ("/v2/x/blobs/uploads/u?_state=SECRET&digest=sha256:1", "/v2/x/blobs/uploads/u"),
        ("/token?password=PW", "/token"),
        ("http://bob:PW@host/v2/", "http://***@host/v2/"),
        ("https://bob:P@W@host:443/v2/?x", "https://***@host:443/v2/"),
        ("//bob:PW@x/v2/", "//***@x/v2/"),
        ("bob:PW@host:443", "***@host:443"),
        ("http://host/v2/a@b", "http://host/v2/a@b"),  # an @ in the path is no userinfo
        ("/v2/a#bob:PW", "/v2/a"),
        ("*", "*"),
        ("/" + "a" * 2000, "/" + "a" * 1023),
    ],
)
def test_a_target_is_logged_without_its_secrets(target: str, logged: str) -> None:
    assert loggable_target(target) == logged
