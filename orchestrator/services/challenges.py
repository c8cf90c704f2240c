"""One-time signed challenges (EIP-191): how a worker proves its key at registration and how
a client proves it controls a payer account. Issued and redeemed the same way; the message
names its purpose, so a challenge for one cannot be spent on the other."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from sqlalchemy.orm import Session

from orchestrator.exceptions import BadSignature, Unauthorized
from orchestrator.services.jobs import ts
from orchestrator.store import Store
from orchestrator.store.models import Challenge
from protocol import ChallengeResponse
from protocol.signing import recover_registration_signer

NONCE_BYTES = 24


def issue_challenge(
    store: Store,
    address: str,
    ttl_s: float,
    now: float,
    message_for: Callable[[str, str], str],
) -> ChallengeResponse:
    """Store a fresh challenge; ``message_for(nonce, expires_iso)`` writes its text."""
    nonce = secrets.token_urlsafe(NONCE_BYTES)
    expires_at = now + ttl_s
    message = message_for(nonce, ts(expires_at).isoformat())
    with store.transaction() as s:
        s.add(
            Challenge(
                nonce=nonce,
                address=address.lower(),
                message=message,
                expires_at=expires_at,
                used=False,
            )
        )
    return ChallengeResponse(nonce=nonce, message=message, expires_at=ts(expires_at))


def redeem_challenge(
    s: Session,
    nonce: str,
    address: str,
    signature: str,
    now: float,
    *,
    purpose: str,
    where: str,
) -> str:
    """Spend the challenge in the caller's transaction; returns the checksummed signer.

    ``purpose`` must be in the message (e.g. its first line); ``where`` is the route that
    issues such challenges, named in the errors.
    """
    challenge = s.get(Challenge, nonce, with_for_update=True)
    if (
        challenge is None
        or challenge.used
        or challenge.address != address.lower()
        or purpose not in challenge.message
    ):
        raise Unauthorized(f"unknown or used challenge; get one at POST {where}")
    if challenge.expires_at < now:
        raise Unauthorized(f"challenge expired; get a new one at POST {where}")
    try:
        signer = recover_registration_signer(challenge.message, signature)
    except ValueError as exc:
        raise BadSignature(f"signature could not be decoded: {exc}") from exc
    if signer.lower() != address.lower():
        raise BadSignature(
            f"signature was made by {signer}, not {address}; sign the challenge message with "
            f"the key of {address}"
        )
    challenge.used = True
    return signer
