"""LDAP logins: the pure parts as tables, then a real slapd behind the gateway with real clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import policyfile
from gateway.identity.ldap import (
    LabelSpec,
    account_attributes,
    entry_labels,
    escape_dn_value,
    escape_filter_value,
    first_cn,
    names_entry,
    user_bind_dn,
    user_filter,
)
from gateway.sample_image import write_image
from tests import ldap_server
from tests.conftest import (
    Gateway,
    Registry,
    free_port,
    htpasswd_add,
    http_request,
    skopeo_copy,
    start_gateway,
    stop,
    write_authfile,
)
from tests.dockerd import Docker
from tests.ldap_server import PASSWORDS, Directory

# --- pure --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("account", "escaped"),
    [
        ("alice", "alice"),
        ("*", "\\2a"),
        ("*)(uid=*", "\\2a\\29\\28uid=\\2a"),
        ("alice)(|(uid=*", "alice\\29\\28|\\28uid=\\2a"),
        ("a\x00b", "a\\00b"),
        ("back\\slash", "back\\5cslash"),
        ("zoë", "zo\\c3\\ab"),
        ("tab\there", "tab\\09here"),
    ],
)
def test_filter_values_are_escaped(account: str, escaped: str) -> None:
    assert escape_filter_value(account) == escaped
    built = user_filter("(&(uid=${account})(objectClass=person))", account)
    assert built == f"(&(uid={escaped})(objectClass=person))"
    # Whatever the name, the filter keeps its structure: parentheses come only from the template.
    assert built.count("(") == 3 and built.count(")") == 3


@pytest.mark.parametrize(
    ("dn", "cn"),
    [
        ("cn=backend,ou=groups,dc=example,dc=org", "backend"),
        ("CN=Backend Team,OU=Groups,DC=corp", "Backend Team"),
        ("uid=x,cn=admins,dc=example", "admins"),
        ("cn=a\\,b,ou=groups", "a,b"),
        ("cn=caf\\c3\\a9,ou=g", "café"),
        ("ou=no-cn,dc=example", "ou=no-cn,dc=example"),
        ("cn=first+uid=x,dc=e", "first"),
    ],
)
def test_first_cn(dn: str, cn: str) -> None:
    assert first_cn(dn) == cn


@pytest.mark.parametrize(
    ("account", "escaped"),
    [
        ("alice", "alice"),
        ("x,ou=admins", "x\\,ou\\=admins"),
        ("a+b", "a\\+b"),
        (" lead", "\\ lead"),
        ("trail ", "trail\\ "),
        ("#hash", "\\#hash"),
        ('q"<>;', 'q\\"\\<\\>\\;'),
        ("nul\x00", "nul\\00"),
    ],
)
def test_bind_dn_values_are_escaped(account: str, escaped: str) -> None:
    assert escape_dn_value(account) == escaped
    assert user_bind_dn("uid=${account},ou=people,dc=e", account) == f"uid={escaped},ou=people,dc=e"
    assert user_bind_dn(None, account) == account


@pytest.mark.parametrize(
    ("template", "attributes"),
    [
        ("(&(uid=${account})(objectClass=person))", ("uid",)),
        ("(|(uid=${account})(mail=${account}))", ("uid", "mail")),
        ("(sAMAccountName=${account})", ("sAMAccountName",)),
        ("(uid=pre-${account})", ()),
        ("( cn = ${account} )", ("cn",)),
    ],
)
def test_account_attributes(template: str, attributes: tuple[str, ...]) -> None:
    assert account_attributes(template) == attributes


def test_only_the_directorys_spelling_of_a_name_logs_in() -> None:
    entry = {"uid": ["alice"], "mail": ["Alice@example.org"]}
    assert names_entry(entry, ("uid",), "alice")
    assert not names_entry(entry, ("uid",), "ALICE")
    assert not names_entry(entry, ("UID",), "Alice")
    assert names_entry(entry, ("uid", "mail"), "Alice@example.org")
    assert not names_entry(entry, ("uid", "mail"), "alice@example.org")
    assert names_entry(entry, (), "anything")  # the filter does not compare the whole name


def test_entry_labels() -> None:
    entry = {
        "memberOf": ["cn=Backend,ou=groups,dc=e", "cn=ops,ou=groups,dc=e"],
        "Title": ["Engineer"],
    }
    specs = {
        "group": LabelSpec("memberof", parse_cn=True, lower_case=True),
        "title": LabelSpec("title"),
        "missing": LabelSpec("departmentNumber"),
    }
    assert dict(entry_labels(entry, specs)) == {"group": ("backend", "ops"), "title": ("Engineer",)}


def _policy_problems(document: str) -> list[str]:
    with pytest.raises(policyfile.PolicyError) as caught:
        policyfile.parse(
            json.loads(document) if document.startswith("{") else __import__("yaml").safe_load(document)
        )
    return caught.value.problems


def test_ldap_section_problems_are_named_by_key(tmp_path: Path) -> None:
    problems = _policy_problems(
        textwrap.dedent("""\
        acl: [{match: {account: "/.+/"}, actions: [pull]}]
        ldap_auth:
          addr: "ldap.example.com"
          tls: sometimes
          filter: "(uid=alice)"
          bind_dn: "cn=x"
          labels: {group: {attribute: memberOf, parse_cm: true}}
          tiemout: 3
        """)
    )
    text = "\n".join(problems)
    assert "ldap_auth.tiemout: unknown key" in text
    assert "ldap_auth.addr: expected HOST:PORT" in text
    assert "ldap_auth.tls: expected one of: never, always, starttls" in text
    assert "ldap_auth.base: required" in text
    assert "ldap_auth.filter: must contain ${account}" in text
    assert "ldap_auth.bind_password_file: required with bind_dn" in text
    assert "ldap_auth.labels.group.parse_cm: unknown key" in text


def test_ldap_section_parses(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("secret\n")
    policy = policyfile.parse(
        {
            "acl": [{"match": {"account": "/.+/"}, "actions": ["pull"]}],
            "ldap_auth": {
                "addr": "ldap.example.com:636",
                "base": "dc=example,dc=com",
                "filter": "(uid=${account})",
                "bind_dn": "cn=svc,dc=example,dc=com",
                "bind_password_file": str(password),
                "labels": {"group": {"attribute": "memberOf", "parse_cn": True}},
            },
        }
    )
    assert policy.ldap is not None
    assert policy.ldap.url == "ldaps://ldap.example.com:636"  # docker_auth's default tls: always
    assert policy.ldap.bind_password == "secret"
    assert "secret" not in repr(policy.ldap)


def test_a_rotated_bind_password_file_reloads_the_policy(tmp_path: Path) -> None:
    """The service account's secret is rotated in its own file: followed as the policy file is,
    so the directory is asked with the new one within reload_interval, not after a restart."""
    from gateway.state import AccessStore

    password = tmp_path / "pw"
    password.write_text("first\n")
    policy = tmp_path / "policy.yml"
    policy.write_text(
        "acl: [{match: {account: '/.+/'}, actions: [pull]}]\n"
        "ldap_auth: {addr: 'ldap.example.com:636', base: 'dc=example,dc=com', filter: '(uid=${account})',"
        f" bind_dn: 'cn=svc,dc=example,dc=com', bind_password_file: '{password}'}}\n"
    )
    users = tmp_path / "htpasswd"
    users.write_text("")
    store = AccessStore(users, policy)
    assert store.snapshot.policy is not None and store.snapshot.policy.ldap is not None
    assert store.snapshot.policy.ldap.bind_password == "first"
    assert not store.reload_if_changed()
    password.write_text("second\n")
    assert store.reload_if_changed()
    assert store.snapshot.policy.ldap.bind_password == "second"
    assert not store.reload_if_changed()  # followed from now on as before, no reload without change


# --- a real directory --------------------------------------------------------------------------

ACL = """\
acl:
  - match: {account: "/^admin/"}
    actions: ["*"]
    comment: admins
  - match: {account: "/.+/", name: "${labels:group}/*"}
    actions: [pull, push]
    comment: directory groups push to their own namespace
  - match: {account: "/.+/"}
    actions: [pull]
    comment: every user pulls
