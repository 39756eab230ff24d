"""Tokens the gateway must refuse, made the ways an attacker would make them, and key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import config
from gateway.tokens import keys
from gateway.tokens.authority import TokenAuthority
from gateway.tokens.jwt_tokens import InvalidToken, Verifier, issue
from gateway.tokens.scopes import Scope
from tests.conftest import htpasswd_add

ISSUER, SERVICE = "registry-gateway", "registry-gateway"
ACCESS = [Scope("repository", "a/b", frozenset({"pull"}))]


@pytest.fixture(scope="module")
def key() -> keys.SigningKey:
    return keys.generate()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now,
        "iat": now,
        "access": [s.claim() for s in ACCESS],
    }
    base.update(overrides)
    return base


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_a_good_token_is_accepted(key: keys.SigningKey) -> None:
    token, _ = issue(key, ISSUER, SERVICE, "alice", ACCESS, 300)
    verified = Verifier([key], ISSUER, SERVICE).verify(token)
    assert verified.subject == "alice" and verified.access == tuple(ACCESS)


def refused(key: keys.SigningKey, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        Verifier([key], ISSUER, SERVICE).verify(token)
    return str(caught.value)


def test_expired_not_yet_valid_other_audience_or_issuer(key: keys.SigningKey) -> None:
    def sign(body: dict[str, object]) -> str:
        return jwt.encode(body, key.private, algorithm="ES256", headers={"kid": key.kid})

    now = int(time.time())
    assert "expired" in refused(key, sign(claims(exp=now - 120)))
    assert "not yet valid" in refused(key, sign(claims(nbf=now + 120)))
    refused(key, sign(claims(aud="another-service")))
    refused(key, sign(claims(aud=["another-service"])))
    refused(key, sign(claims(iss="someone-else")))
    missing_exp = claims()
    del missing_exp["exp"]
    refused(key, sign(missing_exp))


def test_another_key_none_and_hmac_with_the_public_key(key: keys.SigningKey) -> None:
    other = keys.generate()
    # Signed by another key, claiming ours.
    refused(key, jwt.encode(claims(), other.private, algorithm="ES256", headers={"kid": key.kid}))
    # Signed by another key, with its own kid (and its public key handed over in the header).
    public = other.public
    assert isinstance(public, ec.EllipticCurvePublicKey)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    headers = {"kid": other.kid, "jwk": jwk}
    refused(key, jwt.encode(claims(), other.private, algorithm="ES256", headers=headers))
    # alg none.
    header = b64(json.dumps({"alg": "none", "kid": key.kid, "typ": "JWT"}).encode())
    refused(key, f"{header}.{b64(json.dumps(claims()).encode())}.")
    # HS256 with our public key as the shared secret (the classic confusion).
    public_pem = key.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "kid": key.kid, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    signature = b64(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    refused(key, f"{header}.{body}.{signature}")


def test_a_modified_access_claim_breaks_the_signature(key: keys.SigningKey) -> None:
    token, _ = issue(key, ISSUER, SERVICE, "alice", ACCESS, 300)
    header, body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["access"] = [{"type": "repository", "name": "*", "actions": ["*"]}]
    forged = f"{header}.{b64(json.dumps(payload).encode())}.{signature}"
    refused(key, forged)
    refused(key, "not.a.token")
    refused(key, "")


def authority_with(tmp_path: Path, key: keys.SigningKey, **settings: str) -> tuple[TokenAuthority, Path]:
    """A token authority on a key file (mode 0600) in tmp_path, with these settings."""
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "alice", "pw")
    key_file = tmp_path / "token.pem"
    keys.write_private(key, key_file)
    return TokenAuthority(authority_settings(tmp_path, key_file, **settings)), key_file


def authority_settings(tmp_path: Path, key_file: Path, **settings: str) -> config.Settings:
    flags = {"htpasswd": str(tmp_path / "htpasswd"), "challenge": "bearer", "token_key": str(key_file)}
    return config.load(None, {}, {**flags, **settings})


def test_rotation_keeps_old_tokens_valid_while_the_old_key_is_in_the_file(tmp_path: Path) -> None:
    first = keys.generate()
    authority, key_file = authority_with(tmp_path, first)
    assert key_file.stat().st_mode & 0o777 == 0o600
    old_token, _ = authority.issue("alice", ACCESS)
    second = keys.generate()
    keys.write_private(second, key_file, first)  # as `token keygen --rotate` writes it
    assert authority.reload_if_changed()
    new_token, _ = authority.issue("alice", ACCESS)
    assert jwt.get_unverified_header(new_token)["kid"] == second.kid != first.kid
    assert authority.verify(old_token).subject == "alice"  # nobody is logged out
    assert authority.verify(new_token).subject == "alice"
    key_file.write_text("garbage")
    assert not authority.reload_if_changed()  # a broken file keeps the current key
    assert jwt.get_unverified_header(authority.issue("alice", ACCESS)[0])["kid"] == second.kid


def test_libtrust_key_id_shape(key: keys.SigningKey) -> None:
    groups = key.kid.split(":")
    assert len(groups) == 12 and all((len(g) == 4 and g.isupper()) or g.isdigit() for g in groups)


def test_explicit_revocation_voids_earlier_tokens(tmp_path: Path) -> None:
    from gateway.htpasswd import StoredHash
    from gateway.tokens import revocations

    revoked_file = tmp_path / "revoked"
    authority, _ = authority_with(
        tmp_path, keys.generate(), token_revocations=str(revoked_file), refresh_token_lifetime="86400"
    )
    stored = {"alice": StoredHash("bcrypt", "$2y$05$" + "a" * 53)}
    access, _ = authority.issue("alice", ACCESS)
    refresh = authority.issue_refresh("alice", stored["alice"])
    assert authority.refresh_subject(refresh, stored) == "alice"
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "revoke", "alice", "--file", str(revoked_file)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    authority.reload_if_changed()
    with pytest.raises(InvalidToken):
        authority.verify(access)
    with pytest.raises(InvalidToken):
        authority.refresh_subject(refresh, stored)
    # A login once the command has returned gets a token that works, at once.
    fresh, _ = authority.issue("alice", ACCESS)
    assert authority.verify(fresh).subject == "alice"
    assert revocations.read(revoked_file).keys() == {"alice"}


def test_a_token_issued_right_after_a_revocation_returns_is_accepted(tmp_path: Path) -> None:
    """Tokens carry whole seconds: a revocation voids those of its own second too, so `revoke`
    returns once that second is over. Before, a login within the same second as `token revoke
    alice` got a token refused at once. The revocation starts just after a second begins, so a
    `revoke` that does not wait leaves the rest of that second to the next login."""
    from gateway.tokens import revocations

    revoked_file = tmp_path / "revoked"
    authority, _ = authority_with(tmp_path, keys.generate(), token_revocations=str(revoked_file))
    before, _ = authority.issue("alice", ACCESS)
    time.sleep(1 - time.time() % 1 + 0.01)
    revocations.revoke(revoked_file, "alice")
    authority.reload_if_changed()
    with pytest.raises(InvalidToken):
        authority.verify(before)
    after, _ = authority.issue("alice", ACCESS)
    assert authority.verify(after).subject == "alice"


def test_oversized_non_ascii_and_overlong_tokens_are_refused(key: keys.SigningKey) -> None:
    assert "malformed" in refused(key, "Bearer-ish \udcff")  # a raw non-UTF-8 byte, as aiohttp passes it
    assert "malformed" in refused(key, "a" * 9000)
    now = int(time.time())
    long_lived = jwt.encode(
        claims(exp=now + 10 * 86400), key.private, algorithm="ES256", headers={"kid": key.kid}
    )
    assert "longer" in refused(key, long_lived)  # what only a leaked key would sign


def test_a_key_replaced_by_hand_is_refused_at_once_for_every_token(tmp_path: Path) -> None:
    """Replacing the key file is the answer to a leak: from the reload on, nothing the old key
    signed is accepted, whenever it says it was issued. Before, the replaced signer kept a grace
    of token_lifetime + 60 s for "its" access tokens, and whoever held the leaked key could sign
    such tokens (issued a second before the replacement, say) through all of it."""
    from gateway.htpasswd import StoredHash

    first, second = keys.generate(), keys.generate()
    settings = {"refresh_token_lifetime": "86400", "token_lifetime": "300"}
    authority, key_file = authority_with(tmp_path, first, **settings)
    stored = {"alice": StoredHash("bcrypt", "$2y$05$" + "a" * 53)}
    access, _ = authority.issue("alice", ACCESS)
    refresh = authority.issue_refresh("alice", stored["alice"])
    assert authority.verify(access).subject == "alice"  # now cached: the cache must not keep it

    keys.write_private(second, key_file)  # by hand, the old key not kept
    assert authority.reload_if_changed()
    now = int(time.time())
    minted_by_the_leak = [
        jwt.encode(
            claims(iat=issued, nbf=issued, exp=issued + 300),
            first.private,
            algorithm="ES256",
            headers={"kid": first.kid},
        )
        for issued in (now - 1, now, now + 30)
    ]
    for token in (access, *minted_by_the_leak):
        with pytest.raises(InvalidToken, match="does not hold"):
            authority.verify(token)
    with pytest.raises(InvalidToken, match="does not hold"):
        authority.refresh_subject(refresh, stored)
    assert first.kid not in authority.verifier.keys and first.kid not in authority.refresh_verifier.keys
    # The new key's tokens work as ever.
    assert authority.verify(authority.issue("alice", ACCESS)[0]).subject == "alice"
    assert authority.refresh_subject(authority.issue_refresh("alice", stored["alice"]), stored) == "alice"


def test_an_unreadable_revocations_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    from gateway.tokens import revocations

    revoked_file = tmp_path / "revoked"
    revocations.revoke(revoked_file, "alice")
    authority, _ = authority_with(tmp_path, keys.generate(), token_revocations=str(revoked_file))
    assert "alice" in authority.revoked
    revoked_file.write_bytes(b"alice\t\xff\xfe\n")
    authority.reload_if_changed()  # logs, does not raise
    assert "alice" in authority.revoked


def test_a_written_key_is_private_even_over_a_stale_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "token.pem"
    stale = tmp_path / "token.pem.tmp"
    stale.write_text("left over")
    stale.chmod(0o644)
    keys.write_private(keys.generate(), target)
    assert target.stat().st_mode & 0o777 == 0o600
    assert keys.load(target).kid


def test_previous_keys_in_the_file_keep_refresh_tokens_until_taken_out(tmp_path: Path) -> None:
    """Refresh tokens live for days: a signer kept in the file after the new one (`token keygen
    --rotate`) keeps them valid, across restarts too; taken out of the file, they end at once.
    Before, only a retired signer's access tokens outlived a rotation."""
    from gateway.htpasswd import StoredHash

    first, second = keys.generate(), keys.generate()
    settings = {"refresh_token_lifetime": "86400", "token_lifetime": "60"}
    authority, key_file = authority_with(tmp_path, first, **settings)
    stored = {"alice": StoredHash("bcrypt", "$2y$05$" + "a" * 53)}
    refresh = authority.issue_refresh("alice", stored["alice"])
    access, _ = authority.issue("alice", ACCESS)

    keys.write_private(second, key_file, first)
    assert authority.reload_if_changed()
    assert jwt.get_unverified_header(authority.issue("alice", ACCESS)[0])["kid"] == second.kid
    assert authority.refresh_subject(refresh, stored) == "alice"
    assert authority.verify(access).subject == "alice"
    restarted = TokenAuthority(authority_settings(tmp_path, key_file, **settings))
    assert restarted.refresh_subject(refresh, stored) == "alice"
    # The previous key signs nothing new that is accepted (a leaked old key).
    late = jwt.encode(
        claims(iat=int(time.time()) + 120, exp=int(time.time()) + 150),
        first.private,
        algorithm="ES256",
        headers={"kid": first.kid},
    )
    with pytest.raises(InvalidToken):
        authority.verify(late)

    keys.write_private(second, key_file)  # taken out
    assert authority.reload_if_changed()
    with pytest.raises(InvalidToken):
        authority.refresh_subject(refresh, stored)
    with pytest.raises(InvalidToken):
        authority.verify(access)
    assert first.kid not in authority.verifier.keys


