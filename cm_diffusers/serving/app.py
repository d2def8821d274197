"""The HTTP API: routes, API keys, limits, errors, metrics and the access log, over a model backend.

`create_app(backend, settings)` builds the FastAPI app. The backend is the model deployment seen through a Ray Serve
handle (see `deployment.py`): awaitable `generate(request)`, `teacher_generate(request)`, `edit(task, image, mask,
options)`, `info()` and `ready()`, raising `BackendUnavailable` when no replica can answer. Errors are JSON
`{"error": {"type", "message", "field"}, "request_id"}`; no stack trace or path ever reaches a client; every response
carries `X-Request-ID`.
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

import PIL.Image
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import (
    EDIT_TASKS,
    EditOptions,
    ErrorResponse,
    GenerateRequest,
    ImagesResponse,
    ModelsResponse,
    ServerSettings,
    hash_key,
)

OPEN_ROUTES = ("/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/ui")
GENERATE_ROUTES = ("/v1/generate", "/v1/teacher/generate")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


class BackendUnavailable(Exception):
    """No model replica could answer (starting, restarting after a crash, or overloaded): a 503 to retry."""


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field, self.headers = status, kind, message, field, headers or {}


# ----------------------------------------------------------------------------------------------------------------
# Metrics, access log, keys and rate limits


class Metrics:
    """Prometheus metrics of one API process, on their own registry (served at /metrics)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cm_requests", "HTTP requests by route and status.", ["route", "status"], registry=r)
        self.latency = Histogram("cm_request_latency_seconds", "Request latency.", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.images = Counter("cm_images_generated", "Images returned, by route.", ["route"], registry=r)
        self.batch_size = Histogram("cm_batch_size_images", "Images per batched forward pass.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("cm_batch_size_requests", "Requests per batched forward pass.", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_wait = Histogram("cm_queue_wait_seconds", "Time a generation request waited for its batch.",
                                    registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                         2.5, 5, 10))
        self.errors = Counter("cm_errors", "Error responses by route and type.", ["route", "type"], registry=r)
        self.in_flight = Gauge("cm_requests_in_flight", "Requests being processed.", registry=r)


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
    """A token bucket per API key: bursts up to one minute's allowance, refilled continuously."""

    def __init__(self, per_minute: float):
        self.capacity, self.rate = per_minute, per_minute / 60.0
        self.buckets = {}

    def retry_after(self, key: str) -> int:
        """0 when a request may proceed (and takes its token), else the seconds to wait."""
        if self.capacity <= 0:
            return 0
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0
        self.buckets[key] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / self.rate))


