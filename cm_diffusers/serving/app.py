"""The HTTP API: routes over a model backend, behind one plain ASGI middleware (`middleware.py`: request id, API keys,
rate limits, body size, draining, metrics, the access log and client disconnects).

`create_app(backend, settings)` builds the FastAPI app. The backend is the model deployment, in this process
(`embedded.py`) or through a Ray Serve handle (`deployment.py`): awaitable `generate(request, key)`,
`teacher_generate(request, key)`, `edit(task, image, mask, options, key)`, `info()`, `ready()` and `stats()`, raising
`BackendUnavailable` when no replica can answer. Errors are JSON `{"error": {"type", "message", "field"},
"request_id"}`; no stack trace or path ever reaches a client; every response carries `X-Request-ID`, the id its body
and its access-log line carry.
"""

import asyncio
import base64
import io
import logging
from typing import Annotated

import PIL.Image
from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..validation import InputError, parse_list
from .middleware import (
    GENERATE_ROUTES,
    Admission,
    ApiError,
    ApiMiddleware,
    Metrics,
    ServerState,
    error_response,
    field_of_location,
    location_text,
)
from .schemas import (
    EDIT_TASK_TABLE,
    EDIT_TASKS,
    EditFormOptions,
    ErrorResponse,
    ImagesResponse,
    ModelsResponse,
    ServerSettings,
    StatusResponse,
    api_models,
)

# PIL modes taken as grayscale; any other mode PIL can convert is taken as RGB.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class BackendUnavailable(Exception):
    """No model replica could answer (starting, restarting after a crash, or overloaded): a 503 to retry."""


def _errors(*statuses) -> dict:
    """OpenAPI `responses` for error statuses, all in the `ErrorResponse` shape."""
    described = {400: "The body is not parsable (not JSON, bad multipart).", 401: "Missing or invalid API key.",
                 404: "Unknown task, or no teacher on this server.", 413: "Body, upload or image over the limit.",
                 415: "Unsupported Content-Type or Content-Encoding.", 422: "A field is invalid (the error names it).",
                 429: "Rate limit, or this key's share of the server's work (Retry-After).",
                 503: "Overloaded, timed out, starting or draining (Retry-After)."}
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(backend, settings: ServerSettings, echo_request_id: bool = True, state: ServerState | None = None):
    """The FastAPI app of `cm-diffusers serve` over `backend` (see the module docstring). Behind Ray Serve's proxy,
    which gives every request an X-Request-ID (the client's, or a new one) and echoes it in the response, pass
    `echo_request_id=False`: the app adopts the proxy's id for its body and log, and the header is not doubled."""
    limits = settings.limits
    models = api_models(limits, settings.text_to_image)
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
        return error_response(error.status, error.kind, error.message, request_id(request), error.field, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        errors = error.errors() or [{"loc": ("body",), "msg": "invalid request", "type": "invalid"}]
        first = errors[0]
        field, kind, status = field_of_location(first.get("loc", ())), "validation_error", 422
        message = f"{location_text(first.get('loc', ()))}: {first['msg']}" if field else first["msg"]
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
        return error_response(status, kind, message, request_id(request), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind, field, message = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error"), \
            None, str(error.detail)
        if error.status_code == 400:  # FastAPI could not parse the body (too deep JSON, bad multipart)
            kind, field, message = "invalid_body", "body", f"body: could not be parsed ({error.detail})."
        request.scope["state"]["error_kind"] = kind
        return error_response(error.status_code, kind, message, request_id(request), field,
                              getattr(error, "headers", None))

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

    def images_response(request: Request, result: dict, route: str) -> Response:
        request.scope["state"]["images"] = len(result["images"])
        metrics.images.labels(route).inc(len(result["images"]))
        if result.get("batches") is not None:
            metrics.queue_wait.observe(result["queue_wait_s"])
            for batch in result["batches"]:
                metrics.batch_size.observe(batch["images"])
                metrics.batch_requests.observe(batch["requests"])
        body = ImagesResponse(images=[base64.b64encode(image).decode("ascii") for image in result["images"]],
                              seed=result["seed"], model=result["model"], nfe=result["nfe"],
                              latency_ms=result["latency_ms"])
        return Response(body.model_dump_json(), media_type="application/json")  # validated once, not again

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

    generate_doc = (
        "Generate images from a `prompt` (a latent text-to-image model: LCMScheduler steps, one request at a time, in "
        "parts of at most max_batch_size images). Seeded requests are exact." if settings.text_to_image else
        "Generate images; requests are batched together, one forward pass at a time. Seeded requests are exact.")

    @app.post("/v1/generate", response_model=ImagesResponse, responses=json_errors, description=generate_doc)
    async def generate(body: models.generate, request: Request):
        key = request.scope["state"].get("key_id")
        result = await call_backend(request, "generate", body.model_dump(), key, cost=body.cost())
        return images_response(request, result, "/v1/generate")

    if settings.text_to_image:
        _add_pixel_only_routes(app, settings.model_name or settings.model)
    else:
        _add_pixel_routes(app, models, limits, call_backend, images_response, json_errors)

    if settings.ui:
        from .playground import mount_playground

        mount_playground(app, api_base="")
    return app


def _add_pixel_routes(app, models, limits, call_backend, images_response, json_errors):
    """The routes of a pixel consistency model beyond generation: its diffusion teacher and zero-shot editing."""

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


def _add_pixel_only_routes(app, name: str):
    """On a text-to-image server, the teacher and edit routes answer a 404 that says why (they are not in its
    schema)."""

    @app.post("/v1/teacher/generate", include_in_schema=False)
    async def no_teacher():
        raise ApiError(404, "not_found", f"{name} is a text-to-image model: /v1/teacher/generate needs a pixel "
                                         "consistency model served with --teacher.")

    @app.post("/v1/edit/{task}", include_in_schema=False)
    async def no_editing(task: str):
        raise ApiError(404, "not_found", f"Editing needs a pixel consistency model; {name} is a text-to-image model "
                                         "(it takes prompts at /v1/generate).", "task")


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
            options = EditFormOptions(**{**values, **{name: _form_list(values.get(name), kind, name) for name, kind in
                                                  (("timesteps", int), ("sigmas", float), ("class_labels", int))}})
        except ValidationError as error:
            first = error.errors()[0]
            raise ApiError(422, "validation_error", f"{location_text(first['loc'])}: {first['msg']}",
                           field_of_location(first["loc"]))
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