def test_a_refresh_token_has_its_own_audience(tmp_path: Path) -> None:
    """A registry checking tokens itself (distribution's `auth: token`) reads `iss`, `aud`, the
    signature and `access`, never `token_use`: a refresh token with the service's audience was an
    access token there, for days, out of reach of `token revoke`. Refresh tokens are now for the
    token endpoint alone, and one of the old kind is no refresh token any more."""
    from gateway.htpasswd import StoredHash
    from gateway.tokens.jwt_tokens import refresh_audience

    signer = keys.generate()
    authority, _ = authority_with(tmp_path, signer, refresh_token_lifetime="86400")
    stored = {"alice": StoredHash("bcrypt", "$2y$05$" + "a" * 53)}
    refresh = authority.issue_refresh("alice", stored["alice"])
    audience = jwt.decode(refresh, options={"verify_signature": False})["aud"]
    assert audience == refresh_audience(SERVICE) and audience != SERVICE
    assert authority.refresh_subject(refresh, stored) == "alice"
    # What a registry with the gateway's service and issuer does with it: refused.
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(refresh, signer.public, algorithms=["ES256"], audience=SERVICE, issuer=ISSUER)
    with pytest.raises(InvalidToken):
        authority.verify(refresh)
    # An access token is no refresh token, and a refresh token with the service's audience (as
    # they were) is refused at the token endpoint too.
    with pytest.raises(InvalidToken):
        authority.refresh_subject(authority.issue("alice", ACCESS)[0], stored)
    old_kind = jwt.decode(refresh, options={"verify_signature": False})
    old_kind["aud"] = SERVICE
    resigned = jwt.encode(old_kind, signer.private, algorithm="ES256", headers={"kid": signer.kid})
    with pytest.raises(InvalidToken):
        authority.refresh_subject(resigned, stored)


