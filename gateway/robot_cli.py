"""`registry-gateway robot create|list|rotate|revoke`: robot accounts for CI (gateway.robots).

The secret is printed once, on standard output, and never again: not by `list`, not in a log,
not in an argument (nothing reads it from argv; `create` makes it). Runs on the machine that
holds the robots file, as whoever may write it: there is no HTTP API that makes robots, so a
robot's credentials can never make another robot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from gateway import config, robots
from gateway.identity import Labels
from gateway.revoking import RevokeError, revoke_everywhere


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    robot = commands.add_parser("robot", help="manage robot accounts (machine credentials for CI)")
    robot_commands = robot.add_subparsers(dest="robot_command", required=True)
    create = robot_commands.add_parser("create", help="make a robot and print its secret, once")
    create.add_argument("name", help="the robot's name; it logs in as robot+NAME")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="SCOPE",
        help="what it may do, in the token spec's form with a glob: repository:ci/*:pull,push (repeatable)",
    )
    create.add_argument(
        "--expires", default="90d", help="lifetime: 30d, 12h, 90m, 2w, or never (default 90d)"
    )
    create.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label the ACL sees (repeatable)"
    )
    robot_commands.add_parser("list", help="list robots: scopes, created, expires, last used")
    for name, help_text in (
        ("rotate", "give a robot a new secret (printed once); the old one stops working"),
        ("revoke", "remove a robot: its secret and tokens stop working"),
    ):
        sub = robot_commands.add_parser(name, help=help_text)
        sub.add_argument("name")
    for sub in robot_commands.choices.values():
        sub.add_argument("--file", type=Path, help="robots file (default: the configured `robots`)")
        sub.add_argument("--config", type=Path, help="settings file to find the robots file in")


def run(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    try:
        path = _robots_file(args)
        command = args.robot_command
        if command == "create":
            scopes = robots.parse_scopes(args.scope)
            lifetime = robots.parse_duration(args.expires)
            secret = robots.create(
                path, robots.check_name(args.name), scopes, lifetime, _labels(args.label), now
            )
            _print_secret(args.name, secret, path)
        elif command == "rotate":
            _print_secret(args.name, robots.rotate(path, args.name, now), path)
            _revoke_tokens(args)
        elif command == "revoke":
            robots.revoke(path, args.name)
            print(
                f"revoked robot {args.name} in {path}: refused once the gateway reloads it", file=sys.stderr
            )
            _revoke_tokens(args)
        else:
            _list(path, _last_used(args), now)
        return 0
    except (robots.RobotsError, config.ConfigError, OSError) as exc:
        print(f"registry-gateway robot: {exc}", file=sys.stderr)
        return 2
    except RevokeError as exc:
        print(f"registry-gateway robot: the robots file is changed, but its tokens: {exc}", file=sys.stderr)
        return exc.exit_status


def _revoke_tokens(args: argparse.Namespace) -> None:
    """Its tokens too, where the settings say revocations go (Redis: every replica at once; the
    revocations file): without, they end at the robots file's reload (revoke) or when they
    expire (rotate: the old secret's access tokens; its refresh tokens end at the reload)."""
    try:
        settings = _settings(args)
    except config.ConfigError as exc:
        print(
            "warning: its tokens are not revoked (the settings do not load: "
            f"{'; '.join(exc.problems)}); they end when the gateways reload the robots file",
            file=sys.stderr,
        )
        return
    if settings.redis_url is None and settings.token_revocations is None:
        return
    where = revoke_everywhere(settings, settings.token_revocations, robots.PREFIX + args.name)
    print(f"its tokens until now are revoked ({'; '.join(where)})", file=sys.stderr)


def _print_secret(name: str, secret: str, path: Path) -> None:
    print(
        f"robot {name} in {path}; log in as {robots.PREFIX}{name} with this secret (shown once):",
        file=sys.stderr,
    )
    print(secret)
    print(
        f"  e.g. printf %s \"$SECRET\" | docker login -u '{robots.PREFIX}{name}' --password-stdin REGISTRY",
        file=sys.stderr,
    )


def _last_used(args: argparse.Namespace) -> Path | None:
    try:
        return _settings(args).robots_last_used
    except config.ConfigError:
        return None


def _list(path: Path, used: Path | None, now: dt.datetime) -> None:
    uses = robots.read_uses(used)
    print("NAME\tSCOPES\tCREATED\tEXPIRES\tLAST USED")
    for robot in sorted(robots.read(path).values(), key=lambda r: r.name):
        expires = "never" if robot.expires is None else _when(robot.expires)
        if robot.expired(now):
            expires += " (expired)"
        last = uses.get(robot.name)
        print(
            "\t".join(
                (
                    robot.name,
                    " ".join(str(scope) for scope in robot.scopes),
                    _when(robot.created),
                    expires,
                    "never" if last is None else _when(last),
                )
            )
        )


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _labels(given: list[str]) -> Labels:
    labels: dict[str, tuple[str, ...]] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise robots.RobotsError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = (*labels.get(key, ()), value)
    return labels


def _settings(args: argparse.Namespace) -> config.Settings:
    config_file = args.config
    if config_file is None and os.environ.get(config.ENV_PREFIX + "CONFIG"):
        config_file = Path(os.environ[config.ENV_PREFIX + "CONFIG"])
    return config.load(config_file, os.environ, {}, check_files=False)


def _robots_file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return Path(args.file)
    settings = _settings(args)
    if settings.robots is None:
        raise robots.RobotsError(
            "no robots file: set `robots` in the settings (or GATEWAY_ROBOTS), or give --file PATH"
        )
    return settings.robots
