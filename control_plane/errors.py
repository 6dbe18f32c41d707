"""Domain errors. The API maps them to HTTP in one table (control_plane/api/errors.py);
the CLI prints their message. Nothing below the API layer knows about HTTP."""

from __future__ import annotations


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(DomainError):
    code = "invalid_input"


class NotFound(DomainError):
    code = "not_found"

    def __init__(self, resource: str, resource_id: str) -> None:
        super().__init__(f"{resource} {resource_id!r} not found")
        self.resource = resource
        self.resource_id = resource_id


class Unauthenticated(DomainError):
    code = "unauthenticated"


class Forbidden(DomainError):
    code = "forbidden"


class Conflict(DomainError):
    code = "conflict"


class Gone(DomainError):
    code = "gone"


class RateLimited(DomainError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason  # the stable ``details.reason`` of the answer, when there is one


class CapacityExceeded(RateLimited):
    """Starting the workload would take the org past its ceiling of GPUs of one type
    (control_plane/services/capacity.py). ``details.reason`` is Loops' ``loops_capacity``,
    which its SDK retries after ``Retry-After``; the tinker SDK retries any 429."""

    code = "capacity_exceeded"
    REASON = "loops_capacity"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s, reason=self.REASON)


class LimitExceeded(RateLimited):
    """An org guard rail (active sessions, active runs, futures in flight): ``reason`` names it."""

    code = "limit_exceeded"


class Unavailable(DomainError):
    code = "unavailable"


class PayloadTooLarge(DomainError):
    code = "payload_too_large"


class RunOrSamplerRequired(InvalidInput):
    """A Loops data-plane request names neither (or both) of its run and sampler."""

    code = "run_or_sampler_required"
