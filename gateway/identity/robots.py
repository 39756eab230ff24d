"""Robots as an identity source: `robot+NAME` and the secret `robot create` printed, checked
against the robots file's keyed hash (gateway.robots). Asked first, and the only source for names
starting with `robot+`: such a name is never looked up in the htpasswd file, a directory or a
program, and one the file does not have is rejected here, not passed on. Lasting, like the
htpasswd file: a robot stays one until the file changes (expiry is the account's, checked at
every login, cached or not)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from gateway.identity import Rejected, Unknown, Verdict, Verified
from gateway.robots import Robot, robot_name

log = logging.getLogger(__name__)

USE_RECORDED_EVERY = 60.0  # seconds: `robot list`'s "last used" is that precise, at no cost per login


class RobotSource:
    name = "robot"
    lasting = True
    last_problem: str | None = None

    def __init__(self, robots: Mapping[str, Robot], record_use: Callable[[str], None] | None = None) -> None:
        self._robots = robots
        self._record_use = record_use
        self._recorded: dict[str, float] = {}
        self._told = False

    async def verify(self, user: str, password: str) -> Verdict:
        if robot_name(user) is None:
            return Unknown()
        robot = self._robots.get(user)
        if robot is None or not robot.matches(password):
            return Rejected()
        self._note_use(robot)
        return Verified(user, robot.account_labels(), self.name)

    def _note_use(self, robot: Robot) -> None:
        now = time.monotonic()
        if (
            self._record_use is None
            or now - self._recorded.get(robot.name, -USE_RECORDED_EVERY) < USE_RECORDED_EVERY
        ):
            return
        self._recorded[robot.name] = now
        task = asyncio.get_running_loop().run_in_executor(None, self._record_use, robot.name)
        task.add_done_callback(self._logged)

    def _logged(self, done: asyncio.Future[None]) -> None:
        """Once per robots file loaded: a read-only folder says so once, not at every login."""
        if not done.cancelled() and done.exception() is not None and not self._told:
            self._told = True
            log.warning(
                "robots: cannot record when robots log in (%s); `robot list` shows what was recorded",
                done.exception(),
            )
