"""Settings: precedence flag > env > file > default, unknown keys refused, every problem named at once."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from gateway import config
from tests.conftest import htpasswd_add

ROOT = Path(__file__).parent.parent


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    htpasswd_add(path, "admin", "pw", "-B")
    return path


def test_defaults(users: Path) -> None:
    settings = config.load(None, {}, {"htpasswd": str(users)})
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 8080)
    assert str(settings.upstream) == "http://registry:5000"
    assert settings.admin_prefix == "admin"
    assert settings.trusted_proxies == ()


def test_precedence(tmp_path: Path, users: Path) -> None:
    file = tmp_path / "gateway.yml"
    file.write_text(
        f"htpasswd: {users}\nlisten: 127.0.0.1:1000\nrealm: from file\nadmin_prefix: file-\n"
        "trusted_proxies: [10.0.0.0/8]\n"
    )
    env = {
        "GATEWAY_LISTEN": "127.0.0.1:2000",
        "GATEWAY_REALM": "from env",
        "GATEWAY_TRUSTED_PROXIES": "192.168.0.0/16, 127.0.0.1",
    }
    settings = config.load(file, env, {"listen": "127.0.0.1:3000"})
    assert settings.listen_port == 3000  # flag beats env and file
    assert settings.realm == "from env"  # env beats file
    assert settings.admin_prefix == "file-"  # file beats default
    assert [str(n) for n in settings.trusted_proxies] == ["192.168.0.0/16", "127.0.0.1/32"]


def test_every_problem_reported_with_its_key(tmp_path: Path) -> None:
    file = tmp_path / "gateway.yml"
    file.write_text(
        "listen: nowhere\nupstream: ftp://x\nread_timeout: -1\nmystery: 1\nrealm: 'a\"b'\n"
        "trusted_proxies: [not-an-ip]\nupstream_connections: 0\nblock_old_clients: maybe\n"
    )
    env = {"GATEWAY_CACHE_SIZE": "lots", "GATEWAY_TYPO": "1"}
    with pytest.raises(config.ConfigError) as info:
        config.load(file, env, {"htpasswd": str(tmp_path / "missing")})
    problems = "\n".join(info.value.problems)
    for expected in (
        "listen: expected HOST:PORT",
        "upstream: expected an http:// or https:// URL",
        "read_timeout: expected a non-negative number",
        "mystery: unknown key",
        "realm: must be non-empty printable text",
        "trusted_proxies: 'not-an-ip' is not an IP address or CIDR",
        "upstream_connections: must be at least 1",
        "block_old_clients: expected true or false",
        "cache_size (GATEWAY_CACHE_SIZE): expected a whole number",
        "GATEWAY_TYPO: unknown environment variable",
        "htpasswd (--htpasswd): no such file",
    ):
        assert expected in problems, expected
    assert len(info.value.problems) == 11


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("workers: .inf", "workers: expected a whole number"),
        ("workers: 2.9", "workers: expected a whole number"),
        ("lockout_attempts: 3.7", "lockout_attempts: expected a whole number"),
        ("workers: .nan", "workers: expected a whole number"),
    ],
)
def test_counts_are_whole_numbers(tmp_path: Path, users: Path, text: str, problem: str) -> None:
    """YAML gives floats too: cut to a whole number silently, or a traceback for .inf, before."""
    file = tmp_path / "gateway.yml"
    file.write_text(text + "\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(file, {}, {"htpasswd": str(users)})
    assert info.value.problems == [problem]


SAME_ADDRESS = "metrics_listen: the same address as listen"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lockout_window: 0", "lockout_window: must be greater than zero (lockout_attempts: 0 turns"),
        ("listen: 127.0.0.1:8080\nmetrics_listen: 127.0.0.1:8080", SAME_ADDRESS),
        ("listen: 0.0.0.0:8080\nmetrics_listen: 127.0.0.1:8080", SAME_ADDRESS),
        ("listen: '[::]:8080'\nmetrics_listen: '[::1]:8080'", SAME_ADDRESS),
    ],
)
def test_settings_that_would_silently_not_work(tmp_path: Path, users: Path, text: str, problem: str) -> None:
    """lockout_window: 0 turned the lockout off unsaid; one port for two listeners failed later,
    blaming whatever else used the address."""
    file = tmp_path / "gateway.yml"
    file.write_text(text + "\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(file, {}, {"htpasswd": str(users)})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem)


@pytest.mark.parametrize(
    ("listen", "metrics"),
    [
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("127.0.0.1:8080", "127.0.0.1:9090"),
        ("0.0.0.0:8080", "[::1]:8080"),  # a wildcard takes its own family's addresses only
        ("[::]:8080", "127.0.0.1:8080"),
    ],
)
def test_listeners_on_other_ports_hosts_or_families_are_fine(
    tmp_path: Path, users: Path, listen: str, metrics: str
) -> None:
    file = tmp_path / "gateway.yml"
    file.write_text(f"listen: '{listen}'\nmetrics_listen: '{metrics}'\n")
    assert config.load(file, {}, {"htpasswd": str(users)}).metrics_listen is not None


def test_a_whole_float_is_a_count(tmp_path: Path, users: Path) -> None:
    file = tmp_path / "gateway.yml"
    file.write_text("workers: 2.0\n")
    assert config.load(file, {}, {"htpasswd": str(users)}).workers == 2


def test_upstream_must_not_carry_credentials_or_path(users: Path) -> None:
    for bad in ("http://u:p@registry:5000", "http://registry:5000/v2", "http://registry:5000?x=1"):
        with pytest.raises(config.ConfigError):
            config.load(None, {}, {"htpasswd": str(users), "upstream": bad})


def test_broken_htpasswd_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "htpasswd"
    bad.write_text("garbage line\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {}, {"htpasswd": str(bad)})
    assert "line 1: expected USER:HASH" in info.value.problems[0]


def test_yaml_that_is_not_a_mapping(tmp_path: Path, users: Path) -> None:
    file = tmp_path / "gateway.yml"
    file.write_text("- a\n- b\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(file, {}, {"htpasswd": str(users)})
    assert "expected a mapping" in info.value.problems[0]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_check_config_cli(tmp_path: Path, users: Path) -> None:
    ok = _cli("check-config", "--htpasswd", str(users), "--upstream", "http://127.0.0.1:5000")
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    file = tmp_path / "gateway.yml"
    file.write_text("listen: bad\nunknown_key: 1\n")
    bad = _cli("check-config", "--config", str(file), "--htpasswd", str(tmp_path / "nope"))
    assert bad.returncode == 1
    assert "listen: expected HOST:PORT" in bad.stderr
    assert "unknown_key: unknown key" in bad.stderr
    assert "no such file" in bad.stderr


def test_serve_refuses_bad_config_and_names_problems(tmp_path: Path) -> None:
    result = _cli("serve", "--listen", "x", "--htpasswd", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "listen (--listen): expected HOST:PORT" in result.stderr
    assert "htpasswd (--htpasswd): no such file" in result.stderr


def test_example_config_is_valid(users: Path) -> None:
    example = Path(__file__).parent.parent / "config" / "gateway.yml"
    settings = config.load(example, {}, {"htpasswd": str(users)})
    assert settings.listen_port == 8080


def test_user_defined_in_both_files_is_a_config_error(tmp_path: Path, users: Path) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(
        "users:\n  admin: {password: '$2y$05$" + "a" * 53 + "'}\nacl:\n  - match: {account: admin}\n"
        "    actions: ['*']\n"
    )
    result = _cli("check-config", "--htpasswd", str(users), "--policy", str(policy))
    assert result.returncode == 1
    assert "policy (--policy): " in result.stderr and "users.admin: also in" in result.stderr


def test_example_config_names_every_setting() -> None:
    example = (Path(__file__).parent.parent / "config" / "gateway.yml").read_text()
    named = {line.lstrip("# ").split(":", 1)[0] for line in example.splitlines() if ":" in line}
    assert set(config.DEFAULTS) <= named, set(config.DEFAULTS) - named


def test_token_settings_are_checked(tmp_path: Path, users: Path) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.load(None, {}, {"htpasswd": str(users), "challenge": "bearer", "workers": "2"})
    assert any(p.startswith("token_key: needed with workers > 1") for p in refused.value.problems)
    key = tmp_path / "not-a-key.pem"
    key.write_text("nothing here")
    with pytest.raises(config.ConfigError) as refused:
        config.load(None, {}, {"htpasswd": str(users), "token_key": str(key), "refresh_token_lifetime": "60"})
    assert any("not an unencrypted PEM private key" in p for p in refused.value.problems)
    with pytest.raises(config.ConfigError) as refused:
        config.load(
            None, {}, {"htpasswd": str(users), "refresh_token_lifetime": "60", "token_realm": "/token"}
        )
    problems = "\n".join(refused.value.problems)
    assert "refresh_token_lifetime: needs token_key" in problems and "token_realm" in problems


def test_docs_document_every_setting_and_serve_flag() -> None:
    """Each setting has its section in docs/configuration.md and a line in config/gateway.yml, and
    each flag of `serve` is named with its setting."""
    from gateway.cli import SETTING_FLAGS

    doc = (ROOT / "docs" / "configuration.md").read_text()
    example = (ROOT / "config" / "gateway.yml").read_text()
    assert [key for key in config.DEFAULTS if f"### `{key}`" not in doc] == []
    assert [key for key in config.DEFAULTS if not re.search(rf"^(# )?{key}: ", example, re.M)] == []
    flags = [f"--{key.replace('_', '-')}" for key, _ in SETTING_FLAGS]
    assert [flag for flag in flags if f"flag: `{flag}`" not in doc] == []


REGENERATE = (
    "run `python -m gateway.config --markdown > docs/configuration.md` and "
    "`python -m gateway.config --example > config/gateway.yml`"
)


def test_every_settings_field_has_exactly_one_record() -> None:
    fields = {field.name for field in dataclasses.fields(config.Settings)} - {"origins"}
    keys = [setting.key for setting in config.SETTINGS]
    assert len(keys) == len(set(keys)), "a key defined twice"
    # `listen` is the one key read into two fields.
    assert set(keys) == (fields - {"listen_host", "listen_port"}) | {"listen"}


def test_each_parser_returns_its_fields_type() -> None:
    """What mypy knows of `settings.KEY` is what the key's parser gives."""
    hints = typing.get_type_hints(config.Settings)
    assert (hints.pop("listen_host"), hints.pop("listen_port")) == (str, int)
    hints["listen"] = tuple[str, int]  # `listen` is read into those two
    for setting in config.SETTINGS:
        assert typing.get_type_hints(setting.parse)["return"] == hints[setting.key], setting.key


