"""`registry-gateway user ...` and `registry-gateway policy ...`: managing users and explaining rules."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import sys
from pathlib import Path
from typing import TextIO

from gateway import acl, config, htpasswd, immutable, policyfile, userfile
from gateway.identity import Labels, Unavailable, Unknown, merge_labels
from gateway.policy import acl_request


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = commands.add_parser("user", help="manage users in the htpasswd file")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    for name, help_text in (
        ("add", "add a user (bcrypt)"),
        ("passwd", "change a user's password"),
        ("remove", "remove a user"),
        ("verify", "check a user's password (exit 0 when right)"),
        ("list", "list users, their hash scheme, and weak hashes"),
    ):
        sub = user_commands.add_parser(name, help=help_text)
        if name != "list":
            sub.add_argument("name")
        sub.add_argument("--file", type=Path, help="htpasswd file (default: the configured one)")
        sub.add_argument("--config", type=Path, help="settings file to find the htpasswd file in")
        if name in ("add", "passwd", "verify"):
            sub.add_argument(
                "--password-stdin", action="store_true", help="read the password from standard input"
            )
        if name in ("add", "passwd"):
            sub.add_argument(
                "--cost",
                type=int,
                default=userfile.DEFAULT_COST,
                help=f"bcrypt cost (default {userfile.DEFAULT_COST})",
            )

    policy = commands.add_parser("policy", help="check the policy file or explain a decision")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate the policy file and warn about dead rules")
    explain = policy_commands.add_parser("explain", help="show which rule decides a request")
    explain.add_argument("user", help='user name ("" for anonymous)')
    explain.add_argument("repository", help='repository name, or "catalog"')
    explain.add_argument("action", choices=("pull", "push", "delete", "*"))
    explain.add_argument("--ip", default=None, help="client address to evaluate ip rules with")
    explain.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label the user's identity source gives (for ext_auth users; repeatable)",
    )
    explain.add_argument(
        "--tag", default=None, help="also say whether this tag of the repository is immutable"
    )
    for sub in (check, explain):
        sub.add_argument("--policy", type=Path, help="policy file (default: the configured one)")
        sub.add_argument("--config", type=Path, help="settings file to find the policy file in")


def _configured(args: argparse.Namespace) -> config.Settings:
    config_file = args.config
    if config_file is None and os.environ.get(config.ENV_PREFIX + "CONFIG"):
        config_file = Path(os.environ[config.ENV_PREFIX + "CONFIG"])
    return config.load(config_file, os.environ, {}, check_files=False)


def _read_password(args: argparse.Namespace, confirm: bool, stdin: TextIO) -> str:
    if args.password_stdin:
        # As docker login --password-stdin reads it: one line, without its "\n" or "\r\n".
        return stdin.readline().removesuffix("\n").removesuffix("\r")
    if not stdin.isatty():
        raise userfile.UserFileError("no terminal to ask for the password: use --password-stdin")
    try:
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Repeat password: ") != first:
            raise userfile.UserFileError("passwords do not match")
    except (EOFError, KeyboardInterrupt) as exc:
        # Ctrl-D or Ctrl-C at the prompt: the operator changed their mind, not a crash. getpass
        # leaves the cursor after the prompt; on a terminal the message goes on a line of its own.
        if sys.stderr.isatty():
            print(file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            raise PromptAbandoned("interrupted (Ctrl-C)", 130) from None  # 128 + SIGINT, as shells say
        raise PromptAbandoned("end of input (Ctrl-D)", 1) from None
    return first


class PromptAbandoned(Exception):
    """The password prompt was left with Ctrl-C or Ctrl-D: nothing was changed."""

    def __init__(self, how: str, exit_status: int) -> None:
        super().__init__(f"{how} at the password prompt: nothing changed")
        self.exit_status = exit_status


def run_user(args: argparse.Namespace, stdin: TextIO = sys.stdin) -> int:
    try:
        path = _users_file(args)
        command = args.user_command
        if command == "list":
            for name, stored in read_sorted(path):
                cost = f" cost {stored.bcrypt_cost}" if stored.bcrypt_cost is not None else ""
                weak = ""
                if stored.weak:
                    weak = "  WEAK: re-create with bcrypt (user passwd)"
                elif stored.bcrypt_cost is not None and stored.bcrypt_cost < userfile.DEFAULT_COST:
                    weak = f"  WEAK: cost below {userfile.DEFAULT_COST}, cheap to guess offline (user passwd)"
                print(f"{name}\t{stored.scheme}{cost}{weak}")
            return 0
        userfile.check_name(args.name)
        if command == "remove":
            userfile.remove_user(path, args.name)
            print(f"removed {args.name} from {path}")
            return 0
        if command == "verify":
            users = userfile.read_users(path).users
            password = _read_password(args, False, stdin)
            entry = users.get(args.name)
            if entry is not None and htpasswd.verify(password, entry):
                print(f"password for {args.name} is correct")
                return 0
            print(f"password for {args.name} is wrong, or no such user", file=sys.stderr)
            return 1
        password = _read_password(args, True, stdin)
        hashed = userfile.hash_password(password, args.cost)
        userfile.set_user(path, args.name, hashed, must_exist=command == "passwd")
        print(f"{'added' if command == 'add' else 'changed password of'} {args.name} in {path}")
        return 0
    except PromptAbandoned as exc:
        print(f"registry-gateway user: {exc}", file=sys.stderr)
        return exc.exit_status
    except (userfile.UserFileError, config.ConfigError, OSError) as exc:
        print(f"registry-gateway user: {exc}", file=sys.stderr)
        return 2


def _users_file(args: argparse.Namespace) -> Path:
    """The htpasswd file to work on; one that cannot exist is refused with a message saying where
    the choice came from and how to choose another."""
    if args.file is not None:
        return Path(args.file)
    settings = _configured(args)
    origin = {"default": "the default", "file": "the config file", "env": "GATEWAY_HTPASSWD"}.get(
        settings.origins.get("htpasswd", "default"), "the settings"
    )
    path = settings.htpasswd
    if not path.parent.is_dir():
        raise userfile.UserFileError(
            f"{path} (the htpasswd file, from {origin}) cannot be used: its folder {path.parent} does not "
            "exist. Choose the file with --file PATH, GATEWAY_HTPASSWD or htpasswd: in --config, or "
            f"create the folder (mkdir -p {path.parent})"
        )
    return path


def read_sorted(path: Path) -> list[tuple[str, htpasswd.StoredHash]]:
    return sorted(userfile.read_users(path).users.items())


def _policy_path(args: argparse.Namespace) -> Path:
    if args.policy is not None:
        return Path(args.policy)
    configured = _configured(args).policy
    if configured is None:
        raise policyfile.PolicyError(["no policy file: pass --policy or set policy / GATEWAY_POLICY"])
    return configured


def run_policy(args: argparse.Namespace) -> int:
    try:
        path = _policy_path(args)
        policy = policyfile.load(path)
    except (policyfile.PolicyError, config.ConfigError) as exc:
        problems = exc.problems
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"policy invalid: {len(problems)} problem(s)", file=sys.stderr)
        return 2
    for warning in policy.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.policy_command == "check":
        print(
            f"policy OK: {len(policy.acl)} rules, {len(policy.users)} static users, "
            f"{len(policy.accounts)} accounts with labels or expiry, "
            f"{len(policy.immutable)} immutable tag rules"
        )
        return 0
    extra: dict[str, tuple[str, ...]] = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--label {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        extra[key] = (*extra.get(key, ()), value)
    source, labels = _identity_of(policy, args, args.user)
    labels = merge_labels(policy.account(args.user).labels, labels, extra)
    status = _explain(policy, args.user, args.repository, args.action, args.ip, labels)
    print(f"  source: {source}")
    if labels:
        print("  labels: " + ", ".join(f"{key}={'|'.join(values)}" for key, values in sorted(labels.items())))
    if args.tag is not None:
        rule = immutable.rule_for(policy.immutable, args.repository, args.tag)
        if rule is None:
            print(f"  tag {args.tag}: mutable (no immutable: rule covers it)")
        else:
            print(
                f"  tag {args.tag}: immutable by {rule.describe()}: once pushed, a push of another "
                "manifest to it and a delete of it or of its manifest are refused"
            )
    return status


def _identity_of(policy: policyfile.Policy, args: argparse.Namespace, user: str) -> tuple[str, Labels]:
    """Which source would resolve `user`, in the gateway's order, and the labels it gives (the
    directory is searched as the service account; no password is checked)."""
    if user == "":
        return "anonymous", {}
    if user in policy.users:
        return "users: section of the policy file", {}
    users_path: Path | None = None
    try:
        users_path = _configured(args).htpasswd
        if users_path.is_file() and user in userfile.read_users(users_path).users:
            return f"htpasswd file {users_path}", {}
    except (config.ConfigError, userfile.UserFileError, OSError):
        pass
    if policy.ldap is not None:
        from gateway.identity.ldap import LdapSource

        async def find() -> tuple[str, Labels] | Unknown | Unavailable:
            directory = LdapSource(policy.ldap) if policy.ldap is not None else None
            if directory is None:
                return Unknown()
            try:
                return await directory.lookup(user)
            finally:
                await directory.close()

        found = asyncio.run(find())
        if isinstance(found, tuple):
            return f"ldap_auth entry {found[0]}", found[1]
        if isinstance(found, Unavailable):
            return f"ldap_auth, but {found.reason}", {}
    if policy.external is not None:
        return (
            f"ext_auth program {policy.external.command} (labels come with a login: give them with --label)",
            {},
        )
    where = f"the htpasswd file {users_path}" if users_path is not None else "the htpasswd file"
    return f"not in the policy's users:, {where} or a directory: logins would be refused", {}


def _explain(
    policy: policyfile.Policy,
    user: str,
    repository: str,
    action: str,
    ip: str | None,
    labels: Labels | None = None,
) -> int:
    anonymous = user == ""
    who = "anonymous" if anonymous else user
    if anonymous and not policy.anonymous:
        print(
            f'DENIED: {who} {action} {repository}: the users section has no "" entry, '
            "so requests without credentials are refused"
        )
        return 1
    account = policy.account(user)
    if not anonymous and account.expired(dt.datetime.now(dt.UTC)):
        print(f"DENIED: {who}: account expired on {account.expires}")
        return 1
    type_ = "registry" if repository == "catalog" else "repository"
    request = acl_request(
        policy, None if anonymous else user, type_, repository, frozenset({action}), ip, labels
    )
    verdict = acl.evaluate(policy.rules, request)
    if verdict.entry_index is None:
        if policy.ext_authz is not None and type_ == "repository":
            print(f"UNDECIDED: {who} {action} {repository}: no rule matched; the ext_authz program decides")
            return 1
        print(f"DENIED: {who} {action} {repository}: no rule matched")
        return 1
    rule = f"acl[{verdict.entry_index}]" + (f" ({verdict.comment})" if verdict.comment else "")
    if verdict.allows({action}):
        print(f"ALLOWED: {who} {action} {repository}: by {rule}")
        return 0
    print(f"DENIED: {who} {action} {repository}: {rule} matched but does not grant {action}")
    return 1
