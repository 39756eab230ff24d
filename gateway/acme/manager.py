"""When to order: at start when no valid certificate for the names is stored; then at the moment
the CA suggests (ARI, RFC 9773, when its directory offers renewalInfo, asked again when it says,
six-hourly by default), or else when a third of its lifetime is left; on failure again after a
growing delay (5 s doubling to an hour), the current certificate served until it expires
meanwhile, and the log, `/readyz` and `registry_gateway_certificate_days_left` saying so. Orders
run on a thread under the storage directory's lock, and whoever takes the lock first looks again:
a gateway that finds a fresh certificate another one stored takes it instead of ordering."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from acme import errors

from gateway.acme.ordering import Order, obtain, renewal_window
from gateway.acme.storage import Storage, Stored

log = logging.getLogger("gateway.acme")

FIRST_RETRY = 5.0  # seconds after a failed order
LAST_RETRY = 3600.0
LONGEST_SLEEP = 3600.0  # look again at least hourly (another gateway may have renewed)
ARI_RETRY = dt.timedelta(hours=1)  # after a failure to ask the CA that says nothing of when
# The CA's Retry-After, kept within sense (RFC 9773, 4.3.3): a 0 or a date in the past must not
# make every worker ask each second, nor a huge one keep a revocation's new window unseen.
ARI_SOONEST = dt.timedelta(minutes=1)
ARI_LATEST = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Suggestion:
    """What the CA said of one certificate (by serial): renew at `moment` (None: it has no
    renewal info), and ask again at `ask_again`."""

    serial: int
    moment: dt.datetime | None
    ask_again: dt.datetime


class CertificateManager:
    def __init__(self, order: Order, storage: Storage, on_new: Callable[[], object]) -> None:
        self.order = order
        self.storage = storage
        self.on_new = on_new  # the TLS listener takes the new pair
        self.problem: str | None = None
        self.failing_since: dt.datetime | None = None
        self.next_try: dt.datetime | None = None
        self.suggestion: Suggestion | None = None
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

    def renew_at(self, stored: Stored) -> dt.datetime:
        """The CA's suggestion for this certificate when it made one before it expires, else
        when a third of its lifetime is left."""
        suggestion = self.suggestion
        if (
            suggestion is not None
            and suggestion.serial == stored.serial
            and suggestion.moment is not None
            and suggestion.moment < stored.not_after
        ):
            return suggestion.moment
        return stored.renew_at()

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
            said = f"valid until {_when(stored.not_after)}, renewed from {_when(self.renew_at(stored))}"
            if self.renew_at(stored) != stored.renew_at():
                said += " (the CA's renewal window)"
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
        soon_again = FIRST_RETRY  # the wait when a certificate just obtained is due already
        while True:
            stored = self.current()
            if stored is not None and dt.datetime.now(dt.UTC) < stored.not_after:
                await self._ask_the_ca(stored)
            now = dt.datetime.now(dt.UTC)
            if stored is not None and now < self.renew_at(stored):
                until = min(self.renew_at(stored), self.suggestion.ask_again if self.suggestion else now)
                wait = min((until - now).total_seconds(), LONGEST_SLEEP)
                await asyncio.sleep(max(wait, 0.1))
                continue
            try:
                ordered = await asyncio.to_thread(self._order_under_lock, stored.serial if stored else None)
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
            if fresh is None:
                continue
            log.info(
                "certificate for %s %s, valid until %s",
                ", ".join(self.order.names),
                "obtained" if ordered else "taken from the storage another gateway renewed",
                _when(fresh.not_after),
            )
            await self._ask_the_ca(fresh)
            if dt.datetime.now(dt.UTC) >= self.renew_at(fresh):
                # Due the moment it arrived (a CA's window already past, a clock ahead): renewing
                # at once would order again and again; wait, longer each time, as for a failure.
                log.warning(
                    "acme_directory: the new certificate is due for renewal already (renew from %s); "
                    "next try in %.0f s",
                    _when(self.renew_at(fresh)),
                    soon_again,
                )
                await asyncio.sleep(soon_again)
                soon_again = min(soon_again * 2, LAST_RETRY)
            else:
                soon_again = FIRST_RETRY

    async def _ask_the_ca(self, stored: Stored) -> None:
        """The CA's renewal window for `stored`, when it is time to ask (a new certificate, or
        the CA's Retry-After passed, kept between a minute and a day). A CA that cannot be asked
        leaves the third of the lifetime to decide meanwhile: worth a line in the log, not a
        warning. The library draws a moment from the window at each ask; for the same
        certificate the earliest drawn is kept, so that asking again never postpones a renewal
        (a CA that moves the window earlier, for a revocation, is followed)."""
        known = (
            self.suggestion
            if self.suggestion is not None and self.suggestion.serial == stored.serial
            else None
        )
        if known is not None and dt.datetime.now(dt.UTC) < known.ask_again:
            return
        moment = known.moment if known is not None else None
        try:
            drawn, ask_again = await asyncio.to_thread(renewal_window, self.order, stored.pem)
        except errors.ARIError as exc:
            ask_again = exc.retry_after
            log.info(
                "acme_directory: the CA's renewal window could not be read (%s)",
                _reason(exc.__cause__ or exc),
            )
        except Exception as exc:  # an unreachable CA: renewal itself will say so if it must
            ask_again = dt.datetime.now(dt.UTC) + ARI_RETRY
            log.info("acme_directory: the CA's renewal window could not be read (%s)", _reason(exc))
        else:
            if drawn is not None and (moment is None or drawn < moment):
                moment = drawn
                log.info(
                    "acme_directory: the CA suggests renewing the certificate at %s (ARI)", _when(moment)
                )
        now = dt.datetime.now(dt.UTC)
        ask_again = min(max(_utc(ask_again), now + ARI_SOONEST), now + ARI_LATEST)
        self.suggestion = Suggestion(stored.serial, moment, ask_again)

    def _order_under_lock(self, seen: int | None) -> bool:
        """Order, unless another gateway sharing the storage has meanwhile (the certificate
        stored is no longer the one seen, `seen` its serial, and is fresh); True when this one did."""
        with self.storage.ordering():
            stored = self.current()
            fresh = stored is not None and dt.datetime.now(dt.UTC) < stored.renew_at()
            if stored is not None and stored.serial != seen and fresh:
                return False
            obtain(self.order, self.storage)
            return True


def _utc(moment: dt.datetime) -> dt.datetime:
    """The library's "ask again at" is naive: local time for a Retry-After in seconds, UTC for
    one that is a date (a difference it does not keep). Taken as local: exact in a container,
    whose zone is UTC, and off by the zone's offset at most elsewhere, within ARI_SOONEST and
    ARI_LATEST."""
    return moment.astimezone(dt.UTC) if moment.tzinfo is None else moment


def _when(moment: dt.datetime | None) -> str:
    return "?" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