def test_every_default_is_valid_and_every_optional_setting_has_an_example() -> None:
    for setting in config.SETTINGS:
        setting.parse(setting.default)
        if setting.default is None:
            assert setting.example is not None, setting.key
            setting.parse(setting.example)
        assert "|" not in setting.description and setting.description.endswith("."), setting.key


def test_configuration_doc_is_written_from_the_table() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config.render_markdown(), (
        f"docs/configuration.md drifted from the table: {REGENERATE}"
    )


def test_example_config_is_written_from_the_table() -> None:
    committed = (ROOT / "config" / "gateway.yml").read_text(encoding="utf-8")
    assert committed == config.render_example(), f"config/gateway.yml drifted from the table: {REGENERATE}"
    # Its values are the defaults, written as an operator would write them.
    values = yaml.safe_load(committed)
    assert values == {key: value for key, value in config.DEFAULTS.items() if value is not None}


def test_generator_command_writes_both(tmp_path: Path) -> None:
    for option, name in (("--markdown", "docs/configuration.md"), ("--example", "config/gateway.yml")):
        run = subprocess.run(
            [sys.executable, "-m", "gateway.config", option],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=True,
        )
        assert run.stdout == (ROOT / name).read_text(encoding="utf-8")


def test_serve_flags_are_the_tables_flags() -> None:
    from gateway.cli import SETTING_FLAGS

    assert {key for key, _ in SETTING_FLAGS} == {setting.key for setting in config.SETTINGS if setting.flag}
