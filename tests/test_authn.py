"""Basic-auth parsing, the verified-credential cache, dummy checks for unknown users, reload."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from gateway import authn, htpasswd
from gateway.authn import Authenticator, CredentialCache, Credentials, Malformed
from gateway.identity import Rejected, Unknown, Verdict, Verified
from gateway.state import AccessStore


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (basic(b"alice:pw"), Credentials("alice", "pw")),
        (basic(b"alice:p:w:"), Credentials("alice", "p:w:")),
        (basic(b"alice:"), Credentials("alice", "")),
        (basic(b":"), None),  # skopeo/podman without credentials: anonymous
        ("basic " + base64.b64encode(b"a:b").decode(), Credentials("a", "b")),
        (basic("j\u00f6rg:pw\u00e9".encode()), Credentials("j\u00f6rg", "pw\u00e9")),
    ],
)
def test_parse_good(header: str | None, expected: Credentials | None) -> None:
    assert authn.parse_basic_authorization(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic ",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Basic " + base64.b64encode(b":pw").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(),
        "Basic " + base64.b64encode(b"a\x00b:pw").decode(),
        "Basic " + base64.b64encode(b"ab:p\nw").decode(),
        "Bearer abc.def.ghi",
        "Digest username=x",
        "Basic " + "QUFB" * 2000,
        "Basic YWJjOmRlZg",  # missing padding: strict base64 refuses it
    ],
)
def test_parse_malformed(header: str) -> None:
    assert isinstance(authn.parse_basic_authorization(header), Malformed)


def test_credentials_repr_hides_password() -> None:
    assert "s3cret" not in repr(Credentials("u", "s3cret"))
    assert "s3cret" not in str(Credentials("u", "s3cret"))


def _write_users(path: Path, users: dict[str, str], cost: int = 4) -> None:
    path.write_text(
        "".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(cost)).decode()}\n" for u, p in users.items())
    )


class CountingVerify:
    """Wraps htpasswd.verify to count calls and record which stored hash each checked."""

    def __init__(self) -> None:
        self.checked: list[htpasswd.StoredHash] = []
        self._real = htpasswd.verify

    def __call__(self, password: str, stored: htpasswd.StoredHash) -> bool:
        self.checked.append(stored)
        return self._real(password, stored)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingVerify:
    counter = CountingVerify()
    monkeypatch.setattr(htpasswd, "verify", counter)
    return counter


async def test_cache_saves_repeat_verifications(tmp_path: Path, counting: CountingVerify) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw"})
    auth = Authenticator(AccessStore(path), CredentialCache(100, 60))
    try:
        for _ in range(20):
            assert await auth.authenticate(Credentials("alice", "pw")) == "alice"
        assert len(counting.checked) == 1
        # Wrong passwords are never cached: each costs a verification, and none succeeds.
        for _ in range(3):
            assert await auth.authenticate(Credentials("alice", "wrong")) is None
        assert len(counting.checked) == 4
    finally:
        auth.close()


async def test_concurrent_requests_share_one_verification(tmp_path: Path, counting: CountingVerify) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw"}, cost=8)
    auth = Authenticator(AccessStore(path), CredentialCache(100, 60))
    try:
        results = await asyncio.gather(*(auth.authenticate(Credentials("alice", "pw")) for _ in range(10)))
        assert results == ["alice"] * 10
        assert len(counting.checked) == 1
    finally:
        auth.close()


async def test_unknown_user_is_checked_against_dummy_of_same_cost(
    tmp_path: Path, counting: CountingVerify
) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw", "bob": "pw2"}, cost=6)
    auth = Authenticator(AccessStore(path), CredentialCache(100, 60))
    try:
        assert await auth.authenticate(Credentials("mallory", "pw")) is None
        assert len(counting.checked) == 1
        assert counting.checked[0].scheme == "bcrypt"
        assert counting.checked[0].bcrypt_cost == 6
    finally:
        auth.close()


async def test_cache_expires(tmp_path: Path, counting: CountingVerify) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw"})
    auth = Authenticator(AccessStore(path), CredentialCache(100, 0.05))
    try:
        await auth.authenticate(Credentials("alice", "pw"))
        await asyncio.sleep(0.1)
        await auth.authenticate(Credentials("alice", "pw"))
        assert len(counting.checked) == 2
    finally:
        auth.close()


def test_cache_is_bounded_and_keyed_without_password() -> None:
    cache = CredentialCache(max_entries=3, ttl_seconds=60)
    # A long password: a key is 32 random-looking bytes, which held a two-byte one by chance once.
    password = "correct-horse-battery-staple"
    keys = [cache.key(Credentials(f"u{i}", password)) for i in range(5)]
    for i, key in enumerate(keys):
        cache.put(key, Verified(f"u{i}"), 1)
    assert len(cache) == 3
    assert cache.get(keys[0], 1) is None
    assert cache.get(keys[4], 1) == Verified("u4")
    assert cache.get(keys[4], 2) is None  # another generation of the user file
    assert all(password.encode() not in k for k in keys)


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_password_change_invalidates_cache(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "old"})
    auth = Authenticator(AccessStore(path), CredentialCache(100, 600))
    try:
        assert await auth.authenticate(Credentials("alice", "old")) == "alice"
        _write_users(path, {"alice": "new"})
        _touch_later(path)
        assert await auth.reload_if_changed()
        assert await auth.authenticate(Credentials("alice", "old")) is None
        assert await auth.authenticate(Credentials("alice", "new")) == "alice"
    finally:
        auth.close()


async def test_broken_file_keeps_last_good_users(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw"})
    auth = Authenticator(AccessStore(path), CredentialCache(100, 600))
    try:
        path.write_text("this is not an htpasswd line\n")
        _touch_later(path)
        assert not await auth.reload_if_changed()
        assert "keeping the last good users" in caplog.text
        assert await auth.authenticate(Credentials("alice", "pw")) == "alice"
        path.unlink()
        assert not await auth.reload_if_changed()
        assert await auth.authenticate(Credentials("alice", "pw")) == "alice"
    finally:
        auth.close()


async def test_bcrypt_runs_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw"}, cost=12)
    auth = Authenticator(AccessStore(path), CredentialCache(100, 600))
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        assert await auth.authenticate(Credentials("alice", "pw")) == "alice"
        elapsed = time.monotonic() - started
        task.cancel()
        # The loop kept turning while the hash ran (a blocked loop would tick at most once).
        assert ticks >= max(2, int(elapsed / 0.01) // 4)
    finally:
        auth.close()


def test_the_login_cache_tells_which_entries_it_still_holds() -> None:
    from gateway.authn import CredentialCache, Credentials
    from gateway.identity import Verified

    cache = CredentialCache(max_entries=1, ttl_seconds=60)
    first, second = cache.key(Credentials("a", "1")), cache.key(Credentials("b", "2"))
    cache.put(first, Verified("a"), 0)
    assert cache.holds(first) and cache.peek(first, 0) is not None
    assert (cache.hits, cache.misses) == (0, 0)  # a peek is counted by whoever uses it
    cache.put(second, Verified("b"), 0)  # evicts the first: a fast-path memo of it must end
    assert not cache.holds(first) and cache.holds(second)
    assert cache.peek(second, 1) is None  # another users generation
    cache.clear()
    assert not cache.holds(second)


def test_a_file_rewritten_in_place_is_read_whole_never_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Apache's htpasswd truncates its file and writes it again in place. A check between the
    two must not take the valid-looking first half (users missing) for the new file; a SIGHUP's
    reload waits for the writer a little longer, then reads what it wrote."""
    path = tmp_path / "htpasswd"
    lines = [f"user{i}:{{PLAIN}}pw{i}\n" for i in range(20)]
    path.write_text("".join(lines[:10]))
    store = AccessStore(path)

    def rewrite_in_place() -> Iterator[None]:
        with path.open("w") as out:  # O_TRUNC, as htpasswd opens it
            for start in range(0, 20, 5):  # a quarter of the file each time the reader waits
                out.write("".join(lines[start : start + 5]))
                out.flush()
                yield

    writer = rewrite_in_place()
    next(writer)  # caught after the first quarter
    monkeypatch.setattr(time, "sleep", lambda _seconds: next(writer, None))  # the store's waits
    assert not store.reload_if_changed()  # still being written: left for the next check
    assert len(store.snapshot.users) == 10
    assert store.reload_if_changed(force=True)  # SIGHUP: waits while it changes, then reads it
    assert len(store.snapshot.users) == 20


