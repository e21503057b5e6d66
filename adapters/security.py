"""What stands in front of every route of the service (BentoML's own included): CORS, the API key,
the request body size limit, and a hook that refreshes the engine's gauges when /metrics is scraped.

An ASGI middleware, so it guards BentoML's routes (/generate, /metrics, its docs page) as well as the
OpenAI ones. Its settings are read on the first request, in the worker, after `--arg` values exist.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

logger = logging.getLogger("paged_backend.adapters")

# Probes answer without a key: load balancers and orchestrators do not hold one.
OPEN_PATHS = frozenset({"/health", "/livez", "/healthz", "/readyz"})


@dataclass(frozen=True)
class GuardSettings:
    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = 4 * 1024 * 1024
    on_metrics_scrape: Optional[Callable[[], Awaitable[None]]] = field(default=None, compare=False)


def _error(status: int, message: str, code: str, headers: Optional[dict[str, str]] = None):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def send_it(send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return send_it


def key_matches(header: Optional[bytes], key: str) -> bool:
    """`Authorization: Bearer <key>`, compared in constant time."""
    if not header:
        return False
    scheme, _, given = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                              key.encode("utf-8"))


class _Guard:
    """API key, body size limit, metrics hook (CORS wraps it, so even a 401 carries CORS headers)."""

    def __init__(self, app, settings: GuardSettings):
        self.app, self.s = app, settings

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.s.api_key and path not in OPEN_PATHS and not key_matches(headers.get(b"authorization"), self.s.api_key):
            return await _error(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                                "invalid_api_key", {"WWW-Authenticate": "Bearer"})(send)
        if path == "/metrics" and self.s.on_metrics_scrape is not None:
            try:
                await self.s.on_metrics_scrape()
            except Exception:  # BentoML's own metrics are still worth serving
                logger.exception("refreshing the engine metrics failed")
        limit = self.s.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await _error(400, "bad Content-Length header", "bad_request")(send)
            if too_big:
                return await _error(413, f"the request body is larger than {limit} bytes "
                                         "(max_request_bytes)", "request_too_large")(send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here (a chunked upload has no Content-Length), then replay it to the app;
        # later receive() calls go to the server, so the app still notices a disconnect.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _error(413, f"the request body is larger than {limit} bytes (max_request_bytes)",
                                    "request_too_large")(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ServiceGuard:
    """The middleware BentoML is given (`add_asgi_middleware`); `settings` is called once, on the
    first HTTP request, because the service's arguments are only known inside the worker."""

    def __init__(self, app, settings: Callable[[], GuardSettings]):
        self.app = app
        self._settings = settings
        self._inner = None

    def _build(self):
        s = self._settings()
        inner: Any = _Guard(self.app, s)
        if s.allowed_origins:
            from starlette.middleware.cors import CORSMiddleware

            # Bearer keys travel in a header, not in cookies: no credentials mode.
            inner = CORSMiddleware(inner, allow_origins=list(s.allowed_origins), allow_methods=["GET", "POST"],
                                   allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"],
                                   max_age=600)
        return inner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._inner is None:
            self._inner = self._build()
        await self._inner(scope, receive, send)
