"""Every error the orchestrator raises on purpose, and the HTTP status each maps to.

    GpumarketError                     500 (never raised bare)
    ├── InvalidInput                   422  bad field values or combinations
    │   └── BadSignature               422  a signature that does not recover the sender
    ├── Unauthorized                   401  missing or unknown credentials
    ├── Forbidden                      403  credentials fine, resource not yours
    ├── NotFound                       404
    ├── PaymentRequired                402  no payer linked, or not enough authorised funds
    ├── Conflict                       409  state does not allow it (stale attempt, final job)
    ├── PayloadTooLarge                413
    ├── TooManyRequests                429  a per-address rate limit; Retry-After says when
    └── InsufficientStorage            507  the blob store's disk is full

The API maps each to an RFC 9457 problem response: {type, title, status, code, detail}.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GpumarketError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(GpumarketError):
    status = 422
    code = "invalid_input"


class BadSignature(InvalidInput):
    code = "bad_signature"


class Unauthorized(GpumarketError):
    status = 401
    code = "unauthorized"


class Forbidden(GpumarketError):
    status = 403
    code = "forbidden"


class NotFound(GpumarketError):
    status = 404
    code = "not_found"


class PaymentRequired(GpumarketError):
    status = 402
    code = "payment_required"


class Conflict(GpumarketError):
    status = 409
    code = "conflict"


class PayloadTooLarge(GpumarketError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(GpumarketError):
    """``retry_after_s`` (whole seconds) goes out as the Retry-After header and in the body."""

    status = 429
    code = "too_many_requests"

    def __init__(self, detail: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.retry_after_s = retry_after_s


class InsufficientStorage(GpumarketError):
    status = 507
    code = "insufficient_storage"