class ProgramLike:
    """A source as the contract has it (gateway.identity.IdentitySource): knows `carol` only."""

    name = "program"
    lasting = False
    last_problem: str | None = None

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def verify(self, user: str, password: str) -> Verdict:
        self.asked.append(user)
        if user != "carol":
            return Unknown()
        return Verified("carol", {"team": ("ops",)}, self.name) if password == "pw" else Rejected()


async def test_every_source_behind_one_contract(
    tmp_path: Path, counting: CountingVerify, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are a source like any other, asked first after robots (which answer only robot+
    names); a name no source knows costs the
    dummy check; a source that is not lasting vouches for its users' tokens while their login is
    cached, a lasting one (the files) for as long as the files say."""
    path = tmp_path / "htpasswd"
    _write_users(path, {"alice": "pw"})
    auth = Authenticator(AccessStore(path), CredentialCache(100, 60))
    program = ProgramLike()
    chain = auth.sources
    monkeypatch.setattr(auth, "sources", lambda snapshot: [*chain(snapshot), program])
    try:
        assert [source.name for source in auth.sources(auth.store.snapshot)] == [
            "robot",
            "htpasswd",
            "program",
        ]
        assert await auth.login(Credentials("alice", "pw")) == Verified("alice")
        assert program.asked == []  # a name the files know is never asked elsewhere
        assert await auth.login(Credentials("carol", "pw")) == Verified(
            "carol", {"team": ("ops",)}, "program"
        )
        assert auth.remembered_labels("carol") == {"team": ("ops",)}
        assert auth.remembered_labels("alice") is None  # the files vouch for alice, no login needed
        checks = len(counting.checked)
        assert isinstance(await auth.login(Credentials("mallory", "pw")), Rejected)
        assert program.asked == ["carol", "mallory"]
        assert len(counting.checked) == checks + 1 and counting.checked[-1] is auth.store.snapshot.dummy
    finally:
        auth.close()
