"""External login programs (docker_auth's ext_auth): the section, then a real gateway running one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import textwrap
import time
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
    # The tests' own interpreter runs a Python program, never whichever python3 PATH finds first.
    path.write_text(text.replace("#!/usr/bin/env python3\n", f"#!{sys.executable}\n", 1))
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
    # With password "" the program would read "user pass " and accept: only our check refuses.
    assert http_request(host, "GET", "/v2/", ("user pass", ""))[0] == 401
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
            # The directory down is no reason to ask the program about alice (fail closed).
            directory.stop()
            assert http_request(host, "GET", "/v2/", ("alice", "pass"))[0] == 401
        finally:
            stop(gateway.process)
    finally:
        directory.stop()


# --- ext_authz: a program for what no ACL entry matches ----------------------------------------

AUTHZ_ACL = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "reader", name: "public/*"}
    actions: [pull]
"""


def authz_gateway(tmp_path: Path, registry: Registry, script: Path) -> Gateway:
    """admin and reader in htpasswd, AUTHZ_ACL, and `script` as the ext_authz program."""
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "admin", "admin-pw-1", "-B")
    htpasswd_add(users, "reader", "reader-pw-1", "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text(AUTHZ_ACL + f'ext_authz:\n  command: "{script}"\n')
    return start_gateway(tmp_path, registry.url, users, "--policy", str(policy))


def test_request_document_has_docker_auths_fields() -> None:
    from gateway import acl
    from gateway.external_authz import request_document

    asked = acl.Request(
        "reader",
        "repository",
        "granted/app",
        frozenset({"push", "pull"}),
        "10.0.0.1",
        "registry",
        {"team": ("x",)},
    )
    assert json.loads(request_document(asked)) == {
        "Account": "reader",
        "Type": "repository",
        "Name": "granted/app",
        "Email": "",
        "Service": "registry",
        "IP": "10.0.0.1",
        "Actions": ["pull", "push"],
        "Labels": {"team": ["x"]},
    }


def test_ext_authz_decides_what_no_entry_matches(tmp_path: Path, registry: Registry) -> None:
    calls = tmp_path / "calls.jsonl"
    script = program(
        tmp_path,
        "authz.py",
        textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import json, sys
        asked = json.loads(sys.stdin.read())
        with open({str(calls)!r}, "a") as out:
            out.write(json.dumps(asked) + "\\n")
        if asked["Name"].startswith("broken/"):
            print("cannot decide", file=sys.stderr)
            sys.exit(3)
        sys.exit(0 if asked["Account"] == "reader" and asked["Name"].startswith("granted/") else 1)
        """),
    )
    gateway = authz_gateway(tmp_path, registry, script)
    try:
        host = gateway.host
        image = tmp_path / "image"
        write_image(image, "1", layers=1, layer_bytes=3000)
        admin = write_authfile(tmp_path / "admin.json", host, ("admin", "admin-pw-1"))
        reader = write_authfile(tmp_path / "reader.json", host, ("reader", "reader-pw-1"))
        assert skopeo_copy(f"oci:{image}:1", f"docker://{host}/public/app:1", admin).returncode == 0
        assert not calls.exists()  # the ACL decided everything so far
        # The program grants reader granted/*, push included, which no entry does.
        pushed = skopeo_copy(f"oci:{image}:1", f"docker://{host}/granted/app:1", reader)
        assert pushed.returncode == 0, pushed.stderr
        assert (registry.storage / "docker/registry/v2/repositories/granted/app/_manifests/tags/1").exists()
        first = json.loads(calls.read_text().splitlines()[0])
        assert first["Account"] == "reader" and first["Type"] == "repository" and first["IP"] == "127.0.0.1"
        # ... and denies the rest: nothing reaches the registry.
        refused = skopeo_copy(f"oci:{image}:1", f"docker://{host}/other/app:1", reader)
        assert refused.returncode != 0
        assert not (registry.storage / "docker/registry/v2/repositories/other").exists()
        # A failing program denies (fail closed), logged, never a 5xx.
        status, _, body = http_request(host, "HEAD", "/v2/broken/app/manifests/1", ("reader", "reader-pw-1"))
        assert status == 403, body
        assert (
            "ext_authz failed for reader broken/app: exited with 3: cannot decide" in gateway.log.read_text()
        )
        # Answers are cached: a new question runs the program once, its repeats not again.
        before = len(calls.read_text().splitlines())
        for _ in range(3):
            assert (
                http_request(host, "HEAD", "/v2/fresh/app/manifests/1", ("reader", "reader-pw-1"))[0] == 403
            )
        assert len(calls.read_text().splitlines()) == before + 1
        # The ACL still decides first: reader pulls public/* without asking the program.
        assert (
            skopeo_copy(f"docker://{host}/public/app:1", f"oci:{tmp_path / 'out'}:1", reader).returncode == 0
        )
        assert all(
            not json.loads(line)["Name"].startswith("public/") for line in calls.read_text().splitlines()
        )
    finally:
        stop(gateway.process)


# docker_auth's examples/my_authz.sh, as its documentation gives it: it denies everything.
DOCKER_AUTH_MY_AUTHZ_SH = "#!/bin/sh\n#\n# Example external authz `ext_authz`.\n#\n\nread j;\n\n\nexit 1\n"


def test_docker_auth_example_authz_program_works_unchanged(tmp_path: Path, registry: Registry) -> None:
    script = program(tmp_path, "my_authz.sh", DOCKER_AUTH_MY_AUTHZ_SH)
    gateway = authz_gateway(tmp_path, registry, script)
    try:
        status, _, _ = http_request(
            gateway.host, "HEAD", "/v2/other/app/manifests/1", ("reader", "reader-pw-1")
        )
        assert status == 403
        assert http_request(gateway.host, "GET", "/v2/", ("reader", "reader-pw-1"))[0] == 200
    finally:
        stop(gateway.process)


def test_policy_explain_takes_a_programs_labels(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = program(tmp_path, "ext_auth.sh", DOCKER_AUTH_EXT_AUTH_SH)
    policy = tmp_path / "policy.yml"
    policy.write_text(ACL + f'ext_auth:\n  command: "{script}"\n')
    base = [
        sys.executable,
        "-m",
        "gateway",
        "policy",
        "explain",
        "bofh",
        "vip/app",
        "push",
        "--policy",
        str(policy),
    ]
    # GATEWAY_HTPASSWD: explain looks users up in the htpasswd file first; this test's, not the machine's.
    own = {**os.environ, "GATEWAY_HTPASSWD": str(tmp_path / "htpasswd")}
    without = subprocess.run(base, capture_output=True, text=True, timeout=60, env=own)
    assert without.returncode == 1 and "source: ext_auth program" in without.stdout
    given = subprocess.run(
        [*base, "--label", "level=max"], capture_output=True, text=True, timeout=60, env=own
    )
    assert given.returncode == 0 and given.stdout.startswith("ALLOWED: bofh push vip/app: by acl[0]")
    assert "labels: level=max" in given.stdout


def test_ext_authz_grants_token_scopes_no_entry_matches(tmp_path: Path, registry: Registry) -> None:
    import base64

    script = program(
        tmp_path,
        "authz.py",
        textwrap.dedent("""\
        #!/usr/bin/env python3
        import json, sys
        asked = json.loads(sys.stdin.read())
        sys.exit(0 if asked["Account"] == "reader" and asked["Name"].startswith("granted/") else 1)
        """),
    )
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "reader", "reader-pw-1", "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text(AUTHZ_ACL + f'ext_authz:\n  command: "{script}"\n')
    gateway = start_gateway(
        tmp_path, registry.url, users, "--policy", str(policy), env={"GATEWAY_CHALLENGE": "bearer"}
    )
    reader = ("reader", "reader-pw-1")

    def token_for(scope: str) -> tuple[str, list[dict[str, object]]]:
        status, _, body = http_request(
            gateway.host, "GET", f"/token?service=registry-gateway&scope={scope}", reader
        )
        assert status == 200, body
        token = json.loads(body)["token"]
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return token, claims["access"]

    try:
        token, access = token_for("repository:granted/app:pull,push")
        assert access == [{"type": "repository", "name": "granted/app", "actions": ["pull", "push"]}]
        _, denied = token_for("repository:other/app:pull")
        assert denied == []
        _, by_acl = token_for("repository:public/app:pull,push")  # an entry matched: the ACL alone
        assert by_acl == [{"type": "repository", "name": "public/app", "actions": ["pull"]}]
        # The token works on the registry API: the request reaches the registry (404, no manifest).
        status, _, body = http_request(
            gateway.host, "HEAD", "/v2/granted/app/manifests/1", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 404, body
        status, headers, _ = http_request(
            gateway.host, "HEAD", "/v2/other/app/manifests/1", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 401 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    finally:
        stop(gateway.process)


# --- a program's children end with it ---------------------------------------------------------

# Each branch starts a child that sleeps far past the 1 s timeout, its PID in {pids}/USER: in the
# foreground (a hung curl), left behind after a decision (still holding standard output), or in a
# session of its own (setsid: out of the program's process group, still holding it).
CHILDREN_SH = """\
#!/bin/sh
read u p
case "$u" in
  hang) sh -c 'echo $$ > "$0"; exec sleep 20' "{pids}/$u" ;;
  leave) sleep 20 & echo $! > "{pids}/$u"; echo '{{"labels": {{"level": ["max"]}}}}'; exit 0 ;;
  escape)
    setsid sh -c 'echo $$ > "$0"; exec sleep 20' "{pids}/$u" &
    until [ -s "{pids}/$u" ]; do sleep 0.05; done  # in its own session by then
    echo '{{"labels": {{"level": ["max"]}}}}'; exit 0 ;;
