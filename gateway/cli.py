"""`registry-gateway` command line: parses the arguments and runs the command.

`serve` loads the settings, users and rules here and hands them to the server runtime
(`gateway.runtime`, one process) or to the worker supervisor (`gateway.supervisor`);
check-config, healthcheck and token keygen/revoke are here; user and policy are in
`gateway.admin_cli`; demo is in `gateway.demo`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__, admin_cli, config, docker_auth, policyfile, robot_cli
from gateway.state import AccessStore, StateError

log = logging.getLogger("gateway")

SETTING_FLAGS: tuple[tuple[str, str], ...] = (
    ("listen", "HOST:PORT to listen on (default 0.0.0.0:8080)"),
    ("upstream", "registry URL (default http://registry:5000)"),
    ("htpasswd", "Apache htpasswd file with the users"),
    ("policy", "policy file with ACL rules, labels and static users (default: admin-prefix policy)"),
    ("robots", "robot accounts' file, written by `registry-gateway robot` (default: no robots)"),
    ("admin_prefix", "users whose name starts with this may push and delete (default admin)"),
    ("realm", "realm of the Basic challenge"),
    ("workers", "worker processes sharing the port (default 1)"),
    ("audit_log", "audit log file, one JSON object a line ('-' for stdout)"),
    ("metrics_listen", "HOST:PORT for /metrics, /healthz and /readyz"),
    ("tls_cert", "TLS certificate chain file (PEM); with --tls-key, serve HTTPS"),
    ("tls_key", "TLS private key file (PEM)"),
)


def _add_config_flags(parser: argparse.ArgumentParser, *, serve: bool) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML settings file (or ${config.ENV_PREFIX}CONFIG)",
    )
    if serve:
        for key, help_text in SETTING_FLAGS:
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, help=help_text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-gateway",
        description="Authenticating, authorizing, streaming proxy for a Docker/OCI registry.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    _add_config_flags(serve, serve=True)
    check = commands.add_parser("check-config", help="validate the settings and exit")
    _add_config_flags(check, serve=True)
    token = commands.add_parser("token", help="token signing keys")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    keygen = token_commands.add_parser(
        "keygen",
        help="write a signing key (mode 0600; 0640 if it was) and a self-signed certificate for the registry",
    )
    keygen.add_argument("--key", type=Path, required=True, help="private key file to write (PEM)")
    keygen.add_argument("--cert", type=Path, default=None, help="certificate file (default: KEY with .crt)")
    keygen.add_argument("--rsa", action="store_true", help="RSA 3072 instead of EC P-256")
    keygen.add_argument("--name", default="registry-gateway token signer", help="certificate common name")
    replacing = keygen.add_mutually_exclusive_group()  # one says "drop the key", the other "keep it"
    replacing.add_argument("--force", action="store_true", help="replace existing files")
    replacing.add_argument(
        "--rotate",
        action="store_true",
        help="a new signing key in front of KEY's current one, which stays accepted (refresh tokens"
        " it signed keep working); older previous keys are dropped; the certificate is replaced",
    )
    revoke = token_commands.add_parser(
        "revoke", help="void every token issued to USER until now (refresh tokens included)"
    )
    revoke.add_argument("user")
    revoke.add_argument(
        "--file", type=Path, default=None, help="revocations file (default: token_revocations)"
    )
    _add_config_flags(revoke, serve=False)
    health = commands.add_parser(
        "healthcheck", help="exit 0 if the gateway of these settings serves (the image's HEALTHCHECK)"
    )
    _add_config_flags(health, serve=False)
    admin_cli.add_parsers(commands)
    robot_cli.add_parsers(commands)
    demo = commands.add_parser(
        "demo", help="run a local registry (Debian's docker-registry) and the gateway with demo users"
    )
    demo.add_argument("--data", type=Path, default=Path(".demo"), help="where the demo keeps its files")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="gateway address (default 127.0.0.1:8080)")
    demo.add_argument(
        "--registry-listen", default="127.0.0.1:5000", help="registry address (default 127.0.0.1:5000)"
    )
    demo.add_argument("--registry-bin", default="/usr/bin/docker-registry", help="registry binary")
    return parser


def _config_file(args: argparse.Namespace) -> Path | None:
    config_file: Path | None = getattr(args, "config", None)
    if config_file is None and os.environ.get(config.ENV_PREFIX + "CONFIG"):
        config_file = Path(os.environ[config.ENV_PREFIX + "CONFIG"])
    return config_file


def _settings(args: argparse.Namespace) -> config.Settings:
    flags: dict[str, Any] = {key: getattr(args, key, None) for key, _ in SETTING_FLAGS}
    return config.load(_config_file(args), os.environ, flags)


def _serve(args: argparse.Namespace) -> int:
    # The server (aiohttp, the application, tokens: about half a second of imports on a small
    # machine) is imported only here: healthcheck runs every few seconds as the image's
    # HEALTHCHECK, and check-config, token and user commands need none of it.
    from gateway.runtime import StartupError, configure_logging, run_event_loop, run_server
    from gateway.supervisor import supervise

    try:
        settings = _settings(args)
    except config.ConfigError as exc:
        print("registry-gateway: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        store = AccessStore(settings.htpasswd, settings.policy, robots_path=settings.robots)
    except StateError as exc:
        print("registry-gateway: cannot load users and rules:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        settings = docker_auth.apply(settings, store.snapshot.policy)
    except docker_auth.DockerAuthError as exc:
        print(f"registry-gateway: invalid configuration:\n  {exc}", file=sys.stderr)
        return 2
    for note in docker_auth.not_applied(settings, store.snapshot.policy):
        log.warning("policy file %s: %s", settings.policy, note)
    store.use_docker_auth_service(settings.token_service)
    if settings.workers > 1:
        return supervise(settings)
    try:
        run_event_loop(run_server(settings, store))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0


def _origin(settings: config.Settings, key: str) -> str:
    origin = settings.origins.get(key, "default")
    if origin == "env":
        return f"environment {config.env_name(key)}"
    if origin == "flag":
        return f"flag --{key.replace('_', '-')}"
    return origin


def _check_config(args: argparse.Namespace) -> int:
    from gateway.probes import acme_problem, directory_problem, redis_problem, registry_problem

    try:
        settings = _settings(args)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"configuration invalid: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    if settings.policy is not None:
        try:
            policy = policyfile.load(settings.policy)
            settings = docker_auth.apply(settings, policy)
        except (policyfile.PolicyError, docker_auth.DockerAuthError) as exc:
            print(exc, file=sys.stderr)
            return 1
        for note in [*policy.warnings, *docker_auth.not_applied(settings, policy)]:
            print(f"warning: policy file {settings.policy}: {note}", file=sys.stderr)
        if policy.ldap is not None:
            # The directory as logins will use it: a refused service account or the wrong tls
            # would otherwise show only as every directory login refused.
            directory = directory_problem(policy.ldap)
            if directory is not None and directory[1]:
                print(f"policy file {settings.policy}: {directory[0]}", file=sys.stderr)
                return 1
            if directory is not None:
                print(f"warning: the directory: {directory[0]}", file=sys.stderr)
            else:
                print(f"the directory at {policy.ldap.addr} takes the service account's bind")
    print("configuration OK; effective settings:")
    for key in config.DEFAULTS:
        value: object = (
            f"{settings.listen_host}:{settings.listen_port}" if key == "listen" else getattr(settings, key)
        )
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
            value = f"{value[0]}:{value[1]}"
        shown = "(none)" if value is None or value == () else str(value)
        print(f"  {key:<22} {shown}  [{_origin(settings, key)}]")
    unreachable = registry_problem(settings.upstream)
    if unreachable is not None:
        print(f"warning: the registry: {unreachable}", file=sys.stderr)
    else:
        print(f"the registry at {settings.upstream} answers")
    # A service the settings name: a refusal (the settings' fault) fails, an unreachable one warns.
    services: list[tuple[object, Callable[[config.Settings], tuple[str, bool] | None], str]] = [
        (settings.acme_directory, acme_problem, f"the ACME CA at {settings.acme_directory} answers"),
        (settings.redis_url, redis_problem, "Redis answers: failed logins and revocations are shared"),
    ]
    for configured, problem_of, fine in services:
        if configured is None:
            continue
        found = problem_of(settings)
        if found is not None and found[1]:
            print(found[0], file=sys.stderr)
            return 1
        if found is not None:
            print(f"warning: {found[0]}", file=sys.stderr)
        else:
            print(fine)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from gateway.revoking import RevokeError, revoke_everywhere

    path: Path | None = args.file
    try:
        settings = config.load(_config_file(args), os.environ, {}, check_files=False)
    except config.ConfigError as exc:
        if path is None:
            print("\n".join(exc.problems), file=sys.stderr)
            return 2
        settings = None  # --file alone: the file is all that is asked for
    if path is None and settings is not None:
        path = settings.token_revocations
    try:
        # --file alone: that file, not Redis as well.
        where = revoke_everywhere(settings if args.file is None else None, path, args.user)
    except RevokeError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_status
    print(f"tokens issued to {args.user} until now are revoked ({'; '.join(where)})")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from gateway.tokens import keys

    key_path: Path = args.key
    cert_path: Path = args.cert or key_path.with_suffix(".crt")
    current: list[keys.SigningKey] = []
    if args.rotate:
        try:
            current = keys.load_all(key_path)
        except keys.KeyError_ as exc:
            print(f"cannot rotate: {exc}", file=sys.stderr)
            return 2
    for path in (key_path, cert_path):
        if path.exists() and not (args.force or args.rotate):
            print(f"{path} exists: --force replaces it, --rotate keeps the key accepted", file=sys.stderr)
            return 2
        if not path.parent.is_dir():
            print(f"{path.parent} does not exist", file=sys.stderr)
            return 2
    key = keys.generate("rsa" if args.rsa else "ec")
    # The certificate first: a gateway with token_cert reloads both when the key file changes.
    keys.write_certificate(key, args.name, cert_path)
    keys.write_private(key, key_path, *current[:1])
    mode = key_path.stat().st_mode & 0o777
    print(f"wrote {key_path} (mode {mode:04o}, {key.algorithm}, kid {key.kid}) and {cert_path}")
    if current:
        dropped = f"; {len(current) - 1} older key(s) dropped" if len(current) > 1 else ""
        print(f"kid {current[0].kid} stops signing and stays accepted while it is in {key_path}{dropped}")
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    from gateway.probes import healthcheck

    try:
        settings = config.load(_config_file(args), os.environ, {}, check_files=False)
    except config.ConfigError as exc:
        print("unhealthy: invalid configuration: " + "; ".join(exc.problems), file=sys.stderr)
        return 1
    if settings.policy is not None:
        # A docker_auth policy's server: section may say where the gateway listens; a policy
        # broken since start-up is no sign of ill health (the gateway serves on the last good one).
        settings = docker_auth.apply_leniently(settings, settings.policy)
    healthy, detail = healthcheck(settings)
    print(("healthy: " if healthy else "unhealthy: ") + detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "healthcheck":
        return _healthcheck(args)
    if args.command == "token":
        return _keygen(args) if args.token_command == "keygen" else _revoke(args)
    if args.command == "user":
        return admin_cli.run_user(args)
    if args.command == "policy":
        return admin_cli.run_policy(args)
    if args.command == "robot":
        return robot_cli.run(args)
    from gateway.demo import run_demo  # the server runtime with it: imported for demo only, as in _serve

    return run_demo(args.data, args.listen, args.registry_listen, args.registry_bin)