async def test_a_refresh_grant_for_another_service_is_refused_as_the_other_grants_are(
    tmp_path: Path,
) -> None:
    """`service` names whom the token is for: the refresh grant answers another service's name
    with the 400 that GET and the password grant answer, counted the same. Before, it issued a
    token for our service as if asked for it. And a POST's query is read after its body."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from gateway.app import METRICS_KEY, create_app
    from tests.conftest import free_port

    _, key_file = authority_with(tmp_path, keys.generate())
    settings = authority_settings(
        tmp_path,
        key_file,
        refresh_token_lifetime="86400",
        upstream="http://127.0.0.1:1",  # the token endpoint never asks the registry
        listen="127.0.0.1:1",
    )
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}/token"

    def refused_for_service() -> float | None:
        labels = {"result": "rejected", "reason": "service"}
        return app[METRICS_KEY].registry.get_sample_value("registry_gateway_tokens_total", labels)

    try:
        async with ClientSession() as session:
            login = {"grant_type": "password", "username": "alice", "password": "pw"}
            async with session.post(url, data={**login, "access_type": "offline"}) as response:
                assert response.status == 200, await response.text()
                refresh_token = (await response.json())["refresh_token"]
            refresh = {"grant_type": "refresh_token", "refresh_token": refresh_token}
            answers = []
            for form in ({**login, "service": "elsewhere"}, {**refresh, "service": "elsewhere"}):
                async with session.post(url, data=form) as response:
                    answers.append((response.status, await response.json()))
            assert answers[0][0] == 400 and answers[1] == answers[0]
            assert refused_for_service() == 2.0
            for form in (refresh, {**refresh, "service": SERVICE}):
                async with session.post(url, data=form) as response:
                    assert response.status == 200, await response.text()
                    assert (await response.json())["token"]
            # A POST is read as Go's FormValue and docker_auth read it: the body's values, then
            # the query's (a scope in the query is asked for; the body's service wins).
            query = "?scope=repository:alice/app:pull&service=elsewhere"
            async with session.post(url + query, data={**login, "service": SERVICE}) as response:
                assert response.status == 200, await response.text()
                token = (await response.json())["token"]
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["access"] == [{"type": "repository", "name": "alice/app", "actions": ["pull"]}]
            # But no secret from a URL, which proxies in front log (grant_type and username are
            # none: read from there too).
            query = f"?grant_type=password&username=alice&password={login['password']}"
            async with session.post(url + query, data={}) as response:
                assert response.status == 401, await response.text()
            query = f"?grant_type=refresh_token&refresh_token={refresh_token}"
            async with session.post(url + query, data={}) as response:
                assert response.status == 401 and "token" not in await response.json()
    finally:
        await server.close()


def test_a_certificate_written_after_its_key_is_taken_when_it_comes(tmp_path: Path) -> None:
    """With token_cert, a reload reads both files; before, a key written before its certificate
    was refused once (the old certificate) and never tried again."""
    first = keys.generate()
    cert = tmp_path / "token.crt"
    keys.write_certificate(first, "signer", cert)
    authority, key_file = authority_with(tmp_path, first, token_cert=str(cert))
    second = keys.generate()
    keys.write_private(second, key_file)
    assert not authority.reload_if_changed()  # the certificate is still the old key's
    assert authority.key.kid == first.kid
    keys.write_certificate(second, "signer", cert)
    assert authority.reload_if_changed()
    assert authority.key.kid == second.kid
    token, _ = authority.issue("alice", ACCESS)
    assert jwt.get_unverified_header(token)["x5c"] == authority.x5c != []


def test_key_files_with_several_keys_name_the_bad_one(tmp_path: Path) -> None:
    first, second = keys.generate(), keys.generate()
    path = tmp_path / "token.pem"
    keys.write_private(first, path, second)
    assert [key.kid for key in keys.load_all(path)] == [first.kid, second.kid]
    assert keys.load(path).kid == first.kid
    good = path.read_bytes()
    small = rsa_pem(1024)
    path.write_bytes(good + small)
    with pytest.raises(keys.KeyError_, match=r"token.pem, key 3: RSA keys must have at least 2048 bits"):
        keys.load_all(path)
    path.write_bytes(good + good)
    with pytest.raises(keys.KeyError_, match="key 3: the same key twice"):
        keys.load_all(path)
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(keys.KeyError_, match="no PRIVATE KEY block"):
        keys.load_all(path)
    encrypted = first.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path.write_bytes(encrypted)
    with pytest.raises(keys.KeyError_, match="not an unencrypted PEM private key"):
        keys.load_all(path)


def rsa_pem(bits: int) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "token", "keygen", *args], capture_output=True, text=True
    )


def test_keygen_rotate_keeps_the_last_signer_only(tmp_path: Path) -> None:
    key_file, cert = tmp_path / "token.pem", tmp_path / "token.crt"
    refused = keygen("--key", str(key_file), "--rotate")
    assert refused.returncode == 2 and "cannot rotate" in refused.stderr and not key_file.exists()
    both = keygen("--key", str(key_file), "--rotate", "--force")
    assert both.returncode == 2 and "not allowed with" in both.stderr and not key_file.exists()
    assert keygen("--key", str(key_file)).returncode == 0
    original = keys.load_all(key_file)
    assert len(original) == 1
    assert keygen("--key", str(key_file)).returncode == 2  # no silent replacement
    rotated = keygen("--key", str(key_file), "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert f"kid {original[0].kid} stops signing" in rotated.stdout
    once = keys.load_all(key_file)
    assert [key.kid for key in once[1:]] == [original[0].kid] and once[0].kid != original[0].kid
    assert keys.certificate_chain(cert, once[0])  # the certificate is the new signer's
    assert key_file.stat().st_mode & 0o777 == 0o600
    # Rotated by root, a key owned by the gateway's user (uid 10001 in the container) stays its.
    owner = (10001, 10001) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(key_file, *owner)
    assert keygen("--key", str(key_file), "--rotate").returncode == 0
    assert (key_file.stat().st_uid, key_file.stat().st_gid) == owner
    assert key_file.stat().st_mode & 0o777 == 0o600
    twice = keys.load_all(key_file)
    assert [key.kid for key in twice[1:]] == [once[0].kid]  # the original is dropped
    key_file.chmod(0o640)  # shared with the gateway's group on purpose: kept
    assert keygen("--key", str(key_file), "--rotate").returncode == 0
    assert key_file.stat().st_mode & 0o777 == 0o640
    key_file.chmod(0o604)  # a mistake: rotating never keeps a key readable by others
    assert keygen("--key", str(key_file), "--rotate").returncode == 0
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_revocations_through_a_symlink_lock_and_replace_the_real_file(tmp_path: Path) -> None:
    """Two `token revoke` runs reaching the file by different ways take one lock (beside the
    file itself), and the link stays a link."""
    from gateway.tokens import revocations

    shared = tmp_path / "shared"
    shared.mkdir()
    real = shared / "revocations"
    real.write_text("bob\t1.000\n")
    link = tmp_path / "revocations"
    link.symlink_to(real)
    revocations.revoke(link, "alice")
    assert link.is_symlink() and set(revocations.read(real)) == {"alice", "bob"}
    assert (shared / "revocations.lock").exists() and not (tmp_path / "revocations.lock").exists()
