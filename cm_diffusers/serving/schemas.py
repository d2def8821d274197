"""The HTTP API's boundary: one pydantic model per request and response, plus the server's settings and limits.

The request models validate everything that does not need the model (types, ranges, limits); the deployment then
checks what does (a schedule against the model's grid, class labels against its classes) and answers with the same
error shape, naming the field. `api_models(limits)` gives the request models of one server, with its limits in their
fields, so that the OpenAPI schema states every limit a request is held to.
"""

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, field_validator, model_validator

from ..edit_tasks import EDIT_TASKS as ALL_EDIT_TASKS
from ..latent.text_to_image import DEFAULT_STEPS, MAX_PROMPT_CHARACTERS, check_prompts

OUTPUT_FORMATS = ("png", "jpeg", "webp")
API_KEYS_ENV = "CM_DIFFUSERS_API_KEYS"
INDEX_BOUND = 2**31  # grid indices and class labels are below this; the model then checks its own grid and classes
SEED_BOUND = 2**63
MAX_GUIDANCE_SCALE = 20.0  # LCMs are distilled with w up to ~15 and LCM-LoRA is sampled at 1-2
NO_PROMPT = ("this model generates without a prompt (unconditional or class-conditional); serve a text-to-image "
             "model (an LCM folder, or a teacher with --lora) to send prompts")


# The edit tasks the API serves: those of the pipeline's one table that edit an uploaded image.
EDIT_TASK_TABLE = {name: task for name, task in ALL_EDIT_TASKS.items() if task.image}
EDIT_TASKS = tuple(EDIT_TASK_TABLE)


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
    auth_failures_per_minute: float = Field(30, ge=0, description="Failed authentications per minute per client "
                                                                  "address before it gets 429s (0 = unlimited).")
    request_timeout_s: float = Field(60, gt=0, description="A request still unanswered after this gets a 503.")


