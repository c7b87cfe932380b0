"""HTTP answers to the service's errors (service/errors.py maps each to its status).

Every error body is JSON, 5xx included: `{"detail": "..."}` on our routes, `{"error":
"..."}` under /v2 (the Open Inference Protocol's shape), as the request's operation says.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.context import OTHER, Operation
from service.errors import ContractError, message_of, status_of

log = logging.getLogger(__name__)
CONTEXT = "context"  # scope["state"] key (service/http/door.py)


def error_body(operation: Operation, message: str) -> dict[str, str]:
    """`{"error": ...}` for the Open Inference Protocol, else `{"detail": ...}` (FastAPI's)."""
    return {"error" if operation.v2 else "detail": message}


def error_response(operation: Operation, status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(operation, message), status_code=status, headers=headers)


def error_answer(operation: Operation, exc: Exception, path: str) -> JSONResponse:
    """The answer to an exception raised while serving `path`: a service error or an HTTP
    one with its status, anything else a 500 whose detail goes to the log, not to whoever
    sent the request. The routes' handlers and the hot path (service/routes/v2.py) both
    answer through here."""
    if isinstance(exc, ContractError):
        status = status_of(exc)
        return error_response(operation, status.http, message_of(exc), status.headers)
    if isinstance(exc, HTTPException):
        return error_response(operation, exc.status_code, str(exc.detail), exc.headers)
    log.error("unexpected error", exc_info=exc, extra={"path": path})
    return error_response(operation, 500, "internal server error; the log has the detail")


def validation_answer(err: ValidationError, where: str) -> JSONResponse:
    """FastAPI's 422 for parameters that did not validate (a route answered outside its
    machinery says the same): each problem with its location under `where`."""
    problems = [{**problem, "loc": [where, *problem["loc"]]}
                for problem in err.errors(include_url=False)]  # fmt: skip
    return JSONResponse({"detail": jsonable_encoder(problems)}, status_code=422)


def operation_of_request(request: Request) -> Operation:
    # The door sets the context of every request it lets in.
    context = request.scope.get("state", {}).get(CONTEXT)
    return OTHER if context is None else context.operation


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ContractError)
    @app.exception_handler(HTTPException)
    @app.exception_handler(Exception)
    async def answer(request: Request, exc: Exception) -> JSONResponse:
        return error_answer(operation_of_request(request), exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        operation = operation_of_request(request)
        if operation.v2:  # the protocol's shape: one message
            return error_response(operation, 400, _first_problem(exc))
        return await request_validation_exception_handler(request, exc)


def _first_problem(exc: RequestValidationError) -> str:
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    ]
    return "invalid request: " + "; ".join(problems[:3])
