"""HTTP answers to the service's errors (service/errors.py maps each to its status).

Every error body is JSON, 5xx included: `{"detail": "..."}` on our routes, `{"error":
"..."}` under /v2 (the Open Inference Protocol's shape), as the request's operation says.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.context import OTHER, Operation
from service.errors import ServiceError

log = logging.getLogger(__name__)
CONTEXT = "context"  # scope["state"] key (service/http/door.py)


def error_body(operation: Operation, message: str) -> dict[str, str]:
    """`{"error": ...}` for the Open Inference Protocol, else `{"detail": ...}` (FastAPI's)."""
    return {"error" if operation.v2 else "detail": message}


def error_response(operation: Operation, status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(operation, message), status_code=status, headers=headers)


def operation_of_request(request: Request) -> Operation:
    # The door sets the context of every request it lets in.
    context = request.scope.get("state", {}).get(CONTEXT)
    return OTHER if context is None else context.operation


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        operation = operation_of_request(request)
        return error_response(operation, exc.status_code, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        operation = operation_of_request(request)
        return error_response(operation, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        operation = operation_of_request(request)
        if operation.v2:  # the protocol's shape: one message
            return error_response(operation, 400, _first_problem(exc))
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log, not to whoever sent the request.
        log.exception("unexpected error", extra={"path": request.url.path})
        return error_response(
            operation_of_request(request), 500, "internal server error; the log has the detail"
        )


def _first_problem(exc: RequestValidationError) -> str:
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    ]
    return "invalid request: " + "; ".join(problems[:3])
