"""Password-guessing protection: too many failed logins for one (client address, user) pair locks it.

After `attempts` failures within `window` seconds of the first one, the pair is answered 429 with
`Retry-After` until the window ends, without any bcrypt check, so guessing costs the attacker
time and us nothing. State is one small entry per pair in a bounded LRU: an attack from many
addresses can evict old entries, never grow memory.
"""

from __future__ import annotations

from collections import OrderedDict

REPEAT_WINDOW = 10.0  # seconds within which the same wrong password is one attempt


class Lockout:
    def __init__(self, attempts: int, window: float, max_entries: int = 100_000) -> None:
        self.attempts = attempts
        self.window = window
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        # The last failed attempt of each pair (a keyed hash of the password tried, and when):
        # containerd sends one wrong password twice (POST, then GET); that is one guess.
        self._last_attempt: dict[tuple[str, str], tuple[bytes, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.attempts > 0 and self.window > 0

    def retry_after(self, address: str, user: str, now: float) -> float | None:
        """Seconds the pair must wait, or None when it may try."""
        if not self.enabled:
            return None
        entry = self._entries.get((address, user))
        if entry is None:
            return None
        started, failures = entry
        if now >= started + self.window:
            del self._entries[(address, user)]
            return None
        return started + self.window - now if failures >= self.attempts else None

    def failed(self, address: str, user: str, now: float, attempt: bytes | None = None) -> None:
        """Count a failed login; the same `attempt` (a keyed hash of the password) again within
        REPEAT_WINDOW seconds is the same guess, not counted twice."""
        if not self.enabled:
            return
        key = (address, user)
        if attempt is not None:
            last = self._last_attempt.get(key)
            self._last_attempt[key] = (attempt, now)
            if len(self._last_attempt) > self.max_entries:
                self._last_attempt.pop(next(iter(self._last_attempt)))
            if last is not None and last[0] == attempt and now - last[1] < REPEAT_WINDOW:
                return
        started, failures = self._entries.get(key, (now, 0))
        if now >= started + self.window:
            started, failures = now, 0
        self._entries[key] = (started, failures + 1)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def succeeded(self, address: str, user: str) -> None:
        self._entries.pop((address, user), None)
        self._last_attempt.pop((address, user), None)

    def cached_login(self, address: str, user: str, now: float) -> None:
        """A login the login cache vouched for: the pair's failures are forgotten unless it is
        locked out (it then stays locked). Nothing to look up when no failure is recorded at all,
        as on every request of a busy gateway nobody guesses against."""
        if (self._entries or self._last_attempt) and self.retry_after(address, user, now) is None:
            self.succeeded(address, user)

    def __len__(self) -> int:
        return len(self._entries)
