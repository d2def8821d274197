"""The API's middleware: one plain ASGI class (`ApiMiddleware`) that handles, for every request, the request id,
draining, API keys (failed attempts rate limited per client address), the per-key rate limit, the body size (413
before parsing), client disconnects (the request is cancelled and counted as 499), metrics and one access-log line;
plus the pieces it and the routes share: `Metrics`, `RateLimiter`, `Admission` (cost-based admission), `ServerState`,
`ApiError` and the JSON error shape.
"""

import asyncio
import hmac
import json
import logging
import math
import re
import sys
import time
import uuid

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match

from .schemas import ErrorResponse, ServerSettings, hash_key

OPEN_ROUTES = ("/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/ui")
GENERATE_ROUTES = ("/v1/generate", "/v1/teacher/generate")
REQUEST_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer (logged, never sent)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field, self.headers = status, kind, message, field, headers or {}


# ----------------------------------------------------------------------------------------------------------------
# Metrics, access log, keys, rate limits and admission


class Metrics:
    """Prometheus metrics of one API process, on their own registry (served at /metrics)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cm_requests", "HTTP requests by route and status (499: the client went away).",
                                ["route", "status"], registry=r)
        self.latency = Histogram("cm_request_latency_seconds", "Request latency.", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.images = Counter("cm_images_generated", "Images returned, by route.", ["route"], registry=r)
        self.batch_size = Histogram("cm_batch_size_images", "Images per batched forward pass.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("cm_batch_size_requests", "Requests per batched forward pass.", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_wait = Histogram("cm_queue_wait_seconds", "Time a generation request waited for its first "
                                    "forward pass.", registry=r,
                                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.errors = Counter("cm_errors", "Error responses by route and type.", ["route", "type"], registry=r)
        self.in_flight = Gauge("cm_requests_in_flight", "Requests being processed.", registry=r)
        self.admitted_cost = Gauge("cm_admitted_cost", "Images x network evaluations admitted and not done.",
                                   registry=r)
        self.forward_passes = Gauge("cm_model_forward_passes", "Batched forward passes run by the model (its "
                                    "replica's count, read at scrape time).", registry=r)
        self.network_evaluations = Gauge("cm_model_network_evaluations", "Image rows evaluated by the model (its "
                                         "replica's count, read at scrape time).", registry=r)
        self.cancelled = Gauge("cm_model_cancelled_requests", "Requests whose remaining forward passes were dropped "
                               "(timed out or the client went away).", registry=r)


def _access_logger() -> logging.Logger:
    logger = logging.getLogger("cm_diffusers.serving.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class RateLimiter:
    """A token bucket per key: bursts up to one minute's allowance, refilled continuously."""

    def __init__(self, per_minute: float, max_keys: int = 100_000):
        self.capacity, self.rate, self.max_keys = per_minute, per_minute / 60.0, max_keys
        self.buckets = {}

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self.buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def wait(self, key: str) -> int:
        """0 when the key has a token left (none is taken), else the seconds until it has one."""
        if self.capacity <= 0:
            return 0
        tokens = self._tokens(key, time.monotonic())
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.rate))

    def take(self, key: str) -> int:
        """0 when a request may proceed (and takes its token), else the seconds to wait."""
        if self.capacity <= 0:
            return 0
        now = time.monotonic()
        tokens = self._tokens(key, now)
        if len(self.buckets) >= self.max_keys and key not in self.buckets:  # bounded memory under address floods
            self.buckets = {k: v for k, v in self.buckets.items() if self._tokens(k, now) < self.capacity}
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0
        self.buckets[key] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / self.rate))


