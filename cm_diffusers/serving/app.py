"""The HTTP API: routes over a model backend, behind one plain ASGI middleware (request id, API keys, rate limits,
admission, body size, draining, metrics, the access log and client disconnects).

`create_app(backend, settings)` builds the FastAPI app. The backend is the model deployment, in this process
(`embedded.py`) or through a Ray Serve handle (`deployment.py`): awaitable `generate(request, key)`,
`teacher_generate(request, key)`, `edit(task, image, mask, options, key)`, `info()`, `ready()` and `stats()`, raising
`BackendUnavailable` when no replica can answer. Errors are JSON `{"error": {"type", "message", "field"},
"request_id"}`; no stack trace or path ever reaches a client; every response carries `X-Request-ID`, the id its body
and its access-log line carry.
"""

import asyncio
import base64
import hmac
import io
import json
import logging
import math
import re
import sys
import time
import uuid
from typing import Annotated

import PIL.Image
from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..validation import InputError, parse_list
from .schemas import (
    EDIT_TASK_TABLE,
    EDIT_TASKS,
    EditOptions,
    ErrorResponse,
    ImagesResponse,
    ModelsResponse,
    ServerSettings,
    StatusResponse,
    api_models,
    hash_key,
)

OPEN_ROUTES = ("/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/ui")
GENERATE_ROUTES = ("/v1/generate", "/v1/teacher/generate")
REQUEST_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer (logged, never sent)
# PIL modes taken as grayscale; any other mode PIL can convert is taken as RGB.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class BackendUnavailable(Exception):
    """No model replica could answer (starting, restarting after a crash, or overloaded): a 503 to retry."""


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field, self.headers = status, kind, message, field, headers or {}


def _errors(*statuses) -> dict:
    """OpenAPI `responses` for error statuses, all in the `ErrorResponse` shape."""
    described = {400: "The body is not parsable (not JSON, bad multipart).", 401: "Missing or invalid API key.",
                 404: "Unknown task, or no teacher on this server.", 413: "Body, upload or image over the limit.",
                 415: "Unsupported Content-Type or Content-Encoding.", 422: "A field is invalid (the error names it).",
                 429: "Rate limit, or this key's share of the server's work (Retry-After).",
                 503: "Overloaded, timed out, starting or draining (Retry-After)."}
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}


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


