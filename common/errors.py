"""Domain errors that carry their gRPC status code by name.

Engines raise these without importing grpc; the service runtime maps `code` to a
`grpc.StatusCode` and the message to the status details, so a person reading the error
sees what to change, and a client sees a precise code.
"""

from __future__ import annotations


class TokenmillError(Exception):
    """Base class. `code` is a `grpc.StatusCode` member name; `retryable` says whether
    retrying the same request later can succeed (job workers use it to decide between
    another attempt and failing the job at once)."""

    code = "INTERNAL"
    retryable = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(TokenmillError):
    code = "INVALID_ARGUMENT"
    retryable = False


class NotFound(TokenmillError):
    code = "NOT_FOUND"
    retryable = False


class AlreadyExists(TokenmillError):
    code = "ALREADY_EXISTS"
    retryable = False


class FailedPrecondition(TokenmillError):
    code = "FAILED_PRECONDITION"
    retryable = False


class OutOfRange(TokenmillError):
    code = "OUT_OF_RANGE"
    retryable = False


class ResourceExhausted(TokenmillError):
    code = "RESOURCE_EXHAUSTED"


class Aborted(TokenmillError):
    """A concurrent change won; retry the whole read-modify-write."""

    code = "ABORTED"


class DataLoss(TokenmillError):
    code = "DATA_LOSS"
    retryable = False


class Unauthenticated(TokenmillError):
    code = "UNAUTHENTICATED"
    retryable = False


class PermissionDenied(TokenmillError):
    code = "PERMISSION_DENIED"
    retryable = False


class Unavailable(TokenmillError):
    code = "UNAVAILABLE"


class Cancelled(TokenmillError):
    code = "CANCELLED"
    retryable = False


class DeadlineExceeded(TokenmillError):
    code = "DEADLINE_EXCEEDED"


_BY_CODE = {cls.code: cls for cls in TokenmillError.__subclasses__()}


def from_code(code_name: str, message: str) -> TokenmillError:
    """Rebuild a domain error from a status code name (used by clients)."""
    return _BY_CODE.get(code_name, TokenmillError)(message)
