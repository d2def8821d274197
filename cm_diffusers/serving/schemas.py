"""The HTTP API's boundary: one pydantic model per request and response, plus the server's settings and limits.

The request models validate everything that does not need the model (types, ranges, limits); the deployment then
checks what does (a schedule against the model's grid, class labels against its classes) and answers with the same
error shape, naming the field.
"""

import hashlib
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OUTPUT_FORMATS = ("png", "jpeg", "webp")
EDIT_TASKS = ("inpaint", "super-resolve", "denoise", "colorize", "stroke")
API_KEYS_ENV = "CM_DIFFUSERS_API_KEYS"


class Limits(BaseModel):
    """What one request may ask for; every limit answers with a 4xx JSON error that names the field."""

    model_config = ConfigDict(extra="forbid")

    max_images: int = Field(64, ge=1, description="Images per request (larger requests are split into batches).")
    max_steps: int = Field(40, ge=1, description="Network evaluations (noise levels) per request.")
    max_teacher_steps: int = Field(50, ge=1, description="Heun steps per `/v1/teacher/generate` request.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Size of a JSON request body.")
    max_upload_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Size of an uploaded image or mask file.")
    max_upload_pixels: int = Field(1024 * 1024, ge=1, description="Width x height of an uploaded image or mask.")
    rate_limit_per_minute: float = Field(600, ge=0, description="Requests per minute per API key (0 = unlimited).")
    request_timeout_s: float = Field(60, gt=0, description="A request still unanswered after this gets a 503.")


class ServerSettings(BaseModel):
    """Everything the deployments are built from; picklable, and free of secrets (keys are kept as SHA-256)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "fashion-mnist-cd"
    model_name: str | None = Field(None, description="Name reported by the API (default: `model`).")
    teacher: str | None = Field(None, description="Diffusion teacher served at /v1/teacher/generate (folder, Hub "
                                                  "repo id or shipped short name); none by default.")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_batch_size: int = Field(32, ge=1, description="Images per forward pass.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests.")
    num_threads: int | None = Field(None, ge=1, description="torch threads per model replica.")
    api_key_hashes: list[str] = Field(default_factory=list, description="SHA-256 hex digests of the API keys.")
    limits: Limits = Field(default_factory=Limits)
    ui: bool = Field(False, description="Mount the playground page at /ui.")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_hashes)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_api_keys(api_key_file: str | None = None, environ=None) -> list[str]:
    """API keys from a file (one per line, `#` comments) and/or CM_DIFFUSERS_API_KEYS (comma-separated)."""
    environ = os.environ if environ is None else environ
    keys = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    if api_key_file:
        if not os.path.isfile(api_key_file):
            raise FileNotFoundError(f"--api_key_file {api_key_file!r}: no such file (one API key per line).")
        with open(api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"--api_key_file {api_key_file!r} holds no key (one API key per line).")
    short = [key for key in keys if len(key) < 16]
    if short:
        raise ValueError(f"{len(short)} API key(s) are shorter than 16 characters; use long random keys "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`).")
    return keys


# ----------------------------------------------------------------------------------------------------------------
# Requests


class GenerateRequest(BaseModel):
    """`POST /v1/generate`. Give at most one of `num_inference_steps`, `timesteps` and `sigmas`."""

    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(1, ge=1, description="Number of images; at most the server's `max_images`.")
    num_inference_steps: int | None = Field(1, ge=1, description="Network evaluations (ignored with a schedule).")
    timesteps: list[int] | None = Field(None, min_length=1, description="Descending grid indices, e.g. [11, 0].")
    sigmas: list[float] | None = Field(None, min_length=1, description="Descending noise levels.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same images (drawn when omitted).")
    class_labels: int | list[int] | None = Field(None, description="One label, or one per image (conditional models).")
    output_format: Literal["png", "jpeg", "webp"] = "png"

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("give at most one of `timesteps` and `sigmas`")
        return self

    @field_validator("class_labels")
    @classmethod
    def _labels(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give one label or one per image, not an empty list")
        return value

    def schedule_field(self) -> str:
        """The field that defines this request's schedule (errors about the schedule name it)."""
        return "timesteps" if self.timesteps is not None else "sigmas" if self.sigmas is not None else \
            "num_inference_steps"


class EditOptions(BaseModel):
    """The form fields of `POST /v1/edit/{task}` (besides the `image` and `mask` files)."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int | None = Field(None, ge=1, description="Network evaluations (task default if omitted).")
    timesteps: list[int] | None = Field(None, min_length=1)
    sigmas: list[float] | None = Field(None, min_length=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    class_labels: list[int] | None = Field(None, min_length=1)
    scale_factor: int | None = Field(None, ge=1, description="super-resolve: the upsampling factor.")
    sigma: float | None = Field(None, gt=0, description="denoise: the noise std of the image in [-1, 1] space.")
    add_noise: bool = Field(False, description="denoise: add noise of std `sigma` first (a demo round trip).")
    output_format: Literal["png", "jpeg", "webp"] = "png"


# ----------------------------------------------------------------------------------------------------------------
# Responses


class ImagesResponse(BaseModel):
    """Answer of `/v1/generate` and `/v1/edit/{task}`: base64-encoded images and how they were made."""

    model_config = ConfigDict(protected_namespaces=())

    images: list[str] = Field(description="Base64-encoded images in `output_format`.")
    seed: int = Field(description="The seed used; send it back to get the same images.")
    model: str
    nfe: int = Field(description="Network evaluations per image.")
    latency_ms: float = Field(description="Server time for this request, queueing included.")


class ModelInfo(BaseModel):
    name: str
    resolution: list[int] = Field(description="[height, width]")
    channels: int
    num_classes: int | None
    sigma_min: float
    sigma_max: float
    num_train_timesteps: int
    recommended_schedules: list[dict] = Field(description="Schedules from the model card, then the 1-step default.")
    edit_tasks: list[str]
    max_batch_size: int
    limits: Limits
    teacher: str | None = Field(None, description="The teacher's name, when the server was started with --teacher.")
    teacher_endpoint: str | None = Field(None, description="Where the teacher generates (same request and answer "
                                                           "as /v1/generate; `num_inference_steps` = Heun steps).")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str
