"""GatewayMiddleware (pure ASGI): request id, access log, drain and API-key gates, in-flight count, last-resort 500.

Health, metrics and the OpenAPI document stay open; only the API (/v1/*, /tokenize, /detokenize) needs a key and is
refused while loading or draining.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError, error_response, from_engine_error
from gateway.state import GatewayState, loading_error

access_logger = logging.getLogger("sirocco.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned; only ever logged
_API_PATHS_OUTSIDE_V1 = ("/tokenize", "/detokenize")  # vLLM serves these at the root


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state
        self._keys = [key.get_secret_value().encode() for key in state.settings.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given_id = headers.get("x-request-id", "")
        request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        status = 0
        start_s = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        try:
            await self._serve(scope, receive, send_with_id, headers)
        except ClientDisconnect:
            status = status or _CLIENT_CLOSED  # hung up while sending the body: nobody to answer, and no server error
        except Exception as exc:  # from_engine_error logs the traceback of anything unexpected
            if status == 0:
                await error_response(from_engine_error(exc, self.state.settings.retry_after_s))(scope, receive, send_with_id)
        finally:
            duration_ms = (time.perf_counter() - start_s) * 1000
            access_logger.info(
                "%s %s %d %.1fms id=%s",
                scope["method"],
                scope["path"],
                status,
                duration_ms,
                request_id,
                extra={"request_id": request_id, "status": status, "duration_ms": round(duration_ms, 1)},
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        is_api = scope["path"].startswith("/v1/") or scope["path"] in _API_PATHS_OUTSIDE_V1
        if not is_api or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(headers)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        self.state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_in_flight -= 1

    def _refusal(self, headers: Headers) -> APIError | None:
        if self.state.is_draining:
            return APIError(503, "The server is shutting down.", code="draining")
        if self._keys and not self._is_authorized(headers.get("authorization", "")):
            return APIError(401, "Missing or invalid API key (Authorization: Bearer <key>).", code="invalid_api_key")
        if self.state.is_loading:
            return loading_error()
        return None

    def _is_authorized(self, authorization: str) -> bool:
        scheme, _, given = authorization.partition(" ")
        given_bytes = given.strip().encode()
        # compare against every key, in constant time each, so timing reveals neither key nor position
        matches = [hmac.compare_digest(given_bytes, key) for key in self._keys]
        return scheme.lower() == "bearer" and any(matches)
