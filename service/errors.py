"""The service's domain errors and, in one place, the status each one maps to: the HTTP
status (`status_code`) and the gRPC status code (`code`, by its name).

Model, image and data-plane code raise these; each transport turns them into its own
answer (service/http/errors.py, service/rpc/servicer.py) with the same message.
"""

from typing import ClassVar


class ServiceError(Exception):
    status_code = 500
    code = "INTERNAL"
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(ServiceError):
    """Not an image, truncated, the wrong size, or a format we do not take."""

    status_code = 422
    code = "INVALID_ARGUMENT"


class InvalidTensor(ServiceError):
    """An inference request whose tensors do not fit the model (wrong name, shape, type)."""

    status_code = 400
    code = "INVALID_ARGUMENT"


class BadParameter(ServiceError):
    """A parameter this model cannot honour (an unknown class, a floor it cannot apply)."""

    status_code = 422
    code = "INVALID_ARGUMENT"


class Unfamiliar(ServiceError):
    """An image below the familiarity floor asked for: unlike what the model was trained
    on, so its answer is refused rather than trusted."""

    status_code = 422
    code = "INVALID_ARGUMENT"


class UploadTooLarge(ServiceError):
    """Too many bytes, or more pixels than we will decode (per image or per request)."""

    status_code = 413
    code = "INVALID_ARGUMENT"


class TooManyImages(ServiceError):
    status_code = 413
    code = "INVALID_ARGUMENT"


class Unauthorized(ServiceError):
    status_code = 401
    code = "UNAUTHENTICATED"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class UnknownModel(ServiceError):
    status_code = 404
    code = "NOT_FOUND"


class ReportNotFound(ServiceError):
    status_code = 404
    code = "NOT_FOUND"


class NotReady(ServiceError):
    """No model is loaded (yet), or the server is shutting down; the message says why."""

    status_code = 503
    code = "UNAVAILABLE"


class Overloaded(ServiceError):
    """Shed at once: the model's queue or the large-image decoders are full."""

    status_code = 503
    code = "RESOURCE_EXHAUSTED"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could be answered; its work was skipped."""

    status_code = 504
    code = "DEADLINE_EXCEEDED"


class ClientGone(ServiceError):
    """The client closed the connection while its request waited (nginx's 499)."""

    status_code = 499
    code = "CANCELLED"


class InvalidModel(ServiceError):
    """An .onnx file that is not one of our exported models; reported, never served."""


class DeviceUnavailable(ServiceError):
    """DEVICE=cuda and the CUDA provider cannot be used: startup fails."""