class Admission:
    """Admission by cost (images x network evaluations) per API key and in total: a key may hold at most
    `per_key` of admitted work, the server `total`; past that, requests are refused at once (429 for the key,
    503 for the server) instead of queueing behind work that would make them time out."""

    def __init__(self, per_key: int, total: int):
        self.per_key, self.total = per_key, total
        self.by_key, self.sum = {}, 0

    def admit(self, key: str, cost: int):
        held = self.by_key.get(key, 0)
        if held and held + cost > self.per_key:
            raise ApiError(429, "over_capacity", f"This key already has {held} images x steps in progress (its "
                                                 f"share is {self.per_key}); retry when they are done.",
                           headers={"Retry-After": "1"})
        if self.sum and self.sum + cost > self.total:
            raise ApiError(503, "overloaded", "The server is at capacity; retry shortly.",
                           headers={"Retry-After": "1"})
        self.by_key[key] = held + cost
        self.sum += cost

    def release(self, key: str, cost: int):
        self.by_key[key] -= cost
        self.sum -= cost
        if not self.by_key[key]:
            del self.by_key[key]


def _key_of(headers: dict, key_hashes: list) -> str | None:
    """The key id (a prefix of the key's SHA-256) of a valid `Authorization: Bearer KEY`, else None.
    Compares against every configured key in constant time, without early exit."""
    scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    digest = hash_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else "0" * 64
    found = None
    for key_hash in key_hashes:
        if hmac.compare_digest(digest, key_hash):
            found = key_hash
    return None if found is None else found[:12]