def _error(status: int, kind: str, message: str, request_id: str, field: str | None = None, headers=None):
    body = ErrorResponse(error={"type": kind, "message": message, "field": field}, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_name(loc) -> str | None:
    """The request field an error location is in: `timesteps` for (body, timesteps, 0)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form")]
    return parts[0] if parts else None


def _where(loc) -> str:
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
            await _error(error.status, error.kind, error.message, request_id, error.field, error.headers)(
                scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED if status is None else status
            raise
        except Exception:  # never a stack trace to the client; the log has it with the request id
            logging.getLogger("cm_diffusers.serving").exception("request %s failed", request_id)
            if not response_started:
                scope["state"]["error_kind"] = "internal_error"
                await _error(500, "internal_error", "Internal error; the server log has details under this "
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


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(backend, settings: ServerSettings, echo_request_id: bool = True, state: ServerState | None = None):
    """The FastAPI app of `cm-diffusers serve` over `backend` (see the module docstring). Behind Ray Serve's proxy,
    which gives every request an X-Request-ID (the client's, or a new one) and echoes it in the response, pass
    `echo_request_id=False`: the app adopts the proxy's id for its body and log, and the header is not doubled."""
    limits = settings.limits
    models = api_models(limits)
    app = FastAPI(title="cm_diffusers", version="1",
                  description="Real-time image generation and zero-shot editing with consistency models. Every "
                              "route but /healthz, /readyz, /docs, /redoc, /docs/oauth2-redirect, /openapi.json and "
                              "/ui needs `Authorization: Bearer KEY` when the server has keys.")
    metrics = Metrics()
    state = state or ServerState()
    one_pass = settings.max_batch_size * limits.max_steps
    admission = Admission(per_key=max(one_pass, limits.max_images * limits.max_steps), total=4 * one_pass)
    app.state.metrics, app.state.server = metrics, state
    app.add_middleware(ApiMiddleware, settings=settings, metrics=metrics, state=state,
                       echo_request_id=echo_request_id)

    def request_id(request: Request) -> str:
        return request.scope["state"]["request_id"]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        request.scope["state"]["error_kind"] = error.kind
        return _error(error.status, error.kind, error.message, request_id(request), error.field, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        errors = error.errors() or [{"loc": ("body",), "msg": "invalid request", "type": "invalid"}]
        first = errors[0]
        field, kind, status = _field_name(first.get("loc", ())), "validation_error", 422
        message = f"{_where(first.get('loc', ()))}: {first['msg']}" if field else first["msg"]
        if first.get("type") == "json_invalid":
            status, kind, field = 400, "invalid_body", "body"
            message = f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})."
        elif field is None:
            field = "body"
            content_type = request.headers.get("content-type", "")
            if first.get("type") == "missing":
                message = "body: a JSON object is required (send Content-Type: application/json)."
            elif request.url.path in GENERATE_ROUTES and not content_type.startswith("application/json"):
                status, kind = 415, "unsupported_media_type"
                message = f"body: send a JSON object with Content-Type: application/json, not {content_type!r}."
            else:
                message = f"body: {first['msg']} (a JSON object of the fields in /openapi.json)."
        request.scope["state"]["error_kind"] = kind
        return _error(status, kind, message, request_id(request), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind, field, message = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error"), \
            None, str(error.detail)
        if error.status_code == 400:  # FastAPI could not parse the body (too deep JSON, bad multipart)
            kind, field, message = "invalid_body", "body", f"body: could not be parsed ({error.detail})."
        request.scope["state"]["error_kind"] = kind
        return _error(error.status_code, kind, message, request_id(request), field, getattr(error, "headers", None))

    async def call_backend(request: Request, method: str, *args, cost: int = 0):
        key = request.scope["state"].get("key_id") or (request.client.host if request.client else "local")
        if cost:
            admission.admit(key, cost)
            metrics.admitted_cost.inc(cost)
        state.busy += 1
        try:
            result = await asyncio.wait_for(getattr(backend, method)(*args), limits.request_timeout_s)
        except (BackendUnavailable, asyncio.TimeoutError) as error:
            logging.getLogger("cm_diffusers.serving").warning("%s: the model did not answer (%s: %s)", method,
                                                              type(error).__name__, error)
            raise ApiError(503, "unavailable", "The model is not available right now (starting, restarting, "
                                               "overloaded or over the time limit); retry shortly.",
                           headers={"Retry-After": "2"})
        finally:
            state.busy -= 1
            if cost:
                admission.release(key, cost)
                metrics.admitted_cost.dec(cost)
        if isinstance(result, dict) and "error" in result:
            e = result["error"]
            raise ApiError(e.get("status", 422), e["type"], e["message"], e.get("field"))
        return result

    def images_response(request: Request, result: dict, route: str) -> ImagesResponse:
        request.scope["state"]["images"] = len(result["images"])
        metrics.images.labels(route).inc(len(result["images"]))
        if result.get("batches") is not None:
            metrics.queue_wait.observe(result["queue_wait_s"])
            for batch in result["batches"]:
                metrics.batch_size.observe(batch["images"])
                metrics.batch_requests.observe(batch["requests"])
        return ImagesResponse(images=[base64.b64encode(image).decode("ascii") for image in result["images"]],
                              seed=result["seed"], model=result["model"], nfe=result["nfe"],
                              latency_ms=result["latency_ms"])

    # -- routes ----------------------------------------------------------------------------------------------------

    @app.api_route("/healthz", methods=["GET", "HEAD"], response_model=StatusResponse)
    async def healthz():
        """Liveness: the API process answers (open route)."""
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], response_model=StatusResponse,
                   responses={503: {"model": StatusResponse, "description": "Starting, or draining for a shutdown."}})
    async def readyz():
        """Readiness: a model replica is loaded and answers, and the server is not draining (open route)."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "2"})
        try:
            await asyncio.wait_for(backend.ready(), 5)
        except (BackendUnavailable, asyncio.TimeoutError):
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "2"})
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
              "description": "Prometheus text format."}, **_errors(401)})
    async def prometheus_metrics():
        """Prometheus text format."""
        try:
            stats = await asyncio.wait_for(backend.stats(), 5)
            metrics.forward_passes.set(stats["forward_passes"])
            metrics.network_evaluations.set(stats["network_evaluations"])
            metrics.cancelled.set(stats["cancelled_requests"])
        except (BackendUnavailable, asyncio.TimeoutError):
            pass
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelsResponse, responses=_errors(401, 429, 503))
    async def list_models(request: Request):
        """The served model: name, size, channels, classes, recommended schedules, limits."""
        return ModelsResponse(models=[await call_backend(request, "info")])

    json_errors = _errors(400, 401, 413, 415, 422, 429, 503)

    @app.post("/v1/generate", response_model=ImagesResponse, responses=json_errors)
    async def generate(body: models.generate, request: Request):
        """Generate images; requests are batched together, one forward pass at a time. Seeded requests are exact."""
        key = request.scope["state"].get("key_id")
        result = await call_backend(request, "generate", body.model_dump(), key, cost=body.cost())
        return images_response(request, result, "/v1/generate")

    @app.post("/v1/teacher/generate", response_model=ImagesResponse, responses={**json_errors, **_errors(404)})
    async def teacher_generate(body: models.teacher, request: Request):
        """The diffusion teacher (`serve --teacher`) from the same seeded noise as `/v1/generate`, with
        `num_inference_steps` Heun steps on a Karras grid (2n - 1 network evaluations); one request at a time,
        not batched. 404 when the server runs without a teacher."""
        for field in ("timesteps", "sigmas"):
            if getattr(body, field) is not None:
                raise ApiError(422, "validation_error", f"{field}: the teacher takes `num_inference_steps` (Heun "
                                                        f"steps on a Karras grid), not `{field}`.", field)
        cost = body.num_images * (2 * (body.num_inference_steps or 1) - 1)
        result = await call_backend(request, "teacher_generate", body.model_dump(), cost=cost)
        return images_response(request, result, "/v1/teacher/generate")

    for task in EDIT_TASKS:
        _add_edit_route(app, task, models.edit_forms[task], limits, call_backend, images_response)

    @app.post("/v1/edit/{task}", include_in_schema=False)
    async def unknown_edit_task(task: str):
        raise ApiError(404, "not_found", f"Unknown edit task {task!r}; choose one of {list(EDIT_TASKS)}.", "task")

    if settings.ui:
        from .playground import mount_playground

        mount_playground(app, api_base="")
    return app


def _add_edit_route(app, task: str, form_model, limits, call_backend, images_response):
    spec = EDIT_TASK_TABLE[task]
    doc = {"inpaint": "Regenerates the white part of `mask`, keeps the black part exactly.",
           "super-resolve": "Upsamples `image` by `scale_factor` (the model's size divided by it).",
           "denoise": "Removes Gaussian noise of std `sigma` (one network evaluation).",
           "colorize": "Colours a grayscale image (RGB models only).",
           "stroke": "Turns a rough colour sketch into an image (SDEdit-style)."}[task]

    async def edit(form: Annotated[form_model, Form(media_type="multipart/form-data")], request: Request):
        values = form.model_dump(exclude={"image", "mask"})
        try:
            options = EditOptions(**{**values, **{name: _form_list(values.get(name), kind, name) for name, kind in
                                                  (("timesteps", int), ("sigmas", float), ("class_labels", int))}})
        except ValidationError as error:
            first = error.errors()[0]
            raise ApiError(422, "validation_error", f"{_where(first['loc'])}: {first['msg']}",
                           _field_name(first["loc"]))
        _check_steps(options.num_inference_steps, options.timesteps, options.sigmas, limits)
        image = await _read_image(form.image, "image", limits)
        mask = await _read_image(form.mask, "mask", limits) if spec.mask else None
        steps = len(options.timesteps or options.sigmas or ()) or options.num_inference_steps or 10
        key = request.scope["state"].get("key_id")
        result = await call_backend(request, "edit", task, image, mask, options.model_dump(), key, cost=steps)
        return images_response(request, result, "/v1/edit/{task}")

    edit.__doc__ = f"Zero-shot editing: {doc} One request per forward pass (not batched)."
    app.post(f"/v1/edit/{task}", response_model=ImagesResponse, name=f"edit_{task.replace('-', '_')}",
             responses=_errors(400, 401, 413, 415, 422, 429, 503))(edit)


def _check_steps(num_inference_steps, timesteps, sigmas, limits):
    for field, count in (("timesteps", timesteps), ("sigmas", sigmas)):
        if count is not None and len(count) > limits.max_steps:
            raise ApiError(422, "validation_error", f"{field}: at most {limits.max_steps} noise levels per request, "
                                                    f"got {len(count)}.", field)
    if timesteps is None and sigmas is None and num_inference_steps is not None \
            and num_inference_steps > limits.max_steps:
        raise ApiError(422, "validation_error", f"num_inference_steps: at most {limits.max_steps}, got "
                                                f"{num_inference_steps}.", "num_inference_steps")


def _form_list(text: str | None, kind, field: str):
    """A comma-separated form field as a list (`validation.parse_list`), None when absent; 422 naming the field."""
    if text is None or not text.strip():
        return None
    try:
        return parse_list(text, kind, field)
    except InputError as error:
        raise ApiError(422, "validation_error", str(error), error.field or field)


async def _read_image(upload, field: str, limits) -> PIL.Image.Image:
    """An uploaded file as a decoded grayscale ("L") or RGB PIL image, within the byte and pixel limits; 413 or 422
    naming the field for anything else (whatever PIL raises on it)."""
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "payload_too_large", f"{field}: larger than {limits.max_upload_bytes} bytes.", field)
    try:
        image = PIL.Image.open(io.BytesIO(data))
        width, height = image.size
    except PIL.Image.DecompressionBombError:  # over PIL's own pixel limit, far over ours
        raise ApiError(413, "payload_too_large", f"{field}: more pixels than the limit of {limits.max_upload_pixels}.",
                       field)
    except Exception:  # PIL raises many kinds on garbage; the message must not echo paths or internals
        raise ApiError(422, "validation_error", f"{field}: not a readable image file (PNG, JPEG, WebP, ...).", field)
    if width * height > limits.max_upload_pixels:
        raise ApiError(413, "payload_too_large", f"{field}: {width}x{height} pixels is more than the limit of "
                                                 f"{limits.max_upload_pixels}.", field)
    try:
        image.load()
        return image.convert("L" if image.mode in _GRAY_MODES else "RGB")
    except Exception:
        raise ApiError(422, "validation_error", f"{field}: a {image.mode!r} image that cannot be read as grayscale or "
                                                f"RGB (send PNG, JPEG or WebP).", field)