"""


def ldap_section(directory: Directory, tmp: Path, **overrides: object) -> str:
    password_file = tmp / "bind.pw"
    password_file.write_text(ldap_server.SERVICE_PASSWORD + "\n")
    section: dict[str, object] = {
        "addr": directory.addr,
        "tls": "never",
        "base": ldap_server.PEOPLE,
        "filter": "(&(uid=${account})(objectClass=inetOrgPerson))",
        "bind_dn": ldap_server.SERVICE_DN,
        "bind_password_file": str(password_file),
        "labels": {"group": {"attribute": "memberOf", "parse_cn": True}},
    }
    section.update(overrides)
    section = {key: value for key, value in section.items() if value is not None}
    return "ldap_auth: " + json.dumps(section) + "\n"


@dataclass
class Setup:
    directory: Directory
    registry: Registry
    gateway: Gateway
    tmp: Path
    image: Path


def start(tmp: Path, registry: Registry, directory: Directory, *extra: str, **overrides: object) -> Gateway:
    users = tmp / "htpasswd"
    if not users.exists():
        htpasswd_add(users, "admin", "admin-pw-1", "-B")
    policy = tmp / "policy.yml"
    policy.write_text(ACL + ldap_section(directory, tmp, **overrides))
    return start_gateway(
        tmp, registry.url, users, "--policy", str(policy), *extra, env={"GATEWAY_CACHE_TTL": "2"}
    )


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    created = ldap_server.create(tmp_path / "slapd")
    try:
        yield created
    finally:
        created.stop()


@pytest.fixture
def setup(tmp_path: Path, registry: Registry, directory: Directory) -> Iterator[Setup]:
    gateway = start(tmp_path, registry, directory)
    image = tmp_path / "image"
    write_image(image, "1", layers=1, layer_bytes=5000)
    try:
        yield Setup(directory, registry, gateway, tmp_path, image)
    finally:
        stop(gateway.process)


def auth(setup: Setup, user: str, password: str | None = None) -> Path:
    return write_authfile(
        setup.tmp / f"auth-{user}.json", setup.gateway.host, (user, password or PASSWORDS.get(user, "x"))
    )


def tag_exists(registry: Registry, repository: str) -> bool:
    tags = registry.storage / "docker/registry/v2/repositories" / repository / "_manifests/tags"
    return tags.is_dir() and any(tags.iterdir())


def test_directory_user_pushes_where_its_group_allows(setup: Setup) -> None:
    host = setup.gateway.host
    pushed = skopeo_copy(f"oci:{setup.image}:1", f"docker://{host}/backend/app:1", auth(setup, "alice"))
    assert pushed.returncode == 0, pushed.stderr
    assert tag_exists(setup.registry, "backend/app")
    refused = skopeo_copy(f"oci:{setup.image}:1", f"docker://{host}/frontend/app:1", auth(setup, "alice"))
    assert refused.returncode != 0
    assert not tag_exists(setup.registry, "frontend/app")
    # bob is in frontend: pushes there, pulls what alice pushed, cannot push to backend.
    assert (
        skopeo_copy(f"oci:{setup.image}:1", f"docker://{host}/frontend/app:1", auth(setup, "bob")).returncode
        == 0
    )
    assert tag_exists(setup.registry, "frontend/app")
    pulled = skopeo_copy(f"docker://{host}/backend/app:1", f"oci:{setup.tmp / 'out'}:1", auth(setup, "bob"))
    assert pulled.returncode == 0, pulled.stderr


def test_wrong_password_and_unknown_user_fail_alike(setup: Setup) -> None:
    host = setup.gateway.host
    answers = []
    # ALICE finds alice's entry (uid compares without case) but is not the directory's spelling:
    # an ACL entry for alice would not match ALICE, so ALICE does not log in.
    for credentials in (
        ("alice", "wrong"),
        ("nobody-here", "whatever"),
        ("alice", ""),
        ("ALICE", PASSWORDS["alice"]),
    ):
        status, headers, body = http_request(host, "GET", "/v2/", credentials)
        errors = json.loads(body)["errors"]
        answers.append((status, headers.get("WWW-Authenticate"), errors[0]["code"], errors[0]["message"]))
    assert answers[0] == answers[1] == answers[2] == answers[3]
    assert answers[0][0] == 401
    assert http_request(host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200


@pytest.mark.parametrize(
    "name", ["*", "*)(uid=*", "alice)(|(uid=*", "alice\x00", "al*", "\u0430lice", "alice*"]
)
def test_filter_injection_matches_nobody(setup: Setup, name: str) -> None:
    for password in (PASSWORDS["alice"], "x", "*"):
        status, _, _ = http_request(setup.gateway.host, "GET", "/v2/", (name, password))
        assert status == 401, (name, password)
    log = setup.gateway.log.read_text()
    assert PASSWORDS["alice"] not in log


def test_group_removal_takes_effect_within_cache_ttl(setup: Setup) -> None:
    host = setup.gateway.host
    alice = auth(setup, "alice")
    assert skopeo_copy(f"oci:{setup.image}:1", f"docker://{host}/backend/one:1", alice).returncode == 0
    setup.directory.modify(
        f"dn: cn=backend,{ldap_server.GROUPS}\nchangetype: modify\ndelete: member\n"
        f"member: uid=alice,{ldap_server.PEOPLE}\n"
    )
    time.sleep(2.5)  # cache_ttl is 2 s in these tests
    refused = skopeo_copy(f"oci:{setup.image}:1", f"docker://{host}/backend/two:1", alice)
    assert refused.returncode != 0
    assert not tag_exists(setup.registry, "backend/two")


def test_directory_down_cached_users_keep_working_and_nothing_5xx(
    tmp_path: Path, registry: Registry, directory: Directory
) -> None:
    metrics_port = free_port()
    gateway = start(tmp_path, registry, directory, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    metrics_host = f"127.0.0.1:{metrics_port}"
    try:
        host = gateway.host
        admin = ("admin", "admin-pw-1")
        assert http_request(host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
        assert json.loads(http_request(metrics_host, "GET", "/readyz")[2])["directory"] == "ok"
        image = tmp_path / "image"
        write_image(image, "1", layers=1, layer_bytes=4000)
        admin_auth = write_authfile(tmp_path / "admin.json", host, admin)
        alice_auth = write_authfile(tmp_path / "alice.json", host, ("alice", PASSWORDS["alice"]))
        assert skopeo_copy(f"oci:{image}:1", f"docker://{host}/backend/app:1", admin_auth).returncode == 0
        directory.stop()
        # alice's login is cached (2 s): she keeps pulling; bob's is not: refused, never a 5xx.
        pulled = skopeo_copy(f"docker://{host}/backend/app:1", f"oci:{tmp_path / 'out'}:1", alice_auth)
        assert pulled.returncode == 0, pulled.stderr
        status, _, body = http_request(host, "GET", "/v2/", ("bob", PASSWORDS["bob"]))
        assert status == 401, body
        assert http_request(host, "GET", "/v2/", admin)[0] == 200  # htpasswd users do not need it
        deadline = time.monotonic() + 5
        while "directory" not in gateway.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = gateway.log.read_text()
        assert re.search(r"login of 'bob' refused: directory 127\.0\.0\.1:\d+ unavailable", log)
        exposition = http_request(metrics_host, "GET", "/metrics")[2].decode()
        assert "registry_gateway_directory_up 0.0" in exposition
        assert 'registry_gateway_auth_failures_total{reason="source_unavailable"} 1.0' in exposition
        status, _, body = http_request(metrics_host, "GET", "/readyz")
        assert status == 200 and json.loads(body)["directory"].startswith("unreachable: ")
        time.sleep(2.2)  # alice's cached login expires
        assert http_request(host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 401
        directory.start()
        assert http_request(host, "GET", "/v2/", ("bob", PASSWORDS["bob"]))[0] == 200
        assert http_request(host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
        exposition = http_request(metrics_host, "GET", "/metrics")[2].decode()
        assert "registry_gateway_directory_up 1.0" in exposition
    finally:
        stop(gateway.process)


@pytest.mark.parametrize("mode", ["always", "starttls"])
def test_tls_verifies_the_directory(
    tmp_path: Path, registry: Registry, directory: Directory, mode: str
) -> None:
    addr = directory.tls_addr if mode == "always" else directory.addr
    gateway = start(tmp_path, registry, directory, addr=addr, tls=mode, ca_certificate=str(directory.ca))
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
    finally:
        stop(gateway.process)
    # Without our CA the directory's certificate does not verify: refused, not trusted.
    other = tmp_path / "other"
    other.mkdir()
    gateway = start(other, registry, directory, addr=addr, tls=mode)
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 401
        assert "unavailable" in gateway.log.read_text()
    finally:
        stop(gateway.process)


def test_docker_cli_login_push_and_denied(setup: Setup, dockerd: Docker) -> None:
    host = setup.gateway.host
    config = setup.tmp / "docker-config"

    def cli(*args: str, stdin: str | None = None) -> tuple[int, str]:
        return dockerd.cli(config, *args, stdin=stdin)

    status, output = cli("login", "-u", "alice", "--password-stdin", host, stdin="wrong\n")
    assert status != 0, output
    status, output = cli("login", "-u", "alice", "--password-stdin", host, stdin=PASSWORDS["alice"] + "\n")
    assert status == 0, output
    allowed, denied = f"{host}/backend/cli:1", f"{host}/frontend/cli:1"
    dockerd.build_image(config, allowed, {"layer.bin": os.urandom(40_000)})
    status, output = cli("push", allowed)
    assert status == 0, output
    assert tag_exists(setup.registry, "backend/cli")
    assert cli("tag", allowed, denied)[0] == 0
    status, output = cli("push", denied)
    assert status != 0 and "denied" in output.lower(), output
    assert not tag_exists(setup.registry, "frontend/cli")
    cli("rmi", "-f", allowed, denied)
    assert cli("logout", host)[0] == 0


# docker_auth's ldap_auth section as its examples/reference.yml documents it, with the keys later
# versions added (ca_certificate, labels); and its older examples/ldap_auth.yml, with `method`.
DOCKER_AUTH_LDAP_EXAMPLE = """\
ldap_auth:
  # Addr is the hostname:port or ip:port
  addr: ldap.example.com:636
  # Setup tls connection method to be
  # "" or "none": the communication won't be encrypted
  # "always": setup LDAP over SSL/TLS
  # "starttls": sets StartTLS as the encryption method
  tls: always
  # set to true to allow insecure tls
  insecure_tls_skip_verify: false
  ca_certificate:
  # In case bind DN and password is required for querying user information,
  # specify them here. Plain text password is read from the file.
  bind_dn:
  bind_password_file:
  # User query settings. ${account} is expanded from auth request
  base: o=example.com
  filter: (&(uid=${account})(objectClass=person))
  labels:
    title:
      attribute: title
    groups:
      attribute: memberOf
      parse_cn: true
      lower_case: true
