"""External login programs (docker_auth's ext_auth): the section, then a real gateway running one."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway import policyfile
from gateway.identity.external import parse_labels
from gateway.sample_image import write_image
from tests import ldap_server
from tests.conftest import (
    Gateway,
    Registry,
    htpasswd_add,
    http_request,
    skopeo_copy,
    start_gateway,
    stop,
    write_authfile,
)

# docker_auth's examples/ext_auth.sh, as its documentation gives it.
DOCKER_AUTH_EXT_AUTH_SH = """\
#!/bin/bash
#
# Example external authenticator program for use with `ext_auth`.
#

read u p

if [ "$u" == "user" -a "$p" == "pass" ]; then
  exit 0
fi

if [ "$u" == "bofh" -a "$p" == "LART" ]; then
  echo '{"labels": {"level": ["max"], "groups": ["VIP", "ATeam"]}}'
  exit 0
fi

exit 1
"""

ACL = """\
acl:
  - match: {labels: {level: max}}
    actions: ["*"]
    comment: the program's label level=max grants everything
  - match: {account: "/.+/"}
    actions: [pull]
"""


def program(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("output", "labels"),
    [
        (b"", {}),
        (
            b'{"labels": {"level": ["max"], "groups": ["VIP", "ATeam"]}}\n',
            {"level": ("max",), "groups": ("VIP", "ATeam")},
        ),
        (b'{"labels": {"team": "ci"}}', {"team": ("ci",)}),
    ],
)
def test_labels_from_standard_output(output: bytes, labels: dict[str, tuple[str, ...]]) -> None:
    assert dict(parse_labels(output)) == labels


@pytest.mark.parametrize("output", [b"not json", b'{"labels": [1]}', b'{"labels": {"a": [1]}}', b"[]"])
def test_unreadable_labels_are_refused(output: bytes) -> None:
    with pytest.raises(ValueError):
        parse_labels(output)


def test_section_problems_are_named_by_key() -> None:
    with pytest.raises(policyfile.PolicyError) as caught:
        policyfile.parse(
            yaml.safe_load(
                'acl: [{match: {account: "/.+/"}, actions: [pull]}]\n'
                'ext_auth: {command: "/no/such/program", args: "--flag", timeout: 0, comand: x}\n'
            )
        )
    text = "\n".join(caught.value.problems)
    assert "ext_auth.comand: unknown key" in text
    assert "ext_auth.command: /no/such/program: not found, or not executable" in text
    assert "ext_auth.args: expected a list of strings" in text
    assert "ext_auth.timeout: expected seconds" in text


@dataclass
class Setup:
    registry: Registry
    gateway: Gateway
    tmp: Path


def start(tmp: Path, registry: Registry, section: str) -> Gateway:
    users = tmp / "htpasswd"
    if not users.exists():
        htpasswd_add(users, "admin", "admin-pw-1", "-B")
    policy = tmp / "policy.yml"
    policy.write_text(ACL + section)
    return start_gateway(tmp, registry.url, users, "--policy", str(policy))


@pytest.fixture
def setup(tmp_path: Path, registry: Registry) -> Iterator[Setup]:
    script = program(tmp_path, "ext_auth.sh", DOCKER_AUTH_EXT_AUTH_SH)
    gateway = start(tmp_path, registry, f'ext_auth:\n  command: "{script}"\n')
    try:
        yield Setup(registry, gateway, tmp_path)
    finally:
        stop(gateway.process)


def test_docker_auth_example_program_works_unchanged(setup: Setup) -> None:
    host = setup.gateway.host
    assert http_request(host, "GET", "/v2/", ("user", "pass"))[0] == 200
    assert http_request(host, "GET", "/v2/", ("bofh", "LART"))[0] == 200
    wrong = http_request(host, "GET", "/v2/", ("user", "wrong"))
    unknown = http_request(host, "GET", "/v2/", ("nobody", "pass"))
    assert wrong[0] == unknown[0] == 401 and wrong[2] == unknown[2]
    # A space in the name would move the program's split of "USER PASSWORD": refused unasked.
    assert http_request(host, "GET", "/v2/", ("user pass", "x"))[0] == 401
    # Labels from the program reach the ACL: bofh (level=max) pushes, user only pulls.
    image = setup.tmp / "image"
    write_image(image, "1", layers=1, layer_bytes=3000)
    bofh = write_authfile(setup.tmp / "bofh.json", host, ("bofh", "LART"))
    user = write_authfile(setup.tmp / "user.json", host, ("user", "pass"))
    assert skopeo_copy(f"oci:{image}:1", f"docker://{host}/vip/app:1", bofh).returncode == 0
    refused = skopeo_copy(f"oci:{image}:1", f"docker://{host}/user/app:1", user)
    assert refused.returncode != 0
    assert not (setup.registry.storage / "docker/registry/v2/repositories/user").exists()
    assert skopeo_copy(f"docker://{host}/vip/app:1", f"oci:{setup.tmp / 'out'}:1", user).returncode == 0


def test_password_never_in_argv_or_environment_and_failures_fail_closed(
    tmp_path: Path, registry: Registry
) -> None:
    spy = tmp_path / "seen.json"
    script = program(
        tmp_path,
        "spy.py",
        textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import json, os, sys, time
        line = sys.stdin.read()
        user, _, password = line.partition(" ")
        json.dump({{"argv": sys.argv, "env": dict(os.environ), "stdin": line}}, open({str(spy)!r}, "w"))
        if user == "slow":
            time.sleep(30)
        if user == "crash":
            print("oops, the password was " + password, file=sys.stderr)
            sys.exit(3)
        if user == "garbage":
            print("not json")
            sys.exit(0)
        sys.exit(0 if password == "right pass word" else 1)
        """),
    )
    gateway = start(
        tmp_path, registry, f'ext_auth:\n  command: "{script}"\n  args: ["--flag"]\n  timeout: 1\n'
    )
    try:
        host = gateway.host
        assert http_request(host, "GET", "/v2/", ("carol", "right pass word"))[0] == 200
        seen = json.loads(spy.read_text())
        assert seen["stdin"] == "carol right pass word"  # as docker_auth passes it: no newline
        assert seen["argv"][1:] == ["--flag"]
        assert "right pass word" not in json.dumps(seen["argv"]) + json.dumps(seen["env"])
        assert not any(key.startswith("GATEWAY_") for key in seen["env"])
        for user in ("slow", "crash", "garbage"):
            status, _, body = http_request(host, "GET", "/v2/", (user, "secret-" + user))
            assert status == 401, (user, body)
        log = gateway.log.read_text()
        assert "did not finish in 1 s" in log
        assert "exited with 3: oops, the password was ***" in log
        assert "unreadable labels" in log
        assert "secret-crash" not in log and "right pass word" not in log
    finally:
        stop(gateway.process)


