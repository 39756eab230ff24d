"""When to order: at start when no valid certificate for the names is stored, then when a third
of its lifetime is left; on failure again after a growing delay (5 s doubling to an hour), the
current certificate served until it expires meanwhile, and the log, `/readyz` and
`registry_gateway_certificate_days_left` saying so. Orders run on a thread under the storage
directory's lock, and whoever takes the lock first looks again: a gateway that finds a fresh
certificate another one stored takes it instead of ordering."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable

from gateway.acme.ordering import Order, obtain
from gateway.acme.storage import Storage, Stored

log = logging.getLogger("gateway.acme")

FIRST_RETRY = 5.0  # seconds after a failed order
LAST_RETRY = 3600.0
LONGEST_SLEEP = 3600.0  # look again at least hourly (another gateway may have renewed)


class CertificateManager:
    def __init__(self, order: Order, storage: Storage, on_new: Callable[[], object]) -> None:
        self.order = order
        self.storage = storage
        self.on_new = on_new  # the TLS listener takes the new pair
        self.problem: str | None = None
        self.failing_since: dt.datetime | None = None
        self.next_try: dt.datetime | None = None
        self._task: asyncio.Task[None] | None = None

    def current(self) -> Stored | None:
        stored = self.storage.stored()
        if stored is None or not set(self.order.names) <= stored.names:
            return None
        return stored

    def days_left(self) -> float | None:
        stored = self.current()
        if stored is None:
            return None
        return (stored.not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400

    def ready(self) -> bool:
        stored = self.current()
        return stored is not None and dt.datetime.now(dt.UTC) < stored.not_after

    def status(self) -> str:
        """For /readyz."""
        stored = self.current()
        now = dt.datetime.now(dt.UTC)
        if stored is None or now >= stored.not_after:
            said = "no valid certificate yet" if stored is None else f"expired at {_when(stored.not_after)}"
        else:
            said = f"valid until {_when(stored.not_after)}, renewed from {_when(stored.renew_at())}"
        if self.problem is not None:
            said += f"; ordering fails since {_when(self.failing_since)}: {self.problem}"
            if self.next_try is not None:
                said += f"; next try at {_when(self.next_try)}"
        return said

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="acme")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = FIRST_RETRY
        while True:
            stored = self.current()
            now = dt.datetime.now(dt.UTC)
            if stored is not None and now < stored.renew_at():
                wait = min((stored.renew_at() - now).total_seconds(), LONGEST_SLEEP)
                await asyncio.sleep(max(wait, 0.1))
                continue
            try:
                ordered = await asyncio.to_thread(self._order_under_lock)
            except Exception as exc:  # the CA's refusal, an unreachable CA, a full disk: all retried
                self.problem = _reason(exc)
                self.failing_since = self.failing_since or now
                self.next_try = now + dt.timedelta(seconds=delay)
                serving = (
                    f"serving the certificate valid until {_when(stored.not_after)}"
                    if stored
                    else "no certificate yet"
                )
                log.warning(
                    "acme_directory: ordering a certificate for %s failed (%s); %s; next try in %.0f s",
                    ", ".join(self.order.names),
                    self.problem,
                    serving,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LAST_RETRY)
                continue
            delay = FIRST_RETRY
            if self.problem is not None:
                log.warning("acme_directory: ordering works again")
            self.problem = self.failing_since = self.next_try = None
            self.on_new()
            fresh = self.current()
            if fresh is not None:
                log.info(
                    "certificate for %s %s, valid until %s",
                    ", ".join(self.order.names),
                    "obtained" if ordered else "taken from the storage another gateway renewed",
                    _when(fresh.not_after),
                )

    def _order_under_lock(self) -> bool:
        """Order, unless another gateway sharing the storage has meanwhile; True when this one did."""
        with self.storage.ordering():
            stored = self.current()
            if stored is not None and dt.datetime.now(dt.UTC) < stored.renew_at():
                return False
            obtain(self.order, self.storage)
            return True


def _when(moment: dt.datetime | None) -> str:
    return "?" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