class ServerSettings(BaseModel):
    """Everything the deployments are built from; picklable, and free of secrets (keys are kept as SHA-256)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "fashion-mnist-cd"
    model_name: str | None = Field(None, description="Name reported by the API (default: `model`).")
    text_to_image: bool = Field(False, description="`model` is a latent text-to-image pipeline (an LCM folder, or a "
                                                   "teacher with `lora`): /v1/generate takes a `prompt`.")
    lora: str | None = Field(None, description="LCM-LoRA weights (folder or Hub repo id) for a text-to-image "
                                               "`model`, sampled with LCMScheduler.")
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

    @model_validator(mode="after")
    def _kind(self):
        if self.lora and not self.text_to_image:
            raise ValueError("lora: LCM-LoRA weights need a text-to-image model (text_to_image=True).")
        if self.text_to_image and self.teacher:
            raise ValueError("teacher: /v1/teacher/generate compares a pixel consistency model with its diffusion "
                             "teacher; a text-to-image model is served without one.")
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_key_lines(lines, source: str) -> list:
    """Keys of a key file: one per line; blank lines and `#` comments (whole-line or after the key) are skipped, and
    a UTF-8 byte order mark is dropped. A line with a space inside its key is refused: it is not what was meant."""
    keys = []
    for number, line in enumerate(lines, 1):
        key = (line.lstrip("\ufeff") if number == 1 else line).split("#", 1)[0].strip()
        if not key:
            continue
        if any(char.isspace() for char in key):
            raise ValueError(f"{source}, line {number}: a key must not contain spaces (one key per line; comments "
                             "start with `#`).")
        if not key.isascii() or not key.isprintable():
            raise ValueError(f"{source}, line {number}: a key must be printable ASCII.")
        keys.append(key)
    return keys


def load_api_keys(api_key_file: str | None = None, environ=None) -> list[str]:
    """API keys from a file (one per line, `#` comments) and/or CM_DIFFUSERS_API_KEYS (comma-separated)."""
    environ = os.environ if environ is None else environ
    keys = parse_key_lines(environ.get(API_KEYS_ENV, "").split(","), API_KEYS_ENV)
    if api_key_file:
        if not os.path.isfile(api_key_file):
            raise FileNotFoundError(f"--api_key_file {api_key_file!r}: no such file (one API key per line).")
        with open(api_key_file, encoding="utf-8") as f:
            keys += parse_key_lines(f.read().splitlines(), f"--api_key_file {api_key_file!r}")
        if not keys:
            raise ValueError(f"--api_key_file {api_key_file!r} holds no key (one API key per line).")
    short = [key for key in keys if len(key) < 16]
    if short:
        raise ValueError(f"{len(short)} API key(s) are shorter than 16 characters; use long random keys "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`).")
    if len(set(keys)) < len(keys):
        warnings.warn("The same API key is configured more than once.", stacklevel=2)
    return keys


# ----------------------------------------------------------------------------------------------------------------
# Requests

GridIndex = Annotated[int, Field(ge=0, lt=INDEX_BOUND)]
NoiseLevel = Annotated[float, Field(gt=0, allow_inf_nan=False)]
ClassLabel = Annotated[int, Field(ge=0, lt=INDEX_BOUND)]


class GenerateRequest(BaseModel):
    """`POST /v1/generate`. Give at most one of `num_inference_steps`, `timesteps` and `sigmas`."""

    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(1, ge=1, description="Number of images; at most the server's `max_images`.")
    num_inference_steps: int | None = Field(1, ge=1, description="Network evaluations (ignored with a schedule).")
    timesteps: list[GridIndex] | None = Field(None, min_length=1, description="Descending grid indices, e.g. "
                                                                              "[11, 0].")
    sigmas: list[NoiseLevel] | None = Field(None, min_length=1, description="Descending noise levels.")
    seed: int | None = Field(None, ge=0, lt=SEED_BOUND, description="Same seed, same images (drawn when omitted).")
    class_labels: ClassLabel | list[ClassLabel] | None = Field(None, description="One label, or one per image "
                                                                                 "(conditional models).")
    prompt: None = Field(None, description="Not taken: this model is not a text-to-image model (a prompt is a 422).")
    output_format: Literal["png", "jpeg", "webp"] = "png"

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_prompt(cls, value):
        if value is not None:
            raise ValueError(NO_PROMPT)
        return value

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("give at most one of `timesteps` and `sigmas`")
        if isinstance(self.class_labels, list) and len(self.class_labels) not in (1, self.num_images):
            raise ValueError(f"class_labels: give one label or {self.num_images}, got {len(self.class_labels)}")
        return self

    @field_validator("class_labels")
    @classmethod
    def _labels(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give one label or one per image, not an empty list")
        return value

    def cost(self) -> int:
        """Images x network evaluations: what admission control counts."""
        steps = len(self.timesteps or self.sigmas or ()) or self.num_inference_steps or 1
        return self.num_images * steps


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARACTERS)]
PROMPT_DOC = (f"One prompt for every image, or one per image; each 1 to {MAX_PROMPT_CHARACTERS} characters, not only "
              "spaces.")


def prompts_type(max_items: int | None = None):
    """A prompt, or a list of 1 to `max_items` prompts; an error names the form that was sent (`prompt.list.1`)."""
    def form(value) -> str:
        return "list" if isinstance(value, list) else "string"

    listed = Annotated[list[Prompt], Field(min_length=1, max_length=max_items), Tag("list")]
    return Annotated[Annotated[Prompt, Tag("string")] | listed, Discriminator(form)]


class TextToImageRequest(BaseModel):
    """`POST /v1/generate` on a latent text-to-image model: `num_inference_steps` LCMScheduler steps from a prompt
    (`cm_diffusers.latent.text_to_image.generate`, as `cm-diffusers generate --prompt` runs it)."""

    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(1, ge=1, description="Number of images; at most the server's `max_images`.")
    prompt: prompts_type() = Field(description=PROMPT_DOC)
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1,
                                     description="LCMScheduler steps (1-8 is what LCMs are made for).")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                         description="diffusers' guidance scale (default: 8.5 for an LCM, 1 for an "
                                                     "LCM-LoRA; see /v1/models).")
    seed: int | None = Field(None, ge=0, lt=SEED_BOUND, description="Same seed, same images (drawn when omitted).")
    output_format: Literal["png", "jpeg", "webp"] = "png"

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value, info):
        if "num_images" in info.data:  # (an invalid num_images is reported on its own)
            check_prompts([value] if isinstance(value, str) else value, info.data["num_images"])
        return value

    def cost(self) -> int:
        """Images x steps: what admission control counts."""
        return self.num_images * self.num_inference_steps


class EditFormOptions(BaseModel):
    """The options of `POST /v1/edit/{task}` after parsing the form (lists as lists), as the deployment gets them."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int | None = Field(None, ge=1, description="Network evaluations (task default if omitted).")
    timesteps: list[GridIndex] | None = Field(None, min_length=1)
    sigmas: list[NoiseLevel] | None = Field(None, min_length=1)
    seed: int | None = Field(None, ge=0, lt=SEED_BOUND)
    class_labels: list[ClassLabel] | None = Field(None, min_length=1)
    scale_factor: int | None = Field(None, ge=1, le=1024, description="super-resolve: the upsampling factor.")
    sigma: float | None = Field(None, gt=0, allow_inf_nan=False, description="denoise: the noise std of the image "
                                                                             "in [-1, 1] space.")
    add_noise: bool = Field(False, description="denoise: add noise of std `sigma` first (a demo round trip).")
    output_format: Literal["png", "jpeg", "webp"] = "png"


_INTS = r"^\s*\d{1,12}(\s*,\s*\d{1,12})*\s*$"
_FLOATS = r"^\s*[0-9.eE+-]{1,32}(\s*,\s*[0-9.eE+-]{1,32})*\s*$"