def test_directory_first_then_program(tmp_path: Path, registry: Registry) -> None:
    directory = ldap_server.create(tmp_path / "slapd")
    try:
        script = program(tmp_path, "ext_auth.sh", DOCKER_AUTH_EXT_AUTH_SH.replace('"user"', '"alice"'))
        password_file = tmp_path / "bind.pw"
        password_file.write_text(ldap_server.SERVICE_PASSWORD)
        ldap = {
            "addr": directory.addr,
            "tls": "never",
            "base": ldap_server.PEOPLE,
            "filter": "(uid=${account})",
            "bind_dn": ldap_server.SERVICE_DN,
            "bind_password_file": str(password_file),
        }
        gateway = start(
            tmp_path, registry, "ldap_auth: " + json.dumps(ldap) + f'\next_auth:\n  command: "{script}"\n'
        )
        try:
            host = gateway.host
            # alice is in the directory: only the directory decides (the program would take "pass").
            assert http_request(host, "GET", "/v2/", ("alice", ldap_server.PASSWORDS["alice"]))[0] == 200
            assert http_request(host, "GET", "/v2/", ("alice", "pass"))[0] == 401
            # bofh is not: the program decides.
            assert http_request(host, "GET", "/v2/", ("bofh", "LART"))[0] == 200
        finally:
            stop(gateway.process)
    finally:
        directory.stop()