def _authenticate(request: Request, key_hashes: list) -> str | None:
    """The key id (a prefix of the key's SHA-256) of a valid `Authorization: Bearer KEY`, else None.
    Compares against every configured key in constant time, without early exit."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    digest = hash_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else "0" * 64
    found = None
    for key_hash in key_hashes:
        if hmac.compare_digest(digest, key_hash):
            found = key_hash
    return None if found is None else found[:12]


def _route_of(request: Request) -> str:
    """The route template (`/v1/edit/{task}`), so that metric labels stay few whatever the paths requested."""
    route = request.scope.get("route")
    if route is None:  # answered before routing (401, 429, 413)
        from starlette.routing import Match

        route = next((r for r in request.app.routes if r.matches(request.scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or ("/ui" if request.url.path.startswith("/ui") else "other")


def _error(status: int, kind: str, message: str, request_id: str, field: str | None = None, headers=None):
    body = ErrorResponse(error={"type": kind, "message": message, "field": field}, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_name(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form")]
    return ".".join(parts) if parts else None


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(backend, settings: ServerSettings, echo_request_id: bool = True) -> FastAPI:
    """The FastAPI app of `cm-diffusers serve` over `backend` (see the module docstring). Behind Ray Serve's proxy,
    which gives every request an X-Request-ID (the client's, or a new one) and echoes it in the response, pass
    `echo_request_id=False`: the app adopts the proxy's id for its body and log, and the header is not doubled."""
    limits = settings.limits
    app = FastAPI(title="cm_diffusers", version="1",
                  description="Real-time image generation and zero-shot editing with consistency models.")
    metrics = Metrics()
    rate_limiter = RateLimiter(limits.rate_limit_per_minute)
    access_log = _access_logger()
    app.state.metrics = metrics
    # Inner to `guard` (added after it is outer): keys and rate limits are checked before a body is read.
    app.add_middleware(BodyLimit, limit_for=lambda path: limits.max_body_bytes if path in GENERATE_ROUTES else
                       2 * limits.max_upload_bytes + 64 * 1024 if path.startswith("/v1/edit/") else None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Request id, auth, rate limit, body size, error shape, metrics and the access log for every request."""
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id", "")
        request_id = request_id if _REQUEST_ID.match(request_id) else uuid.uuid4().hex
        request.state.request_id = request_id
        path = request.url.path
        key_id = None
        metrics.in_flight.inc()
        try:
            if not path.startswith(OPEN_ROUTES) and settings.auth_enabled:
                key_id = _authenticate(request, settings.api_key_hashes)
                if key_id is None:
                    raise ApiError(401, "unauthorized", "Missing or invalid API key: send `Authorization: Bearer "
                                                        "KEY`.", headers={"WWW-Authenticate": "Bearer"})
            if path.startswith("/v1/"):
                wait = rate_limiter.retry_after(key_id or (request.client.host if request.client else "local"))
                if wait:
                    raise ApiError(429, "rate_limited", f"Rate limit of {limits.rate_limit_per_minute:g} requests "
                                                        f"per minute exceeded; retry after {wait} s.",
                                   headers={"Retry-After": str(wait)})
            response = await call_next(request)
        except ApiError as error:
            response = _error(error.status, error.kind, error.message, request_id, error.field, error.headers)
        except Exception:  # never a stack trace to the client; the log has it with the request id
            logging.getLogger("cm_diffusers.serving").exception("request %s failed", request_id)
            response = _error(500, "internal_error", "Internal error; the server log has details under this "
                                                     "request id.", request_id)
        finally:
            metrics.in_flight.dec()
        route = _route_of(request)
        elapsed = time.perf_counter() - started
        if echo_request_id:
            response.headers["X-Request-ID"] = request_id
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(elapsed)
        if response.status_code >= 400:
            metrics.errors.labels(route, getattr(request.state, "error_kind", None) or str(response.status_code)).inc()
        access_log.info(json.dumps({
            "ts": round(time.time(), 3), "request_id": request_id, "method": request.method, "path": path,
            "route": route, "status": response.status_code, "latency_ms": round(elapsed * 1000, 2), "key": key_id,
            "client": request.client.host if request.client else None,
            "images": getattr(request.state, "images", None),
        }))
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        request.state.error_kind = error.kind
        return _error(error.status, error.kind, error.message, request.state.request_id, error.field, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        field = _field_name(first.get("loc", ()))
        message = f"{field}: {first['msg']}" if field else first["msg"]
        request.state.error_kind = "validation_error"
        return _error(422, "validation_error", message, request.state.request_id, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found" if error.status_code == 404 else "http_error"
        return _error(error.status_code, kind, str(error.detail), request.state.request_id)

    async def call_backend(method: str, *args) -> dict:
        try:
            result = await asyncio.wait_for(getattr(backend, method)(*args), limits.request_timeout_s)
        except (BackendUnavailable, asyncio.TimeoutError) as error:
            logging.getLogger("cm_diffusers.serving").warning("%s: the model did not answer (%s: %s)", method,
                                                              type(error).__name__, error)
            raise ApiError(503, "unavailable", "The model is not available right now (starting, restarting or "
                                               "overloaded); retry shortly.", headers={"Retry-After": "2"})
        if isinstance(result, dict) and "error" in result:
            e = result["error"]
            raise ApiError(e.get("status", 422), e["type"], e["message"], e.get("field"))
        return result

    def images_response(request: Request, result: dict, route: str) -> ImagesResponse:
        request.state.images = len(result["images"])
        metrics.images.labels(route).inc(len(result["images"]))
        return ImagesResponse(images=[base64.b64encode(image).decode("ascii") for image in result["images"]],
                              seed=result["seed"], model=result["model"], nfe=result["nfe"],
                              latency_ms=result["latency_ms"])

    # -- routes ----------------------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        """Liveness: the API process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Readiness: a model replica is loaded and answers."""
        try:
            await asyncio.wait_for(backend.ready(), 5)
        except (BackendUnavailable, asyncio.TimeoutError):
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "2"})
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics():
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelsResponse)
    async def models():
        """The served model: name, size, channels, classes, recommended schedules, limits."""
        return ModelsResponse(models=[await call_backend("info")])

    @app.post("/v1/generate", response_model=ImagesResponse,
              responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def generate(body: GenerateRequest, request: Request):
        """Generate images; requests with the same schedule are batched together. Seeded requests are exact."""
        _check_generate_limits(body, limits)
        result = await call_backend("generate", body.model_dump())
        if result.get("batches") is not None:
            metrics.queue_wait.observe(result["queue_wait_s"])
            for batch in result["batches"]:
                metrics.batch_size.observe(batch["images"])
                metrics.batch_requests.observe(batch["requests"])
        return images_response(request, result, "/v1/generate")

    @app.post("/v1/teacher/generate", response_model=ImagesResponse,
              responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def teacher_generate(body: GenerateRequest, request: Request):
        """The diffusion teacher (`serve --teacher`) from the same seeded noise as `/v1/generate`, with
        `num_inference_steps` Heun steps on a Karras grid (2n - 1 network evaluations); one request at a time,
        not batched. 404 when the server runs without a teacher."""
        _check_teacher_limits(body, limits)
        result = await call_backend("teacher_generate", body.model_dump())
        return images_response(request, result, "/v1/teacher/generate")

    @app.post("/v1/edit/{task}", response_model=ImagesResponse,
              responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def edit(
        task: str,
        request: Request,
        image: UploadFile = File(..., description="The input image (PNG, JPEG, ...)."),
        mask: UploadFile | None = File(None, description="inpaint: white = regenerate, black = keep."),
        num_inference_steps: int | None = Form(None),
        timesteps: str | None = Form(None, description="Comma-separated descending grid indices, e.g. 11,0."),
        sigmas: str | None = Form(None, description="Comma-separated descending noise levels."),
        seed: int | None = Form(None),
        class_labels: str | None = Form(None, description="Comma-separated labels (one or one per image)."),
        scale_factor: int | None = Form(None),
        sigma: float | None = Form(None),
        add_noise: bool = Form(False),
        output_format: str = Form("png"),
    ):
        """Zero-shot editing: `inpaint` (image + mask), `super-resolve` (scale_factor), `denoise` (sigma),
        `colorize` (RGB models), `stroke`. Runs one request per forward pass (not batched)."""
        if task not in EDIT_TASKS:
            raise ApiError(404, "not_found", f"Unknown edit task {task!r}; choose one of {list(EDIT_TASKS)}.", "task")
        try:
            options = EditOptions(
                num_inference_steps=num_inference_steps, timesteps=_form_list(timesteps, int, "timesteps"),
                sigmas=_form_list(sigmas, float, "sigmas"), seed=seed,
                class_labels=_form_list(class_labels, int, "class_labels"), scale_factor=scale_factor, sigma=sigma,
                add_noise=add_noise, output_format=output_format)
        except ValidationError as error:
            first = error.errors()[0]
            field = _field_name(first["loc"])
            raise ApiError(422, "validation_error", f"{field}: {first['msg']}", field)
        _check_steps(options.num_inference_steps, options.timesteps, options.sigmas, limits)
        pil_image = await _read_image(image, "image", limits)
        pil_mask = await _read_image(mask, "mask", limits) if mask is not None else None
        result = await call_backend("edit", task, pil_image, pil_mask, options.model_dump())
        return images_response(request, result, "/v1/edit/{task}")

    if settings.ui:
        from .playground import mount_playground

        mount_playground(app, api_base="")
    return app


class BodyLimit:
    """ASGI middleware: refuses request bodies over the route's limit with a 413, from Content-Length at once and
    while reading chunked bodies, before any parsing; the body it read is replayed to the app."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        limit = self.limit_for(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        body, more = b"", not (length.isdigit() and int(length) > limit)
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= limit
        if (length.isdigit() and int(length) > limit) or len(body) > limit:
            request_id = scope.get("state", {}).get("request_id", "")
            response = _error(413, "payload_too_large", f"The request body is larger than {limit} bytes.",
                              request_id, "body")
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _check_steps(num_inference_steps, timesteps, sigmas, limits):
    for field, count in (("timesteps", timesteps), ("sigmas", sigmas)):
        if count is not None and len(count) > limits.max_steps:
            raise ApiError(422, "validation_error", f"{field}: at most {limits.max_steps} noise levels per request, "
                                                    f"got {len(count)}.", field)
    if timesteps is None and sigmas is None and num_inference_steps is not None \
            and num_inference_steps > limits.max_steps:
        raise ApiError(422, "validation_error", f"num_inference_steps: at most {limits.max_steps}, got "
                                                f"{num_inference_steps}.", "num_inference_steps")


def _check_generate_limits(body: GenerateRequest, limits):
    if body.num_images > limits.max_images:
        raise ApiError(422, "validation_error", f"num_images: at most {limits.max_images} images per request, got "
                                                f"{body.num_images}.", "num_images")
    _check_steps(body.num_inference_steps, body.timesteps, body.sigmas, limits)
    if isinstance(body.class_labels, list) and len(body.class_labels) not in (1, body.num_images):
        raise ApiError(422, "validation_error", f"class_labels: give one label or {body.num_images}, got "
                                                f"{len(body.class_labels)}.", "class_labels")


def _check_teacher_limits(body: GenerateRequest, limits):
    if body.num_images > limits.max_images:
        raise ApiError(422, "validation_error", f"num_images: at most {limits.max_images} images per request, got "
                                                f"{body.num_images}.", "num_images")
    steps = body.num_inference_steps
    if steps is not None and steps > limits.max_teacher_steps:
        raise ApiError(422, "validation_error", f"num_inference_steps: at most {limits.max_teacher_steps} teacher "
                                                f"steps, got {steps}.", "num_inference_steps")
    if isinstance(body.class_labels, list) and len(body.class_labels) not in (1, body.num_images):
        raise ApiError(422, "validation_error", f"class_labels: give one label or {body.num_images}, got "
                                                f"{len(body.class_labels)}.", "class_labels")


def _form_list(text: str | None, kind, field: str):
    if text is None or not text.strip():
        return None
    try:
        return [kind(value) for value in text.replace(" ", "").split(",") if value]
    except ValueError:
        raise ApiError(422, "validation_error", f"{field}: expected comma-separated {kind.__name__}s, got {text!r}.",
                       field)


async def _read_image(upload: UploadFile, field: str, limits) -> PIL.Image.Image:
    """An uploaded file as a decoded PIL image, within the byte and pixel limits; 422/413 naming the field."""
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "payload_too_large", f"{field}: larger than {limits.max_upload_bytes} bytes.", field)
    try:
        image = PIL.Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_upload_pixels:
            raise ApiError(413, "payload_too_large", f"{field}: {width}x{height} pixels is more than the limit of "
                                                     f"{limits.max_upload_pixels}.", field)
        image.load()
    except ApiError:
        raise
    except Exception:  # PIL raises many kinds on garbage; the message must not echo paths or internals
        raise ApiError(422, "validation_error", f"{field}: not a readable image file (PNG, JPEG, WebP, ...).", field)
    return image
