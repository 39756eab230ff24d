"""Robot accounts, without a server: scopes and durations as the CLI reads them, what a robot may
do (its scopes against the policy's decision, as tables), the robots file (keyed hashes, never a
secret; concurrent `robot create` runs losing nothing; errors named by key), and the CLI."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from gateway import htpasswd, pipeline, policyfile, robots
from gateway.pipeline import Identity
from gateway.policy import Outcome
from gateway.robots import Robot, RobotsError
from gateway.routes import Operation, parse_request
from gateway.state import Snapshot
from gateway.tokens.grants import grant, within
from gateway.tokens.scopes import Scope

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
DIGEST = "sha256:" + "a" * 64
STORED = "hmac-sha256:" + "A" * 22 + ":" + "B" * 43  # a well-formed keyed hash


def op(method: str, target: str) -> Operation:
    parsed = parse_request(method, target)
    assert isinstance(parsed, Operation), parsed
    return parsed


def robot(*scopes: str, name: str = "ci", expires: dt.datetime | None = None) -> Robot:
    return Robot(name, b"s" * 16, b"d" * 32, robots.parse_scopes(scopes), MappingProxyType({}), NOW, expires)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("repository:ci/*:pull,push", None),
        ("repository:ci/app:*", None),
        ("registry:catalog:*", None),
        ("repository:ci/*", "expected TYPE:NAME:ACTIONS"),
        ("repository:ci/*:fly", "unknown action 'fly'"),
        ("registry:other:*", "registry:catalog:*"),
        ("volume:x:pull", "expected TYPE:NAME:ACTIONS"),
        ("repository:CI/App:pull", "not a repository name or glob"),
        ("repository:ci/[:pull", "glob"),
    ],
)
def test_scopes_as_the_cli_reads_them(text: str, problem: str | None) -> None:
    if problem is None:
        assert str(robots.parse_scopes([text])[0]) == str(robots.parse_scopes([text])[0])
    else:
        with pytest.raises(RobotsError, match=problem.replace("[", r"\[").replace("*", r"\*")):
            robots.parse_scopes([text])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("2w", 14 * 86400), ("5s", 5), ("never", None)],
)
def test_durations(text: str, seconds: int | None) -> None:
    lifetime = robots.parse_duration(text)
    assert (lifetime.total_seconds() if lifetime else None) == seconds


@pytest.mark.parametrize("text", ["0d", "30", "d", "1y", "-3d", "3 d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(RobotsError, match="--expires"):
        robots.parse_duration(text)


@pytest.mark.parametrize(
    ("scopes", "type_", "name", "actions", "allowed"),
    [
        (["repository:ci/*:pull,push"], "repository", "ci/app", {"pull", "push"}, {"pull", "push"}),
        (["repository:ci/*:pull,push"], "repository", "ci/app", {"delete"}, set()),
        (["repository:ci/*:pull,push"], "repository", "ci/a/b", {"pull"}, set()),  # * stops at /
        (["repository:ci/*:pull,push"], "repository", "prod/app", {"pull"}, set()),
        (["repository:ci/*:pull", "repository:ci/app:push"], "repository", "ci/app", {"pull", "push"},
         {"pull", "push"}),
        (["repository:ci/app:*"], "repository", "ci/app", {"pull", "delete"}, {"pull", "delete"}),
        (["repository:ci/*:pull"], "registry", "catalog", {"*"}, set()),
        (["registry:catalog:*"], "registry", "catalog", {"*"}, {"*"}),
    ],
)  # fmt: skip
def test_what_a_robots_scopes_allow(
    scopes: list[str], type_: str, name: str, actions: set[str], allowed: set[str]
) -> None:
    assert robot(*scopes).allowed(type_, name, frozenset(actions)) == allowed


ALLOW_ALL = policyfile.parse({"acl": [{"match": {"account": "/.+/"}, "actions": ["*"]}]}, "policy.yml")
READ_ONLY = policyfile.parse({"acl": [{"match": {"account": "/.+/"}, "actions": ["pull"]}]}, "policy.yml")
DUMMY = htpasswd.make_dummy(4)
CI = robot("repository:ci/*:pull,push")


def snapshot(policy: policyfile.Policy | None) -> Snapshot:
    return Snapshot(MappingProxyType({}), policy, 1, DUMMY, MappingProxyType({CI.account: CI}))


@pytest.mark.parametrize(
    ("policy", "method", "target", "outcome", "reason"),
    [
        (ALLOW_ALL, "PUT", "/v2/ci/app/manifests/1", Outcome.ALLOW, "granted"),
        (ALLOW_ALL, "GET", "/v2/ci/app/manifests/1", Outcome.ALLOW, "granted"),
        (ALLOW_ALL, "DELETE", "/v2/ci/app/manifests/" + DIGEST, Outcome.DENY, "outside robot ci's scopes"),
        (ALLOW_ALL, "GET", "/v2/prod/app/manifests/1", Outcome.DENY, "outside robot ci's scopes"),
        (READ_ONLY, "PUT", "/v2/ci/app/manifests/1", Outcome.DENY, "rule grants too little"),  # policy's say
        (READ_ONLY, "GET", "/v2/ci/app/manifests/1", Outcome.ALLOW, "granted"),
        (None, "PUT", "/v2/ci/app/manifests/1", Outcome.DENY, "read-only user"),  # robot+ is no admin
        (None, "GET", "/v2/ci/app/manifests/1", Outcome.ALLOW, "read access for authenticated users"),
        (None, "GET", "/v2/prod/app/manifests/1", Outcome.DENY, "outside robot ci's scopes"),
        (ALLOW_ALL, "GET", "/v2/_catalog", Outcome.ALLOW, "catalog filtered to what the robot may pull"),
        (ALLOW_ALL, "GET", "/v2/", Outcome.ALLOW, "any authenticated user may check its login"),
    ],
)  # fmt: skip
def test_a_robot_gets_the_policys_decision_within_its_scopes(
    policy: policyfile.Policy | None, method: str, target: str, outcome: Outcome, reason: str
) -> None:
    decision = pipeline.decide(
        snapshot(policy), "admin", Identity(CI.account), op(method, target), "10.0.0.1"
    )
    assert (decision.outcome, decision.reason) == (outcome, reason)


def test_a_robot_mounts_only_from_where_it_may_pull() -> None:
    mount = "/v2/ci/app/blobs/uploads/?mount=sha256:" + "a" * 64 + "&from="
    inside = pipeline.decide(
        snapshot(ALLOW_ALL), "admin", Identity(CI.account), op("POST", mount + "ci/base"), ""
    )
    outside = pipeline.decide(
        snapshot(ALLOW_ALL), "admin", Identity(CI.account), op("POST", mount + "prod/x"), ""
    )
    assert inside.allowed and not inside.drop_mount
    assert outside.allowed and outside.drop_mount


def test_the_catalog_a_robot_sees() -> None:
    visible = pipeline.pullable(snapshot(ALLOW_ALL), "admin", Identity(CI.account), "")
    assert [n for n in ("ci/app", "ci/x/y", "prod/app") if visible(n)] == ["ci/app"]


def test_a_robots_token_grants_within_its_scopes() -> None:
    asked = [
        Scope("repository", "ci/app", frozenset({"pull", "push", "delete"})),
        Scope("repository", "prod/app", frozenset({"pull"})),
    ]
    granted = within(grant(asked, CI.account, ALLOW_ALL, "admin", None), CI)
    assert [str(s) for s in granted] == ["repository:ci/app:pull,push"]


def test_a_robot_expires() -> None:
    ended = robot("repository:ci/*:pull", expires=NOW)
    later = Snapshot(MappingProxyType({}), None, 1, DUMMY, MappingProxyType({ended.account: ended}))
    assert later.account(ended.account).expired(NOW)
    assert not later.account(ended.account).expired(NOW - dt.timedelta(seconds=1))
    assert later.account(ended.account).labels["robot"] == ("ci",)


# --- the file -----------------------------------------------------------------------------------


def test_create_rotate_revoke_keep_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "robots.yml"
    scopes = robots.parse_scopes(["repository:ci/*:pull,push"])
    secret = robots.create(path, "ci", scopes, dt.timedelta(days=30), {"team": ("ci",)}, NOW)
    assert secret.startswith("rgw_") and len(secret) > 40
    assert secret not in path.read_text()
    found = robots.read(path)["robot+ci"]
    assert found.matches(secret) and not found.matches(secret + "x") and not found.matches("")
    assert found.expires == NOW + dt.timedelta(days=30) and found.labels == {"team": ("ci",)}
    with pytest.raises(RobotsError, match="exists already"):
        robots.create(path, "ci", scopes, None, {}, NOW)

    rotated = robots.rotate(path, "ci", NOW + dt.timedelta(hours=1))
    again = robots.read(path)["robot+ci"]
    assert again.matches(rotated) and not again.matches(secret)
    assert again.expires == found.expires and again.scopes == found.scopes

    robots.revoke(path, "ci")
    assert robots.read(path) == {}
    with pytest.raises(RobotsError, match="no robot 'ci'"):
        robots.revoke(path, "ci")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("robots: [a]", "robots: expected a mapping of robot names"),
        ("robots:\n  ci: {secret: x, scopes: []}", "robots.ci: secret: expected hmac-sha256"),
        ("robots:\n  Bad Name: {}", "robots.Bad Name: invalid robot name"),
        ("robots:\n  ci: {secret: '" + STORED + "', scopes: [], created: x}",
         "robots.ci: a robot needs at least one --scope"),
        ("robots:\n  ci: {secret: '" + STORED + "', scopes: ['repository:a:pull'], created: '2026-01-01'}",
         "robots.ci: created: '2026-01-01' has no time zone"),
        ("robots:\n  ci: {colour: red}", "robots.ci: unknown key 'colour'"),
        ("users: {}", "expected a mapping with one key, robots"),
    ],
)  # fmt: skip
def test_a_bad_robots_file_is_refused_by_key(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(RobotsError) as refused:
        robots.parse(text, "robots.yml")
    assert str(refused.value).startswith("robots.yml: ") and problem in str(refused.value), refused.value


def test_concurrent_creates_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "robots.yml"

    def create(i: int) -> subprocess.Popen[str]:
        command = ["robot", "create", f"ci{i}", "--scope", f"repository:ci{i}/*:pull", "--file", str(path)]
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    runs = [create(i) for i in range(12)]
    secrets = {}
    for i, run in enumerate(runs):
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        secrets[f"robot+ci{i}"] = out.strip()
    found = robots.read(path)
    assert set(found) == set(secrets)
    assert all(found[account].matches(secret) for account, secret in secrets.items())


def test_the_cli_prints_the_secret_once_and_lists_without_it(tmp_path: Path) -> None:
    path = tmp_path / "robots.yml"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "robot", *args, "--file", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    made = cli(
        "create", "ci", "--scope", "repository:ci/*:pull,push", "--expires", "30d", "--label", "team=ci"
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("rgw_") and "\n" not in secret
    assert "robot+ci" in made.stderr and secret not in made.stderr
    listed = cli("list")
    assert listed.returncode == 0 and secret not in listed.stdout
    line = listed.stdout.splitlines()[1].split("\t")
    assert line[0] == "ci" and line[1] == "repository:ci/*:pull,push" and line[4] == "never"
    used = tmp_path / "state" / "robots-used.json"
    used.parent.mkdir()
    robots.record_use(used, "ci", NOW)
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "robot", "list", "--file", str(path)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "GATEWAY_ROBOTS_LAST_USED": str(used)},
    )  # fmt: skip
    assert listed.stdout.splitlines()[1].split("\t")[4] == "2026-12-07T12:00:00Z", listed.stderr
    assert json.loads(used.read_text()) == {"ci": "2026-12-07T12:00:00Z"}
    assert used.stat().st_mode & 0o777 == 0o640
    refused = cli("create", "ci2", "--scope", "repository:ci/*:fly")
    assert (
        refused.returncode == 2
        and "unknown action 'fly'" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    assert cli("rotate", "nobody").stderr.strip() == "registry-gateway robot: no robot 'nobody'"


def test_revoke_and_rotate_void_the_robots_tokens_where_revocations_go(tmp_path: Path) -> None:
    from gateway.tokens import revocations

    path, revoked = tmp_path / "robots.yml", tmp_path / "revoked"
    robots.create(path, "ci", robots.parse_scopes(["repository:ci/*:pull"]), None, {}, NOW)
    environment = {"PATH": "/usr/bin:/bin", "GATEWAY_TOKEN_REVOCATIONS": str(revoked)}
    for command in ("rotate", "revoke"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "robot", command, "ci", "--file", str(path)],
            capture_output=True, text=True, timeout=60, env=environment,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"its tokens until now are revoked ({revoked}" in done.stderr
    assert set(revocations.read(revoked)) == {"robot+ci"}


def test_recording_a_use_replaces_a_symlink_and_never_follows_it(tmp_path: Path) -> None:
    victim = tmp_path / "token.key"
    victim.write_text("a key\n")
    victim.chmod(0o600)
    used = tmp_path / "robots-used.json"
    used.symlink_to(victim)
    robots.record_use(used, "ci", NOW)
    assert victim.read_text() == "a key\n"
    assert not used.is_symlink() and json.loads(used.read_text()) == {"ci": "2026-12-07T12:00:00Z"}


ACL_TEXT = 'acl:\n  - match: {account: admin}\n    actions: ["*"]\n'


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("htpasswd", None),
        ("policy", ACL_TEXT + "accounts:\n  robot+ci: {expires: 2020-01-01}\n"),
        ("policy", ACL_TEXT + 'groups:\n  ops: ["robot+ci"]\n'),
    ],
)  # fmt: skip
def test_robot_names_are_robots_alone(tmp_path: Path, where: str, text: str | None) -> None:
    from gateway import state

    users = tmp_path / "htpasswd"
    users.write_text("robot+ci:$2y$05$" + "a" * 53 + "\n" if text is None else "")
    policy = None
    if text is not None:
        policy = tmp_path / "policy.yml"
        policy.write_text(text)
    with pytest.raises(state.StateError) as refused:
        state.build(users, policy)
    assert refused.value.by_key[0][0] == where and "'robot+ci': names starting with 'robot+'" in str(
        refused.value
    )


def test_a_robots_file_that_breaks_on_reload_means_no_robots_and_the_rest_reloads(tmp_path: Path) -> None:
    import time

    from gateway.state import AccessStore

    users, path = tmp_path / "htpasswd", tmp_path / "robots.yml"
    users.write_text("alice:$2y$05$" + "a" * 53 + "\n")
    robots.create(path, "ci", robots.parse_scopes(["repository:ci/*:pull"]), None, {}, NOW)
    store = AccessStore(users, robots_path=path)
    assert set(store.snapshot.robots) == {"robot+ci"}
    time.sleep(0.01)
    path.write_text("robots: [broken]\n")
    users.write_text("bob:$2y$05$" + "a" * 53 + "\n")
    assert store.reload_if_changed(force=True)
    assert store.snapshot.robots == {} and set(store.snapshot.users) == {"bob"}
    assert store.stale_since is not None and "robots.yml: cannot be used" in str(store.stale_problem)
    path.write_text("robots: {}\nextra: 1\n")
    with pytest.raises(Exception, match="robots"):
        AccessStore(users, robots_path=path)  # at start: refused, naming it


def test_labels_named_robot_come_from_the_robots_file_alone() -> None:
    from gateway.identity import Verified
    from gateway.login import LoggedIn, logged_in

    person = logged_in(Verified("jane", {"robot": ("ci",), "team": ("a",)}, "program"), snapshot(ALLOW_ALL))
    assert isinstance(person, LoggedIn) and dict(person.labels) == {"team": ("a",)}
    machine = logged_in(Verified(CI.account, CI.account_labels(), "robot"), snapshot(ALLOW_ALL))
    assert isinstance(machine, LoggedIn) and machine.labels["robot"] == ("ci",)
