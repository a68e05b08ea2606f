"""Reading a request body under the size limit (counted while streaming in) and parsing it into a protocol model."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.errors import APIError, bad_request, from_validation_error

ModelT = TypeVar("ModelT", bound=BaseModel)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"Request body is larger than {max_bytes} bytes.", code="request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, or 413 as soon as it passes max_bytes (Content-Length is checked first but not trusted)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(part)
    return b"".join(parts)


async def parse_body(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Parse the JSON body into `model`; malformed JSON or an invalid field is a 400."""
    return parse_json(await read_body(request, max_bytes), model)


def parse_json(body: bytes, model: type[ModelT]) -> ModelT:
    """Parse a body already read into `model`; malformed JSON or an invalid field is a 400."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise bad_request("We could not parse the JSON body of your request.", code="invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise bad_request("The request body must be a JSON object.", code="invalid_json") from None
        raise from_validation_error(exc) from None