def error_response(status: int, kind: str, message: str, request_id: str, field: str | None = None, headers=None):
    body = ErrorResponse(error={"type": kind, "message": message, "field": field}, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def field_of_location(loc) -> str | None:
    """The request field an error location is in: `timesteps` for (body, timesteps, 0)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form")]
    return parts[0] if parts else None


def location_text(loc) -> str:
    """The full location, for the message: `timesteps.0`."""
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path", "form"))


class ApiMiddleware:
    """Plain ASGI middleware around the routes, one pass per request: the request id (the client's `X-Request-ID`
    if it is printable ASCII without spaces, up to 128 characters, else a new one: the header, the body and the log
    carry the same), draining (503 with Retry-After), the API key (failed attempts rate limited per client address),
    the per-key rate limit, the body size (413 before parsing), metrics and one access-log line. A client that goes
    away before its answer cancels its request (the model drops its remaining work) and is counted as 499."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics, state, echo_request_id: bool = True):
        self.app, self.settings, self.metrics, self.state = app, settings, metrics, state
        self.echo_request_id = echo_request_id
        limits = settings.limits
        self.rate_limiter = RateLimiter(limits.rate_limit_per_minute)
        self.auth_failures = RateLimiter(limits.auth_failures_per_minute)
        self.access_log = _access_logger()

    def body_limit(self, path: str) -> int | None:
        limits = self.settings.limits
        if path in GENERATE_ROUTES:
            return limits.max_body_bytes
        return 2 * limits.max_upload_bytes + 64 * 1024 if path.startswith("/v1/edit/") else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not self.echo_request_id:  # behind Ray's proxy, which answers with the id it passes (see deployment.py)
            request_id = request_id or uuid.uuid4().hex
        elif not REQUEST_ID_PATTERN.match(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path, client = scope["path"], (scope.get("client") or ("local", 0))[0]
        status, key_id, response_started = None, None, False

        async def send_with_id(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                if self.echo_request_id:
                    message.setdefault("headers", [])
                    message["headers"] = [(k, v) for k, v in message["headers"] if k.lower() != b"x-request-id"]
                    message["headers"].append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            key_id = await self._check(scope, headers, path, client)
            scope["state"]["key_id"] = key_id
            body = await self._read_body(scope, receive, headers, path)
            await self._run(scope, receive, send_with_id, body)
        except ApiError as error:
            scope["state"]["error_kind"] = error.kind
            await error_response(error.status, error.kind, error.message, request_id, error.field, error.headers)(
                scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED if status is None else status
            raise
        except Exception:  # never a stack trace to the client; the log has it with the request id
            logging.getLogger("cm_diffusers.serving").exception("request %s failed", request_id)
            if not response_started:
                scope["state"]["error_kind"] = "internal_error"
                await error_response(500, "internal_error", "Internal error; the server log has details under this "
                                                    "request id.", request_id)(scope, receive, send_with_id)
            status = status or 500
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, request_id, status or CLIENT_CLOSED, key_id, client, started)

    async def _check(self, scope, headers, path, client) -> str | None:
        """Draining, the API key and the rate limits; ApiError when the request must not go on."""
        if self.state.draining and path.startswith("/v1/"):
            raise ApiError(503, "draining", "The server is shutting down; retry on another instance or shortly.",
                           headers={"Retry-After": "2", "Connection": "close"})
        key_id = None
        if not path.startswith(OPEN_ROUTES) and self.settings.auth_enabled:
            wait = self.auth_failures.wait(client)
            if wait:
                raise ApiError(429, "rate_limited", f"Too many failed authentications from this address; retry "
                                                    f"after {wait} s.", headers={"Retry-After": str(wait)})
            key_id = _key_of(headers, self.settings.api_key_hashes)
            if key_id is None:
                self.auth_failures.take(client)
                raise ApiError(401, "unauthorized", "Missing or invalid API key: send `Authorization: Bearer KEY`.",
                               headers={"WWW-Authenticate": "Bearer"})
        if path.startswith("/v1/"):
            wait = self.rate_limiter.take(key_id or client)
            if wait:
                raise ApiError(429, "rate_limited", f"Rate limit of {self.settings.limits.rate_limit_per_minute:g} "
                                                    f"requests per minute exceeded; retry after {wait} s.",
                               headers={"Retry-After": str(wait)})
        return key_id

    async def _read_body(self, scope, receive, headers, path) -> bytes | None:
        """The whole body of a route with a limit (None for the others, which read their own), or ApiError."""
        limit = self.body_limit(path) if scope["method"] in ("POST", "PUT", "PATCH") else None
        if limit is None:
            return None
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not accepted; send the "
                                                          "body uncompressed.", "body")
        length = headers.get(b"content-length", b"")
        too_large = ApiError(413, "payload_too_large", f"The request body is larger than {limit} bytes.", "body")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                raise too_large
        return b"".join(chunks)

    async def _run(self, scope, receive, send, body: bytes | None):
        """The app, with the body replayed; cancelled when the client disconnects before the answer is sent."""
        if body is None:
            return await self.app(scope, receive, send)
        disconnected = asyncio.Event()
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch():
            if (await receive())["type"] == "http.disconnect":  # (a server that sends more after the body: no watch)
                disconnected.set()

        app_task = asyncio.ensure_future(self.app(scope, replay, send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait([app_task, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not disconnected.is_set():
                await asyncio.wait([app_task])
        finally:
            watcher.cancel()
        if not app_task.done():  # the client went away: stop its work
            app_task.cancel()
            try:
                await app_task
            except (asyncio.CancelledError, Exception):
                pass
            raise asyncio.CancelledError()
        app_task.result()

    def _record(self, scope, request_id, status, key_id, client, started):
        route = scope.get("route")
        if route is None:  # answered before routing (401, 429, 413)
            app = scope.get("app") or self.app
            route = next((r for r in getattr(app, "routes", ()) if r.matches(scope)[0] == Match.FULL), None)
        path = scope["path"]
        route = getattr(route, "path", None) or ("/ui" if path.startswith("/ui") else "other")
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        if status >= 400:
            kind = scope["state"].get("error_kind") or ("client_closed" if status == CLIENT_CLOSED else str(status))
            self.metrics.errors.labels(route, kind).inc()
        self.access_log.info(json.dumps({
            "ts": round(time.time(), 3), "request_id": request_id, "method": scope["method"], "path": path,
            "route": route, "status": status, "latency_ms": round(elapsed * 1000, 2), "key": key_id,
            "client": client, "images": scope["state"].get("images"),
        }))


class ServerState:
    """What the engine tells the app: `draining` (set on SIGTERM: /readyz answers 503 and new /v1 requests get 503
    JSON with Retry-After while the requests in flight finish) and the number of those (`busy`)."""

    def __init__(self):
        self.draining = False
        self.busy = 0
