"""The service's domain errors and, in one place, the status each error maps to: the
HTTP status and the gRPC status code (by its name).

Model, image and data-plane code raise these (and the contract's own, contract/errors.py);
each transport turns them into its own answer (service/http/errors.py,
service/rpc/servicer.py) with the same message, through `status_of`.
"""

from dataclasses import dataclass

from contract.errors import (
    ContractError,
    DeviceUnavailable,
    InvalidImage,
    InvalidModel,
    UploadTooLarge,
)

__all__ = [
    "STATUSES", "BadParameter", "ClientGone", "ContractError", "DeadlineExceeded",
    "DeviceUnavailable", "Forbidden", "InvalidImage", "InvalidModel", "InvalidTensor",
    "NotReady", "Overloaded", "ReportNotFound", "RolloutConflict", "ServiceError", "Status",
    "TooManyImages", "Unauthorized",
    "Unfamiliar", "UnknownModel", "UploadTooLarge", "message_of", "quoted", "status_of",
]  # fmt: skip


class ServiceError(ContractError):
    """An error the service raises itself (the contract's errors are its siblings)."""


class InvalidTensor(ServiceError):
    """An inference request whose tensors do not fit the model (wrong name, shape, type)."""


class BadParameter(ServiceError):
    """A parameter this model cannot honour (an unknown class, a floor it cannot apply)."""


class Unfamiliar(ServiceError):
    """An image below the familiarity floor asked for: unlike what the model was trained
    on, so its answer is refused rather than trusted."""


class TooManyImages(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class UnknownModel(ServiceError):
    pass


class Forbidden(ServiceError):
    """A route that is off on this server (the admin routes without ADMIN_KEYS)."""


class RolloutConflict(ServiceError):
    """A rollout change the models served cannot take: a candidate that is not loaded
    (its file failed its self-check or signature, or is gone), or one already serving."""


class ReportNotFound(ServiceError):
    pass


class NotReady(ServiceError):
    """No model is loaded (yet), or the server is shutting down; the message says why."""


class Overloaded(ServiceError):
    """Shed at once: the model's queue or the large-image decoders are full."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could be answered; its work was skipped."""


class ClientGone(ServiceError):
    """The client closed the connection while its request waited (nginx's 499)."""


@dataclass(frozen=True)
class Status:
    http: int
    grpc: str  # a grpc.StatusCode name
    headers: dict[str, str] | None = None


STATUSES: dict[type[ContractError], Status] = {
    InvalidImage: Status(422, "INVALID_ARGUMENT"),
    InvalidTensor: Status(400, "INVALID_ARGUMENT"),
    BadParameter: Status(422, "INVALID_ARGUMENT"),
    Unfamiliar: Status(422, "INVALID_ARGUMENT"),
    UploadTooLarge: Status(413, "INVALID_ARGUMENT"),
    TooManyImages: Status(413, "INVALID_ARGUMENT"),
    Unauthorized: Status(401, "UNAUTHENTICATED", {"WWW-Authenticate": "Bearer"}),
    Forbidden: Status(403, "PERMISSION_DENIED"),
    UnknownModel: Status(404, "NOT_FOUND"),
    RolloutConflict: Status(409, "FAILED_PRECONDITION"),
    ReportNotFound: Status(404, "NOT_FOUND"),
    NotReady: Status(503, "UNAVAILABLE"),
    Overloaded: Status(503, "RESOURCE_EXHAUSTED", {"Retry-After": "1"}),
    DeadlineExceeded: Status(504, "DEADLINE_EXCEEDED"),
    ClientGone: Status(499, "CANCELLED"),
    # A file that cannot be served, a device that cannot be used: never a client's fault.
    ContractError: Status(500, "INTERNAL"),
}


QUOTED = 200  # characters of a client's text an error message repeats
MAX_MESSAGE = 2048  # characters of any error message a transport sends


def quoted(text: str, limit: int = QUOTED) -> str:
    """A client's text as an error message repeats it: repr, cut to `limit` characters
    and marked so (a 300 KB model name must not come back whole)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... (cut: {len(text):,} characters)"


def message_of(err: ContractError) -> str:
    """The message a transport sends for `err`: its own, bounded whatever it repeats."""
    message = err.message
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}... (cut: {len(message):,} characters)"


def status_of(err: ContractError) -> Status:
    """The status `err` is answered with: its class's, else its nearest ancestor's."""
    for kind in type(err).__mro__:
        if kind in STATUSES:
            return STATUSES[kind]
    raise AssertionError("ContractError is in STATUSES")