def _edit_form_fields(limits: "Limits") -> dict:
    """The form fields of an edit request as (type, constraints), with this server's limits (lists are
    comma-separated text in a form)."""
    text = limits.max_steps * 34
    return {
        "num_inference_steps": (int, dict(ge=1, le=limits.max_steps,
                                          description="Network evaluations (task default if omitted).")),
        "timesteps": (str, dict(pattern=_INTS, max_length=text,
                                description=f"Comma-separated descending grid indices, e.g. `11,0` (at most "
                                            f"{limits.max_steps}).")),
        "sigmas": (str, dict(pattern=_FLOATS, max_length=text,
                             description=f"Comma-separated descending noise levels (at most {limits.max_steps}).")),
        "class_labels": (str, dict(pattern=_INTS, max_length=limits.max_images * 14,
                                   description="Comma-separated labels (one, or one per image).")),
        "scale_factor": (int, dict(ge=1, le=1024, description="The upsampling factor; it divides the model's size.")),
        "sigma": (float, dict(gt=0, allow_inf_nan=False, description="The noise std of the image in [-1, 1] space "
                                                                     "(at most the model's sigma_max).")),
        "add_noise": (bool, dict(default=False, description="Add noise of std `sigma` first (a demo round trip).")),
    }


def _edit_form_model(task: str, limits: "Limits") -> type:
    spec, fields = EDIT_TASK_TABLE[task], _edit_form_fields(limits)
    chosen = {
        "image": (UploadFile, Field(description="The input image file (PNG, JPEG, WebP, ...), at most "
                                                f"{limits.max_upload_bytes} bytes and {limits.max_upload_pixels} "
                                                "pixels.")),
    }
    if spec.mask:
        chosen["mask"] = (UploadFile, Field(description="The mask file, the image's size: white = regenerate, "
                                                        "black = keep."))
    for name in spec.fields:
        kind, constraints = fields[name]
        if name in spec.required or "default" in constraints:
            chosen[name] = (kind, Field(**constraints))
        else:
            chosen[name] = (kind | None, Field(None, **constraints))
    chosen["seed"] = (int | None, Field(None, ge=0, lt=SEED_BOUND, description="Same seed, same images."))
    chosen["output_format"] = (Literal["png", "jpeg", "webp"], Field("png"))
    name = "EditForm" + "".join(part.capitalize() for part in task.split("-"))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **chosen)


@dataclass
class ApiModels:
    """The request models of one server: its limits in their fields (and so in its OpenAPI schema)."""

    generate: type
    teacher: type | None
    edit_forms: dict


def api_models(limits: Limits, text_to_image: bool = False) -> ApiModels:
    """The request models of a server with `limits`; with `text_to_image`, `generate` takes a prompt and there is no
    teacher or edit model (those routes need a pixel consistency model)."""
    if text_to_image:
        return ApiModels(generate=create_model(
            "TextToImageRequest", __base__=TextToImageRequest,
            num_images=(int, Field(1, ge=1, le=limits.max_images, description="Number of images.")),
            prompt=(prompts_type(limits.max_images), Field(description=PROMPT_DOC)),
            num_inference_steps=(int, Field(DEFAULT_STEPS, ge=1, le=limits.max_steps,
                                            description="LCMScheduler steps.")),
        ), teacher=None, edit_forms={})

    def generate_model(name: str, max_steps: int, steps_doc: str):
        return create_model(
            name, __base__=GenerateRequest,
            num_images=(int, Field(1, ge=1, le=limits.max_images, description="Number of images.")),
            num_inference_steps=(int | None, Field(1, ge=1, le=max_steps, description=steps_doc)),
            timesteps=(list[GridIndex] | None, Field(None, min_length=1, max_length=limits.max_steps,
                                                     description="Descending grid indices, e.g. [11, 0].")),
            sigmas=(list[NoiseLevel] | None, Field(None, min_length=1, max_length=limits.max_steps,
                                                   description="Descending noise levels.")),
            class_labels=(ClassLabel | list[ClassLabel] | None,
                          Field(None, description="One label, or one per image (conditional models).")),
        )

    return ApiModels(
        generate=generate_model("GenerateRequest", limits.max_steps, "Network evaluations (ignored with a "
                                                                     "schedule)."),
        teacher=generate_model("TeacherGenerateRequest", limits.max_teacher_steps, "Heun steps (2n - 1 network "
                                                                                   "evaluations)."),
        edit_forms={task: _edit_form_model(task, limits) for task in EDIT_TASKS},
    )


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
    takes_prompt: bool = Field(False, description="A text-to-image model: /v1/generate takes a `prompt`.")
    max_prompt_characters: int | None = Field(None, description="The longest prompt (text-to-image models).")
    guidance_scale: float | None = Field(None, description="The default guidance scale (text-to-image models).")
    sigma_min: float | None = Field(description="The consistency model's smallest noise level (none for a "
                                                "text-to-image model, which samples with LCMScheduler).")
    sigma_max: float | None
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


class StatusResponse(BaseModel):
    status: Literal["ok", "ready", "unavailable", "draining"]


class ErrorDetail(BaseModel):
    type: str = Field(description="validation_error, unauthorized, rate_limited, payload_too_large, not_found, ...")
    message: str
    field: str | None = Field(None, description="The request field the error is about, when there is one.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str
