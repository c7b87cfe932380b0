"""The service's domain errors and, in one place, the HTTP status each one maps to.

Model and image code raise these; only `install_handlers` knows about HTTP. Every error
body is JSON, 5xx included: `{"detail": "..."}` on our routes, `{"error": "..."}` under
/v2 (the Open Inference Protocol's shape).
"""

import logging
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(ServiceError):
    """Not an image, truncated, the wrong size, or a format we do not take."""

    status_code = 422


class InvalidTensor(ServiceError):
    """An inference request whose tensors do not fit the model (wrong name, shape, type)."""

    status_code = 400


class BadParameter(ServiceError):
    """A parameter this model cannot honour (an unknown class, a floor it cannot apply)."""

    status_code = 422


class Unfamiliar(ServiceError):
    """An image below the familiarity floor asked for: unlike what the model was trained
    on, so its answer is refused rather than trusted."""

    status_code = 422


class UploadTooLarge(ServiceError):
    """Too many bytes, or more pixels than we will decode (per image or per request)."""

    status_code = 413


class TooManyImages(ServiceError):
    status_code = 413


class Unauthorized(ServiceError):
    status_code = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class UnknownModel(ServiceError):
    status_code = 404


class ReportNotFound(ServiceError):
    status_code = 404


class NotReady(ServiceError):
    """No model is loaded (yet), or the server is shutting down; the message says why."""

    status_code = 503


class Overloaded(ServiceError):
    """Shed at once: the model's queue or the large-image decoders are full."""

    status_code = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could be answered; its work was skipped."""

    status_code = 504


class ClientGone(ServiceError):
    """The client closed the connection while its request waited (nginx's 499)."""

    status_code = 499


class InvalidModel(ServiceError):
    """An .onnx file that is not one of our exported models; reported, never served."""


class DeviceUnavailable(ServiceError):
    """DEVICE=cuda and the CUDA provider cannot be used: startup fails."""


def error_body(path: str, message: str) -> dict[str, str]:
    """The error body for `path`: `{"error": ...}` under /v2 (the protocol's), else
    `{"detail": ...}` (FastAPI's)."""
    return {"error" if path.startswith("/v2") else "detail": message}


def error_response(path: str, status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(path, message), status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v2"):  # the protocol's shape: one message
            return error_response(request.url.path, 400, _first_problem(exc))
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log, not to whoever sent the request.
        log.exception("unexpected error", extra={"path": request.url.path})
        return error_response(
            request.url.path, 500, "internal server error; the log has the detail"
        )


def _first_problem(exc: RequestValidationError) -> str:
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    ]
    return "invalid request: " + "; ".join(problems[:3])