acl:
  - match: {account: "/.+/", name: "${labels:groups}/*"}
    actions: ["*"]
"""

DOCKER_AUTH_OLD_LDAP_EXAMPLE = """\
ldap_auth:
  addr: ldap.example.com:636
  # Setup connection method to be
  # plain: the communication won't be encrypted, if method is not set, default is plain
  # simple_tls
  # starttls
  method: simple_tls
  bind_dn:
  bind_password_file:
  base: o=example.com
  filter: (&(uid=${account})(objectClass=person))
acl:
  # This will allow authenticated users to pull/push
  - match:
      account: /.+/
    actions: ['*']
"""


def test_docker_auth_ldap_sections_parse_unchanged() -> None:
    import yaml

    policy = policyfile.parse(yaml.safe_load(DOCKER_AUTH_LDAP_EXAMPLE))
    assert policy.ldap is not None
    assert policy.ldap.url == "ldaps://ldap.example.com:636"
    assert policy.ldap.bind_dn is None and policy.ldap.ca_certificate is None
    assert policy.ldap.labels["groups"] == LabelSpec("memberOf", parse_cn=True, lower_case=True)
    assert policy.ldap.labels["title"] == LabelSpec("title")
    old = policyfile.parse(yaml.safe_load(DOCKER_AUTH_OLD_LDAP_EXAMPLE))
    assert old.ldap is not None and old.ldap.url == "ldaps://ldap.example.com:636"
    plain = policyfile.parse(yaml.safe_load(DOCKER_AUTH_OLD_LDAP_EXAMPLE.replace("simple_tls", "plain")))
    assert plain.ldap is not None and plain.ldap.url == "ldap://ldap.example.com:636"


def test_policy_explain_shows_the_directory_entry_and_its_labels(
    tmp_path: Path, directory: Directory
) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(ACL + ldap_section(directory, tmp_path))

    def explain(*args: str) -> subprocess.CompletedProcess[str]:
        # GATEWAY_HTPASSWD: explain looks users up in the htpasswd file first; this test's, not the machine's.
        return subprocess.run(
            [sys.executable, "-m", "gateway", "policy", "explain", *args, "--policy", str(policy)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GATEWAY_HTPASSWD": str(tmp_path / "htpasswd")},
        )

    alice = explain("alice", "backend/app", "push")
    assert alice.returncode == 0, alice.stderr
    assert alice.stdout.startswith("ALLOWED: alice push backend/app: by acl[1]")
    assert f"source: ldap_auth entry uid=alice,{ldap_server.PEOPLE}" in alice.stdout
    assert "labels: group=backend" in alice.stdout
    bob = explain("bob", "backend/app", "push")
    assert bob.returncode == 1 and "labels: group=frontend" in bob.stdout
    assert "DENIED: bob push backend/app" in bob.stdout
    nobody = explain("*)(uid=*", "backend/app", "pull")
    assert "logins would be refused" in nobody.stdout
    directory.stop()
    down = explain("alice", "backend/app", "push")
    assert "source: ldap_auth, but directory" in down.stdout and "unavailable" in down.stdout
    assert "Traceback" not in down.stderr


def test_initial_bind_as_user_with_a_dn_template(
    tmp_path: Path, registry: Registry, directory: Directory
) -> None:
    gateway = start(
        tmp_path,
        registry,
        directory,
        initial_bind_as_user=True,
        bind_dn=f"uid=${{account}},{ldap_server.PEOPLE}",
        bind_password_file=None,
    )
    try:
        host = gateway.host
        assert http_request(host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
        assert http_request(host, "GET", "/v2/", ("alice", "wrong"))[0] == 401
        # A name that would add DN parts binds as nobody.
        assert (
            http_request(host, "GET", "/v2/", (f"alice,{ldap_server.PEOPLE}", PASSWORDS["alice"]))[0] == 401
        )
    finally:
        stop(gateway.process)


def test_skipping_certificate_checks_works_and_is_said_loudly(
    tmp_path: Path, registry: Registry, directory: Directory
) -> None:
    gateway = start(
        tmp_path, registry, directory, addr=directory.tls_addr, tls="always", insecure_tls_skip_verify=True
    )
    try:
        # Said at start-up, before any login.
        assert (
            "insecure_tls_skip_verify is true: the directory's certificate is NOT verified"
            in gateway.log.read_text()
        )
        assert http_request(gateway.host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
    finally:
        stop(gateway.process)


def test_tokens_for_directory_users_carry_their_group_grants(
    tmp_path: Path, registry: Registry, directory: Directory
) -> None:
    import base64

    users = tmp_path / "htpasswd"
    htpasswd_add(users, "admin", "admin-pw-1", "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text(ACL + ldap_section(directory, tmp_path))
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users,
        "--policy",
        str(policy),
        env={"GATEWAY_CHALLENGE": "bearer", "GATEWAY_CACHE_TTL": "30"},
    )
    alice = ("alice", PASSWORDS["alice"])

    def token_for(scope: str) -> tuple[str, list[dict[str, object]]]:
        status, _, body = http_request(
            gateway.host, "GET", f"/token?service=registry-gateway&scope={scope}", alice
        )
        assert status == 200, body
        token = json.loads(body)["token"]
        payload = token.split(".")[1]
        return token, json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["access"]

    try:
        token, access = token_for("repository:backend/app:pull,push")
        assert access == [{"type": "repository", "name": "backend/app", "actions": ["pull", "push"]}]
        _, other = token_for("repository:frontend/app:pull,push")  # not her group: pull only
        assert other == [{"type": "repository", "name": "frontend/app", "actions": ["pull"]}]
        # The token is honoured on the API for what it grants, and refused beyond it.
        bearer = {"Authorization": f"Bearer {token}"}
        status, _, body = http_request(gateway.host, "POST", "/v2/backend/app/blobs/uploads/", headers=bearer)
        assert status == 202, body
        status, headers, _ = http_request(
            gateway.host, "POST", "/v2/frontend/app/blobs/uploads/", headers=bearer
        )
        assert status == 401 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
        assert not (registry.storage / "docker/registry/v2/repositories/frontend").exists()
        # A wrong directory password gets no token at all.
        status, _, _ = http_request(
            gateway.host,
            "GET",
            "/token?service=registry-gateway&scope=repository:backend/app:pull",
            ("alice", "x"),
        )
        assert status == 401
    finally:
        stop(gateway.process)


# --- docker_auth's reading of the section, and saying what is wrong ---------------------------


@pytest.mark.parametrize(
    ("tls", "addr", "url"),
    [
        (None, "ldap.example.com:389", "ldap://ldap.example.com:389"),  # docker_auth: plain
        (None, "ldap.example.com:636", "ldaps://ldap.example.com:636"),  # docker_auth: LDAPS on 636
        ("", "ldap.example.com:3890", "ldap://ldap.example.com:3890"),
        ("", "ldap.example.com:636", "ldaps://ldap.example.com:636"),
        ("none", "ldap.example.com:636", "ldap://ldap.example.com:636"),
        ("always", "ldap.example.com:389", "ldaps://ldap.example.com:389"),
    ],
)
def test_a_missing_tls_is_read_as_docker_auth_reads_it(tls: str | None, addr: str, url: str) -> None:
    section: dict[str, object] = {"addr": addr, "base": "dc=example,dc=com", "filter": "(uid=${account})"}
    if tls is not None:
        section["tls"] = tls
    policy = policyfile.parse({"acl": [], "ldap_auth": section})
    assert policy.ldap is not None and policy.ldap.url == url
    # Plain LDAP nobody asked for by name is said: passwords cross the network unencrypted.
    implicit_plain = tls in (None, "") and url.startswith("ldap:")
    assert any("ldap_auth.tls: not set, so plain LDAP" in w for w in policy.warnings) == implicit_plain


@pytest.mark.parametrize("key", ["group_filter", "group_base_dn"])
def test_group_search_keys_name_what_replaces_them(key: str) -> None:
    problems = _policy_problems(
        "acl: []\nldap_auth: {addr: 'ldap.example.com:636', base: 'dc=example,dc=com',"
        f" filter: '(uid=${{account}})', {key}: '(member=${{dn}})'}}\n"
    )
    [problem] = problems
    assert problem.startswith(f"ldap_auth.{key}: not a docker_auth ldap_auth key: ")
    assert "labels: {group: {attribute: memberOf, parse_cn: true}}" in problem
    assert "${labels:group}" in problem and "did you mean" not in problem


def check_config(tmp: Path, policy_text: str) -> subprocess.CompletedProcess[str]:
    users = tmp / "htpasswd"
    if not users.exists():
        htpasswd_add(users, "admin", "admin-pw-1", "-B")
    policy = tmp / "policy.yml"
    policy.write_text(policy_text)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "check-config",
            "--htpasswd",
            str(users),
            "--policy",
            str(policy),
            "--upstream",
            f"http://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )


def test_a_docker_auth_section_without_tls_logs_in_on_a_plain_port(
    tmp_path: Path, registry: Registry, directory: Directory
) -> None:
    """docker_auth reads no tls on port 389 as plain LDAP: so does the gateway, and check-config
    tries the bind and says so."""
    checked = check_config(tmp_path, ACL + ldap_section(directory, tmp_path, tls=None))
    assert checked.returncode == 0, checked.stderr
    assert f"the directory at {directory.addr} takes the service account's bind" in checked.stdout
    assert "ldap_auth.tls: not set, so plain LDAP" in checked.stderr
    gateway = start(tmp_path, registry, directory, tls=None)
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
        assert http_request(gateway.host, "GET", "/v2/", ("alice", "wrong"))[0] == 401
    finally:
        stop(gateway.process)


def test_check_config_tries_the_directory_bind_and_names_the_key(
    tmp_path: Path, directory: Directory
) -> None:
    # LDAPS against the plain-LDAP port: refused, with the key to change.
    tls = check_config(tmp_path, ACL + ldap_section(directory, tmp_path, tls="always"))
    assert tls.returncode == 1, tls.stdout
    assert (
        f"ldap_auth.tls: always (LDAPS), but {directory.addr} speaks plain LDAP: set tls: starttls"
        in tls.stderr
    )
    # A stale service password: bind_dn and bind_password_file named, the password not shown.
    stale = tmp_path / "stale.pw"
    stale.write_text("an-old-service-pw\n")
    refused = check_config(tmp_path, ACL + ldap_section(directory, tmp_path, bind_password_file=str(stale)))
    assert refused.returncode == 1, refused.stdout
    assert "the directory refused the service account (Invalid credentials" in refused.stderr
    assert f"check ldap_auth.bind_dn ({ldap_server.SERVICE_DN})" in refused.stderr
    assert f"the password in ldap_auth.bind_password_file ({stale})" in refused.stderr
    assert "an-old-service-pw" not in refused.stdout + refused.stderr
    # A directory that does not answer is a warning, as a registry that does not answer is.
    directory.stop()
    down = check_config(tmp_path, ACL + ldap_section(directory, tmp_path))
    assert down.returncode == 0, down.stderr
    assert f"warning: the directory: cannot connect to ldap://{directory.addr}" in down.stderr
    assert "Traceback" not in down.stderr


def test_log_lines_name_the_service_account_and_the_timeout(
    tmp_path: Path, registry: Registry, directory: Directory
) -> None:
    stale = tmp_path / "stale.pw"
    stale.write_text("an-old-service-pw\n")
    gateway = start(tmp_path, registry, directory, bind_password_file=str(stale))
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 401
        log = gateway.log.read_text()
        assert "the directory refused the service account (Invalid credentials" in log
        assert "check ldap_auth.bind_dn" in log and f"ldap_auth.bind_password_file ({stale})" in log
        assert "this is not about the user's password" in log and "an-old-service-pw" not in log
    finally:
        stop(gateway.process)
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    gateway = start(frozen, registry, directory, connect_timeout=1, operation_timeout=1)
    assert directory.process is not None
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("alice", PASSWORDS["alice"]))[0] == 200
        # The directory stops answering (frozen, its connections open): a search on the pooled
        # connection runs out of operation_timeout, a new connection out of connect_timeout.
        directory.process.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        assert http_request(gateway.host, "GET", "/v2/", ("bob", PASSWORDS["bob"]))[0] == 401
        assert http_request(gateway.host, "GET", "/v2/", ("carol", PASSWORDS["carol"]))[0] == 401
        log = gateway.log.read_text()
        assert "login of 'bob' refused: directory " in log
        assert "unavailable: no answer to the search within ldap_auth.operation_timeout (1 s)" in log
        assert (
            f"unavailable: no answer within ldap_auth.connect_timeout (1 s) connecting to "
            f"ldap://{directory.addr} (binding as the service account)" in log
        )
        assert "TimeoutError:" not in log
    finally:
        directory.process.send_signal(signal.SIGCONT)
        stop(gateway.process)