esac
exit 1
"""


def child_pid(pids: Path, name: str) -> int:
    return int((pids / name).read_text())


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to read its status has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def ended(pid: int) -> bool:
    deadline = time.monotonic() + 3
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def timed_request(host: str, method: str, path: str, credentials: tuple[str, str]) -> tuple[int, float]:
    started = time.monotonic()
    status = http_request(host, method, path, credentials)[0]
    return status, time.monotonic() - started


def test_a_programs_children_do_not_outlive_its_timeout_or_hold_the_login(
    tmp_path: Path, registry: Registry
) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    script = program(tmp_path, "children.sh", CHILDREN_SH.format(pids=pids))
    gateway = start(tmp_path, registry, f'ext_auth:\n  command: "{script}"\n  timeout: 1\n')
    escaped = None
    try:
        # The program is killed at its timeout, and its child with it: the login waits 1 s, not 20.
        status, took = timed_request(gateway.host, "GET", "/v2/", ("hang", "pw"))
        assert status == 401 and took < 3, (status, took)
        assert ended(child_pid(pids, "hang"))
        assert "did not finish in 1 s" in gateway.log.read_text()
        # A program that decided and left a child behind: its decision counts, now, and the child
        # that still held its standard output is ended.
        status, took = timed_request(gateway.host, "GET", "/v2/", ("leave", "pw"))
        assert status == 200 and took < 1, (status, took)
        assert ended(child_pid(pids, "leave"))
        # A child in a session of its own is out of reach, but its open pipe holds nothing up.
        status, took = timed_request(gateway.host, "GET", "/v2/", ("escape", "pw"))
        escaped = child_pid(pids, "escape")
        assert status == 200 and took < 1, (status, took)
        assert alive(escaped)
    finally:
        stop(gateway.process)
        if escaped is not None and alive(escaped):
            os.kill(escaped, signal.SIGKILL)


def test_an_authz_programs_children_do_not_outlive_its_timeout(tmp_path: Path, registry: Registry) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    script = program(
        tmp_path,
        "authz.sh",
        f"#!/bin/sh\nread j\nsh -c 'echo $$ > \"$0\"; exec sleep 20' {pids}/hang\nexit 0\n",
    )
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "reader", "reader-pw-1", "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text(AUTHZ_ACL + f'ext_authz:\n  command: "{script}"\n  timeout: 1\n')
    gateway = start_gateway(tmp_path, registry.url, users, "--policy", str(policy))
    try:
        status, took = timed_request(
            gateway.host, "HEAD", "/v2/other/app/manifests/1", ("reader", "reader-pw-1")
        )
        assert status == 403 and took < 3, (status, took)  # failed closed at the timeout
        assert ended(child_pid(pids, "hang"))
        assert "ext_authz failed for reader other/app: " in gateway.log.read_text()
    finally:
        stop(gateway.process)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_program_ends_the_group_on_either_event_loop(tmp_path: Path, loop: str) -> None:
    """The gateway runs on uvloop when installed, else on asyncio's loop, whose Process.wait()
    also waits for the pipes (CPython gh-119710): a hung child held a login 20 s there."""
    import asyncio

    from gateway.identity.external import ExternalSettings, run_program

    pids = tmp_path / "pids"
    pids.mkdir()
    script = program(tmp_path, "children.sh", CHILDREN_SH.format(pids=pids))
    settings = ExternalSettings(str(script), (), 1.0)

    async def timed(user: str) -> tuple[object, float]:
        started = time.monotonic()
        try:
            result: object = await run_program(settings, f"{user} pw".encode())
        except Exception as exc:  # the failure is the result here
            result = exc
        return result, time.monotonic() - started

    async def main() -> None:
        failed, took = await timed("hang")
        assert "did not finish in 1 s" in str(failed) and took < 2.5, (failed, took)
        assert ended(child_pid(pids, "hang"))
        decided, took = await timed("leave")
        assert decided == (0, b'{"labels": {"level": ["max"]}}\n', b"") and took < 1, (decided, took)
        assert ended(child_pid(pids, "leave"))

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


# docker_auth's examples/ext_auth.sh as it is now (since its commit cfe7979): `#!/bin/sh`, with
# bash's `==` in `[ ]`. busybox's sh (docker_auth's Alpine image) takes `==`; dash, the /bin/sh of
# the gateway's Debian image, does not: every `[` fails, and the script denies everyone.
DOCKER_AUTH_EXT_AUTH_SH_NOW = DOCKER_AUTH_EXT_AUTH_SH.replace("#!/bin/bash", "#!/bin/sh", 1)


def under_dash(text: str) -> str:
    """The script as the image runs it: its `#!/bin/sh` is dash (as here on Debian, or named)."""
    if Path("/bin/sh").resolve().name == "dash":
        return text
    dash = shutil.which("dash")
    assert dash is not None, "dash is required (apt-get install dash)"
    return text.replace("#!/bin/sh", f"#!{dash}", 1)


def test_docker_auths_current_example_under_dash_says_why_it_denies_and_the_fix_works(
    tmp_path: Path, registry: Registry
) -> None:
    script = program(tmp_path, "ext_auth.sh", under_dash(DOCKER_AUTH_EXT_AUTH_SH_NOW))
    gateway = start(tmp_path, registry, f'ext_auth:\n  command: "{script}"\n')
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("user", "pass"))[0] == 401
        log = gateway.log.read_text()
        assert f"ext_auth: {script} exited with 1 for 'user' and wrote on standard error: " in log
        # dash's complaints about both `[`, on the one log line.
        assert "8: [: user: unexpected operator; " in log and "12: [: user: unexpected operator\n" in log
    finally:
        stop(gateway.process)
    # The change docs/authentication.md gives: `=` for `==` (POSIX test), and it runs under dash.
    program(tmp_path, "ext_auth.sh", under_dash(DOCKER_AUTH_EXT_AUTH_SH_NOW.replace(" == ", " = ")))
    gateway = start(tmp_path, registry, f'ext_auth:\n  command: "{script}"\n')
    try:
        assert http_request(gateway.host, "GET", "/v2/", ("user", "pass"))[0] == 200
        assert http_request(gateway.host, "GET", "/v2/", ("bofh", "LART"))[0] == 200
        assert http_request(gateway.host, "GET", "/v2/", ("bofh", "wrong"))[0] == 401
        assert "wrote on standard error" not in gateway.log.read_text()
    finally:
        stop(gateway.process)
