"""htpasswd parsing and verification, with hashes written by Apache's own htpasswd."""

from __future__ import annotations

import subprocess
from pathlib import Path

import bcrypt
import pytest

from gateway import htpasswd
from tests.conftest import htpasswd_add, require

PASSWORD = "correct horse battery staple"


@pytest.mark.parametrize(
    ("flag", "scheme"),
    [("-B", "bcrypt"), ("-m", "apr1"), ("-s", "sha1"), ("-2", "sha256-crypt"), ("-5", "sha512-crypt")],
)
def test_apache_htpasswd_formats_verify(tmp_path: Path, flag: str, scheme: str) -> None:
    path = tmp_path / "htpasswd"
    htpasswd_add(path, "user", PASSWORD, flag)
    parsed = htpasswd.parse(path.read_text())
    stored = parsed.users["user"]
    assert stored.scheme == scheme
    assert htpasswd.verify(PASSWORD, stored)
    assert not htpasswd.verify(PASSWORD + "x", stored)
    assert not htpasswd.verify("", stored)


def test_traditional_des_crypt_reads_as_nginx_does(tmp_path: Path) -> None:
    """`htpasswd -d`: crypt(3)'s DES, which nginx reads; only a password's first 8 bytes count."""
    path = tmp_path / "htpasswd"
    htpasswd_add(path, "old", "secret12", "-d")
    parsed = htpasswd.parse(path.read_text())
    stored = parsed.users["old"]
    assert stored.scheme == "des-crypt" and stored.weak
    assert any("weak des-crypt hash" in warning for warning in parsed.warnings)
    assert htpasswd.verify("secret12", stored)
    assert htpasswd.verify("secret12-and-more", stored)  # as crypt(3) and nginx: 8 bytes
    assert not htpasswd.verify("secret1", stored)
    assert not htpasswd.verify("", stored)


def test_bcrypt_variants_and_cost() -> None:
    for prefix in (b"2a", b"2b"):
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4, prefix=prefix)).decode()
        stored = htpasswd.parse(f"u:{hashed}\n").users["u"]
        assert htpasswd.verify("pw", stored)
        assert stored.bcrypt_cost == 4
    y = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    assert htpasswd.verify("pw", htpasswd.parse(f"u:{y}").users["u"])


def test_long_password_is_cut_at_72_bytes_like_htpasswd(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    long_password = "p" * 100
    htpasswd_add(path, "user", long_password, "-B")
    stored = htpasswd.parse(path.read_text()).users["user"]
    assert htpasswd.verify(long_password, stored)
    assert htpasswd.verify("p" * 72 + "different tail", stored)
    assert not htpasswd.verify("p" * 71, stored)
    # And Apache agrees on the 72-byte cut.
    check = subprocess.run(
        [require("htpasswd"), "-v", "-i", str(path), "user"], input=("p" * 72).encode(), capture_output=True
    )
    assert check.returncode == 0


def test_weak_schemes_warn_and_strong_do_not(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    htpasswd_add(path, "strong", PASSWORD, "-B")
    htpasswd_add(path, "weak", PASSWORD, "-m")
    parsed = htpasswd.parse(path.read_text())
    assert len(parsed.warnings) == 1 and "'weak'" in parsed.warnings[0]


def test_plain_and_salted_sha() -> None:
    parsed = htpasswd.parse("p:{PLAIN}secret\ns:{SSHA}" + _ssha("secret") + "\n")
    assert htpasswd.verify("secret", parsed.users["p"])
    assert not htpasswd.verify("secreT", parsed.users["p"])
    assert htpasswd.verify("secret", parsed.users["s"])
    assert not htpasswd.verify("other", parsed.users["s"])


def _ssha(password: str) -> str:
    import base64
    import hashlib

    salt = b"saltsalt"
    return base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def test_comments_blank_lines_and_crlf() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    parsed = htpasswd.parse(f"# team a\r\n\r\nu:{hashed}\r\n")
    assert list(parsed.users) == ["u"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nocolon\n", "line 1: expected USER:HASH"),
        (":$2y$05$abc\n", "line 1: expected USER:HASH"),
        ("u:md5sumlike\n", "line 1: user 'u' has a hash in an unsupported format"),
        ("u:$2y$05$short\n", "line 1: user 'u' has a malformed bcrypt hash"),
        ("u:{SHA}notbase64!\n", "line 1: user 'u' has a malformed sha1 hash"),
        ("u:$apr1$broken\n", "line 1: user 'u' has a malformed apr1 hash"),
    ],
)
def test_bad_lines_are_named(text: str, expected: str) -> None:
    with pytest.raises(htpasswd.HtpasswdError) as info:
        htpasswd.parse(text)
    assert str(info.value) == expected


def test_every_bad_line_reported_and_no_hash_leaks() -> None:
    good = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    with pytest.raises(htpasswd.HtpasswdError) as info:
        htpasswd.parse(f"a:{good}\nbroken\na:{good}\nc:$2y$05$TOPSECRETHASH\n")
    message = str(info.value)
    assert "line 2" in message and "line 3" in message and "line 4" in message
    assert "TOPSECRETHASH" not in message and good not in message


def test_stored_hash_repr_is_masked() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    stored = htpasswd.parse(f"u:{hashed}").users["u"]
    assert hashed not in repr(stored)
    assert hashed[10:] not in repr(htpasswd.parse(f"u:{hashed}"))


def test_dummy_hash_has_requested_cost() -> None:
    dummy = htpasswd.make_dummy(5)
    assert dummy.bcrypt_cost == 5
    assert not htpasswd.verify("", dummy)
