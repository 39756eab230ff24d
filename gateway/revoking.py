"""Voiding every token issued to a user until now, wherever gateways look: Redis (every gateway
applies it at once) and the revocations file (read within reload_interval). What `token revoke`
does, and `robot revoke` and `robot rotate` for the robot's tokens."""

from __future__ import annotations

from pathlib import Path

from gateway.config import Settings
from gateway.tokens import revocations


class RevokeError(Exception):
    """Nowhere to record it, or a place that refused it; the message names the setting."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def revoke_everywhere(settings: Settings | None, path: Path | None, user: str) -> list[str]:
    """Revoke `user`'s tokens in Redis (settings' redis_url) and in the file `path`; where it
    was recorded, in words. Waits until a token issued now would be newer than the revocation."""
    redis_url = settings.redis_url if settings is not None else None
    if path is None and redis_url is None:
        raise RevokeError(
            "nowhere to record it: set redis_url (GATEWAY_REDIS_URL) or token_revocations "
            "(GATEWAY_TOKEN_REVOCATIONS), or pass --file",
            2,
        )
    if path is not None and not path.parent.is_dir():
        raise RevokeError(f"{path.parent} does not exist", 2)
    moment = revocations.revocation_moment()
    where = []
    if redis_url is not None and settings is not None:
        from gateway.shared import revocations as shared_revocations
        from gateway.shared.link import describe

        try:
            shared_revocations.revoke(
                redis_url, settings.redis_password_file, settings.redis_ca_file, user, moment
            )
        except Exception as exc:  # redis-py's errors, a password file that cannot be read
            raise RevokeError(
                f"redis_url: cannot record the revocation in {describe(redis_url)}: {exc}", 1
            ) from None
        where.append(f"Redis at {describe(redis_url)}: every gateway applies it at once")
    if path is not None:
        revocations.revoke(path, user, moment)
        where.append(f"{path}: gateways reading it notice within reload_interval")
    revocations.wait_until_accepted(moment)
    return where
