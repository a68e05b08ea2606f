"""APIError and the one renderer of OpenAI's error envelope {"error": {"message", "type", "param", "code"}}.

Every failure the gateway reports, JSON or SSE, goes through `error_body`; unexpected exceptions become a generic 500.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status_code, "server_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(error: APIError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status_code, headers=error.headers)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the top-level field (OpenAI names the request parameter)."""
    first = exc.errors(include_url=False)[0]
    loc = [part for part in first["loc"] if isinstance(part, str)]
    param = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {'.'.join(loc)}", param=param, code="unrecognized_argument")
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return bad_request(f"Invalid value for '{where}': {first['msg']}", param=param, code="invalid_value")


def from_engine_error(exc: Exception, retry_after_s: int) -> APIError:
    """Map an engine exception (or anything unexpected) to the status the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        headers = {"Retry-After": str(retry_after_s)}
        return APIError(429, "The server is overloaded; retry later.", code="engine_overloaded", headers=headers)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is not running.", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        logger.error("request failed in the engine: %s", exc)
        return APIError(500, "The request failed in the engine.", code="request_failed")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (unknown route or method) in our envelope."""
    assert isinstance(exc, HTTPException)
    is_unknown_route = exc.status_code == 404
    message = f"Unknown route: {request.method} {request.url.path}" if is_unknown_route else exc.detail
    code = "not_found" if is_unknown_route else None
    return error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))
