"""The service's domain errors and, in one place, the HTTP status each one maps to.

Model and image code raise these; only `install_handlers` knows about HTTP.
"""

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.config import Settings


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(ServiceError):
    """Not an image, truncated, the wrong size, or a format we do not take."""

    status_code = 422


class UploadTooLarge(ServiceError):
    """Too many bytes, or a header claiming more pixels than we will decode."""

    status_code = 413


class TooManyImages(ServiceError):
    status_code = 413


class UnknownModel(ServiceError):
    status_code = 404


class ReportNotFound(ServiceError):
    status_code = 404


class NotReady(ServiceError):
    """No model is loaded (yet); the message says why."""

    status_code = 503


class InvalidModel(ServiceError):
    """An .onnx file that is not one of our exported models; reported, never served."""


class DeviceUnavailable(ServiceError):
    """DEVICE=cuda and the CUDA provider cannot be used: startup fails."""


def install_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 413:  # the body limit, hit while the upload streamed in
            return JSONResponse(
                {
                    "detail": f"the request body is above {settings.max_request_bytes:,} bytes: "
                    f"at most {settings.max_upload_bytes:,} bytes per image and "
                    f"{settings.max_images_per_request} images per request"
                },
                status_code=413,
            )
        return await http_exception_handler(request, exc)
