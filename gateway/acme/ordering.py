"""One certificate order with the CA, synchronously (certbot's `acme` library, run on a thread by
gateway.acme.manager): the account (made on first use, found again by its key afterwards), the
order for the names, each authorization answered with a challenge the gateway can serve, and
the finalized certificate. The library is Let's Encrypt's own client code (certbot's), kept in
step with RFC 8555 and the CAs; TLS-ALPN-01, which it no longer ships, is declared here."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from acme import challenges, client, errors, messages
from acme import crypto_util as acme_crypto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from gateway.acme.challenges import tls_alpn01_certificate
from gateway.acme.storage import Storage

log = logging.getLogger("gateway.acme")

ORDER_TIMEOUT = 90.0  # seconds an order may take to validate and be issued
USER_AGENT = "registry-gateway"


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737's response (an empty object, as every key-authorization response)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **unused: Any) -> str:
        """What the challenge certificate carries the digest of (RFC 8737, 3)."""
        return self.key_authorization(account_key)


class OrderFailed(Exception):
    """The CA did not issue: the message says why, naming the challenge that was refused."""


@dataclass(frozen=True)
class Order:
    directory: str
    names: Sequence[str]
    email: str | None
    challenges: Sequence[str]  # in the order of preference: "http-01", "tls-alpn-01"
    ca_file: Path | None


def obtain(order: Order, storage: Storage) -> None:
    """Order a certificate for `order.names` and store it with its new key. Raises OrderFailed
    (the CA refused: a challenge, the account, the order) or OSError and the like (unreachable)."""
    account_key = JWKEC(key=storage.account_key())
    acme, network = _client(order, account_key)
    registration = messages.NewRegistration.from_data(email=order.email, terms_of_service_agreed=True)
    try:
        network.account = acme.new_account(registration)
    except errors.ConflictError as exc:  # the key has an account already: use it
        found = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        network.account = acme.query_registration(found)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ordered = acme.new_order(acme_crypto.make_csr(key_pem, list(order.names)))
    answered: list[Path] = []
    try:
        for authorization in ordered.authorizations:
            name = authorization.body.identifier.value
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated recently for this account (CAs reuse them): nothing to answer
            chosen = _choose(authorization.body.challenges, order.challenges)
            if chosen is None:
                offered = ", ".join(str(challb.chall.typ) for challb in authorization.body.challenges)
                allowed = ", ".join(order.challenges)
                raise OrderFailed(f"the CA offers {offered} for {name}; acme_challenges allows {allowed}")
            chall = chosen.chall
            assert isinstance(chall, challenges.KeyAuthorizationChallenge)
            key_authorization = chall.key_authorization(account_key)
            if isinstance(chall, challenges.HTTP01):
                answered.append(storage.answer_http01(chall.encode("token"), key_authorization))
            else:
                answer = tls_alpn01_certificate(name, key_authorization)
                answered.append(storage.answer_tls_alpn01(name, answer))
            acme.answer_challenge(chosen, chall.response(account_key))
        deadline = dt.datetime.now() + dt.timedelta(seconds=ORDER_TIMEOUT)
        try:
            finished = acme.poll_and_finalize(ordered, deadline)
        except errors.ValidationError as exc:
            raise OrderFailed(_refusals(exc)) from None
        except errors.TimeoutError:
            raise OrderFailed(f"the CA did not validate within {ORDER_TIMEOUT:.0f} s") from None
    finally:
        for path in answered:
            path.unlink(missing_ok=True)
    storage.save(finished.fullchain_pem.encode(), key)


def renewal_window(order: Order, chain: bytes) -> tuple[dt.datetime | None, dt.datetime]:
    """When the CA suggests renewing this certificate (ARI, RFC 9773: a moment the library draws
    from the window), None when its directory has no renewalInfo; and when to ask again (naive
    when the library read a Retry-After: see manager._utc). Raises errors.ARIError (with when to
    ask again) or OSError and the like when the CA cannot be asked. The renewal info is an
    unauthenticated GET: no account key is read, let alone made."""
    acme, _ = _client(order, None)
    return acme.renewal_time(chain)


def _client(order: Order, account_key: JWK | None) -> tuple[client.ClientV2, client.ClientNetwork]:
    network = client.ClientNetwork(
        cast(JWK, account_key),  # None: only GETs, which are not signed
        alg=ES256,
        # requests takes a CA bundle's path where the library's hint says bool
        verify_ssl=cast(bool, str(order.ca_file)) if order.ca_file else True,
        user_agent=USER_AGENT,
        timeout=30,
    )
    directory = client.ClientV2.get_directory(order.directory, network)
    return client.ClientV2(directory, net=network), network


def _choose(
    offered: Sequence[messages.ChallengeBody], allowed: Sequence[str]
) -> messages.ChallengeBody | None:
    for kind in allowed:
        for challb in offered:
            if challb.chall.typ == kind and isinstance(challb.chall, challenges.KeyAuthorizationChallenge):
                return challb
    return None


def _refusals(exc: errors.ValidationError) -> str:
    """Which challenge the CA refused for which name, and what it said."""
    said = []
    for authorization in exc.failed_authzrs:
        for challb in authorization.body.challenges:
            if challb.error is not None:
                said.append(
                    f"{challb.chall.typ} for {authorization.body.identifier.value} refused: "
                    f"{challb.error.detail or challb.error.typ}"
                )
    return "; ".join(said) or "the CA refused the challenges"
