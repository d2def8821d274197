"""The model deployment: loads a `ConsistencyPipeline` once per replica and batches generation across requests.

Requests that share a noise schedule share a forward pass (`@serve.batch`, bounded by `max_batch_size` images and
`batch_wait_ms`). Each request draws its noise and class labels from its own `torch.Generator` exactly as
`ConsistencyPipeline.__call__` draws them, and its re-noising draws between steps too, so a seeded request gives
the same images alone, batched with others, or split across several forward passes. The sampling itself is the
pipeline's (`sampling_sigmas`, `prepare_latents`, `prepare_class_labels`, `sample`, `postprocess`); this module only
groups, concatenates and splits. All model calls run on one thread per replica, so nothing the pipeline holds is
ever used by two requests at once; the event loop stays free to queue the next batch meanwhile. With a teacher
(`serve --teacher`), `teacher_generate` samples it unbatched on the same thread with `sample_teacher` (Heun on a
Karras grid), from the noise a `generate` request of the same seed starts from.
"""

import asyncio
import io
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from ray import serve

from .schemas import EDIT_TASKS, ServerSettings

TEACHER_ENDPOINT = "/v1/teacher/generate"
TEACHER_SAMPLER = "heun"  # on a Karras grid between the teacher's sigma_min and sigma_max, as `sample_teacher` does
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The editing method of each task, and the form fields it takes besides the image(s).
EDIT_METHODS = {
    "inpaint": ("inpaint", ("num_inference_steps", "timesteps", "sigmas", "class_labels")),
    "super-resolve": ("super_resolve", ("scale_factor", "num_inference_steps", "timesteps", "sigmas", "class_labels")),
    "denoise": ("denoise", ("sigma", "add_noise", "class_labels")),
    "colorize": ("colorize", ("num_inference_steps", "timesteps", "sigmas", "class_labels")),
    "stroke": ("stroke_edit", ("timesteps", "sigmas", "class_labels")),
}
REQUIRED_EDIT_OPTIONS = {"super-resolve": ("scale_factor",), "denoise": ("sigma",)}


def request_error(field: str | None, message: str, kind: str = "validation_error", status: int = 422) -> dict:
    """An error answer that crosses the deployment boundary as data (no stack trace, no path)."""
    return {"error": {"type": kind, "field": field, "message": message, "status": status}}


@dataclass
class _Part:
    """Up to `max_batch_size` rows of one request, queued for a batched forward pass."""

    schedule: tuple
    latents: torch.Tensor
    class_labels: torch.Tensor | None
    noise: Callable
    queued_at: float

    @property
    def rows(self) -> int:
        return self.latents.shape[0]


class _RequestNoise:
    """The re-noising draws of one request, shared by its parts: draw k covers all the request's rows at once, drawn
    from its generator as an unbatched pipeline call draws it, whichever part asks for it first."""

    def __init__(self, generator: torch.Generator, num_rows: int, device, dtype):
        from ..sampling import grouped_randn

        self.randn = grouped_randn([generator], [num_rows], device=device, dtype=dtype)
        self.num_rows = num_rows
        self.draws = []

    def rows(self, start: int, stop: int) -> Callable:
        calls = 0

        def randn(shape):
            nonlocal calls
            if calls == len(self.draws):
                self.draws.append(self.randn((self.num_rows, *shape[1:])))
            calls += 1
            return self.draws[calls - 1][start:stop]

        return randn


def _images_in(parts) -> int:
    return sum(part.rows for part in parts)


class ConsistencyModel:
    """One replica: the pipeline, one model thread, and the batched generation method."""

    def __init__(self, settings: dict):
        from ..pipeline_consistency import ConsistencyPipeline

        self.settings = ServerSettings(**settings)
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        self.pipe = ConsistencyPipeline.from_pretrained(self.settings.model, dtype=DTYPES[self.settings.dtype])
        self.pipe = self.pipe.to(self.settings.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = self.settings.model_name or self.settings.model
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cm-model")
        self.generate_batch.set_max_batch_size(self.settings.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        self._info = self._model_info()
        self._batch_id = 0
        # Ray Serve (2.60) forms the next batch while the previous one runs, so without this gate the requests that
        # arrive during a forward pass are cut into small batches every `batch_wait_ms`; held here until the pass
        # ends, they join one full batch.
        self._model_free = asyncio.Event()
        self._model_free.set()
        self._unet_calls = 0  # network evaluations, counted on the model thread (an edit's NFE)
        self.pipe.unet.register_forward_pre_hook(self._count_unet_call)
        self.teacher = self._load_teacher(self.settings.teacher) if self.settings.teacher else None
        if self.teacher is not None:
            self._info.update(teacher=self.settings.teacher, teacher_endpoint=TEACHER_ENDPOINT)
        # Warm-up: the first forward pass pays one-off costs (kernel selection, allocations) that a user should not.
        _, latents, labels = self._starting_noise({"num_images": 1}, seed=0)
        with torch.no_grad():
            self.pipe.sample(latents, self.pipe.sampling_sigmas(1), labels)
            if self.teacher is not None:
                self._sample_teacher(latents, 1, labels)

    def _load_teacher(self, name_or_path: str):
        """The diffusion teacher as a denoiser; it must sample the consistency model's shape and classes, so that one
        seed starts both from the same noise."""
        from ..shipped_models import resolve_pretrained
        from ..teachers import load_teacher

        teacher = load_teacher(resolve_pretrained(name_or_path), torch_dtype=DTYPES[self.settings.dtype],
                               device=self.settings.device)
        config = teacher.unet.config
        size = config.sample_size
        shape = (config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))
        if shape != self.pipe.sample_shape(1)[1:]:
            raise ValueError(f"--teacher {name_or_path}: it samples {shape} (channels, height, width), the model "
                             f"{tuple(self.pipe.sample_shape(1)[1:])}; serve a teacher of the model's shape.")
        if config.num_class_embeds != self.pipe.unet.config.num_class_embeds:
            raise ValueError(f"--teacher {name_or_path}: it has {config.num_class_embeds} classes, the model "
                             f"{self.pipe.unet.config.num_class_embeds}; serve a teacher with the model's classes.")
        return teacher

    # -- metadata --------------------------------------------------------------------------------------------------

    def _model_info(self) -> dict:
        from ..model_card import load_card_info
        from ..shipped_models import resolve_pretrained

        _, channels, height, width = self.pipe.sample_shape(1)
        config = self.pipe.scheduler.config
        schedules = []
        try:
            sampling = load_card_info(resolve_pretrained(self.settings.model)).get("sampling")
            if isinstance(sampling, dict) and sampling:
                schedules.append(sampling)
        except (OSError, ValueError):  # a Hub id or a folder without a card: no recommendation to read
            pass
        schedules.append({"num_inference_steps": 1})
        return {
            "name": self.name, "resolution": [height, width], "channels": channels,
            "num_classes": self.pipe.unet.config.num_class_embeds, "sigma_min": float(config.sigma_min),
            "sigma_max": float(config.sigma_max), "num_train_timesteps": int(config.num_train_timesteps),
            "recommended_schedules": schedules,
            "edit_tasks": [task for task in EDIT_TASKS if task != "colorize" or channels == 3],
            "max_batch_size": self.settings.max_batch_size, "limits": self.settings.limits.model_dump(),
        }

    def _count_unet_call(self, module, args):
        self._unet_calls += 1

    def info(self) -> dict:
        return self._info

    def ready(self) -> bool:
        return True

    # -- generation ------------------------------------------------------------------------------------------------

    def _starting_noise(self, request: dict, seed: int) -> tuple:
        """The request's generator, starting latents and class labels, drawn from its seed in the order the offline
        pipeline draws them (so a seeded request equals `pipe(..., generator=seed)`); ValueError: bad labels."""
        generator = torch.Generator().manual_seed(seed)
        latents = self.pipe.prepare_latents(request["num_images"], generator)
        labels = self.pipe.prepare_class_labels(request["num_images"], request.get("class_labels"), generator)
        return generator, latents, labels

    async def generate(self, request: dict) -> dict:
        """One `/v1/generate` request (a `GenerateRequest` as a dict) -> encoded images and batching statistics."""
        started = time.perf_counter()
        seed = request["seed"] if request.get("seed") is not None else secrets.randbelow(2**32)
        num_images = request["num_images"]
        schedule_given = request.get("timesteps") is not None or request.get("sigmas") is not None
        try:
            sigmas = self.pipe.sampling_sigmas(
                num_inference_steps=None if schedule_given else request.get("num_inference_steps"),
                timesteps=request.get("timesteps"), sigmas=request.get("sigmas"))
        except ValueError as error:
            field = "timesteps" if request.get("timesteps") is not None else \
                "sigmas" if request.get("sigmas") is not None else "num_inference_steps"
            return request_error(field, str(error))
        try:
            generator, latents, labels = self._starting_noise(request, seed)
        except ValueError as error:
            return request_error("class_labels", str(error))

        # Split into parts of at most max_batch_size rows; each part joins a batch with other requests' parts.
        step = self.settings.max_batch_size
        noise = _RequestNoise(generator, num_images, latents.device, latents.dtype)
        schedule = tuple(sigmas.tolist())
        parts = [
            _Part(schedule, latents[start:start + step], None if labels is None else labels[start:start + step],
                  noise.rows(start, min(start + step, num_images)), time.perf_counter())
            for start in range(0, num_images, step)
        ]
        await self._model_free.wait()
        results = await asyncio.gather(*(self.generate_batch(part) for part in parts))
        sample = torch.cat([result["sample"] for result in results])
        images = await asyncio.to_thread(self._encode, sample, request.get("output_format", "png"))
        return {
            "images": images, "seed": seed, "model": self.name, "nfe": len(schedule),
            "latency_ms": (time.perf_counter() - started) * 1000,
            "queue_wait_s": max(result["queue_wait_s"] for result in results),
            "batches": [result["batch"] for result in results if result["batch"] is not None],
        }

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def generate_batch(self, parts: list) -> list:
        """One forward pass per schedule over the queued parts (the limits are set per replica in `__init__`)."""
        started = time.perf_counter()
        self._model_free.clear()
        try:
            samples = await asyncio.get_running_loop().run_in_executor(self.executor, self._sample_parts, parts)
        finally:
            self._model_free.set()
        self._batch_id += 1
        batch = {"id": self._batch_id, "images": _images_in(parts), "requests": len(parts)}
        # Each batch is reported once, with its first part, so that the server's histogram counts batches.
        return [{"sample": sample, "queue_wait_s": started - part.queued_at, "batch": batch if i == 0 else None}
                for i, (part, sample) in enumerate(zip(parts, samples))]

    @torch.no_grad()
    def _sample_parts(self, parts: list) -> list:
        """Runs on the model thread: one `pipe.sample` per distinct schedule; returns each part's samples."""
        samples = [None] * len(parts)
        for schedule in dict.fromkeys(part.schedule for part in parts):
            group = [i for i, part in enumerate(parts) if part.schedule == schedule]

            def randn(shape, group=group):
                return torch.cat([parts[i].noise((parts[i].rows, *shape[1:])) for i in group])

            labels = [parts[i].class_labels for i in group]
            sample = self.pipe.sample(
                torch.cat([parts[i].latents for i in group]), torch.tensor(schedule, dtype=torch.float32),
                class_labels=None if labels[0] is None else torch.cat(labels), randn=randn)
            for i, rows in zip(group, sample.split([parts[i].rows for i in group])):
                samples[i] = rows
        return samples

    def _encode(self, sample: torch.Tensor, output_format: str) -> list:
        return [_encode_image(image, output_format) for image in self.pipe.postprocess(sample, "pil")]

    # -- the teacher -----------------------------------------------------------------------------------------------

    async def teacher_generate(self, request: dict) -> dict:
        """One `/v1/teacher/generate` request (a `GenerateRequest` as a dict, `num_inference_steps` = Heun steps),
        unbatched: the noise and labels are drawn as `generate` draws them, so one seed starts both models alike."""
        started = time.perf_counter()
        if self.teacher is None:
            return request_error(None, "This server has no teacher: start it with `cm-diffusers serve --teacher "
                                       "NAME_OR_PATH` (e.g. --teacher fashion-mnist-ddpm).", "not_found", 404)
        for field in ("timesteps", "sigmas"):
            if request.get(field) is not None:
                return request_error(field, f"The teacher takes `num_inference_steps` (Heun steps on a Karras "
                                            f"grid), not `{field}`.")
        num_steps = request.get("num_inference_steps")
        if num_steps is None:
            return request_error("num_inference_steps", "The teacher needs `num_inference_steps` (Heun steps).")
        seed = request["seed"] if request.get("seed") is not None else secrets.randbelow(2**32)
        try:
            _, latents, labels = self._starting_noise(request, seed)
        except ValueError as error:
            return request_error("class_labels", str(error))
        await self._model_free.wait()
        output = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._sample_teacher, latents, num_steps, labels)
        images = await asyncio.to_thread(self._encode, output.sample, request.get("output_format", "png"))
        return {"images": images, "seed": seed, "model": self.settings.teacher, "nfe": output.nfe,
                "latency_ms": (time.perf_counter() - started) * 1000}

    def _sample_teacher(self, latents: torch.Tensor, num_steps: int, class_labels):
        """Runs on the model thread: the teacher's own sampler (`sample_teacher`), `num_steps` Heun steps."""
        from ..teacher_sampling import nfe_for_steps, sample_teacher

        return sample_teacher(self.teacher, latents, TEACHER_SAMPLER, nfe=nfe_for_steps(TEACHER_SAMPLER, num_steps),
                              class_labels=class_labels)

    # -- editing ---------------------------------------------------------------------------------------------------

    async def edit(self, task: str, image, mask, options: dict) -> dict:
        """One `/v1/edit/{task}` request, unbatched: decoded PIL uploads and `EditOptions` as a dict."""
        started = time.perf_counter()
        if task not in EDIT_METHODS:
            return request_error("task", f"Unknown task {task!r}; choose one of {list(EDIT_METHODS)}.", status=404)
        method, allowed = EDIT_METHODS[task]
        given = {key: value for key, value in options.items()
                 if key not in ("seed", "output_format") and value not in (None, False)}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            return request_error(unknown[0], f"`{unknown[0]}` does not apply to {task}; it takes {list(allowed)}.")
        for key in REQUIRED_EDIT_OPTIONS.get(task, ()):
            if key not in given:
                return request_error(key, f"{task} needs the form field `{key}`.")
        if task == "inpaint" and mask is None:
            return request_error("mask", "inpaint needs a `mask` file: white = regenerate, black = keep.")
        if task != "inpaint" and mask is not None:
            return request_error("mask", f"{task} takes no mask.")

        _, channels, height, width = self.pipe.sample_shape(1)
        if task == "colorize" and channels != 3:
            return request_error("task", f"colorize needs an RGB model; {self.name} has {channels} channel(s).")
        image = image.convert("L" if channels == 1 else "RGB")
        size = (width, height)
        if task == "super-resolve":
            factor = given["scale_factor"]
            if height % factor or width % factor:
                return request_error("scale_factor", f"scale_factor={factor} must divide the model's size "
                                                     f"{height}x{width}.")
            size = (width // factor, height // factor)
        if image.size != size:
            return request_error("image", f"The image is {image.size[0]}x{image.size[1]} (width x height); this "
                                          f"model needs {size[0]}x{size[1]}.")
        if mask is not None:
            mask = mask.convert("L")
            if mask.size != image.size:
                return request_error("mask", f"The mask is {mask.size[0]}x{mask.size[1]}; it must have the image's "
                                             f"size {image.size[0]}x{image.size[1]}.")
            given["mask_image"] = mask
        seed = options["seed"] if options.get("seed") is not None else secrets.randbelow(2**32)

        def run():
            calls = self._unet_calls
            output = getattr(self.pipe, method)(image, generator=torch.Generator().manual_seed(seed), **given)
            return output.images, self._unet_calls - calls

        try:
            pil_images, nfe = await asyncio.get_running_loop().run_in_executor(self.executor, run)
        except ValueError as error:
            return request_error(_field_of(str(error), default="image"), str(error))
        fmt = options.get("output_format", "png")
        images = await asyncio.to_thread(lambda: [_encode_image(pil, fmt) for pil in pil_images])
        return {"images": images, "seed": seed, "model": self.name, "nfe": nfe,
                "latency_ms": (time.perf_counter() - started) * 1000}


def _field_of(message: str, default: str) -> str:
    """The field a pipeline error names (`like_this`), or `default`."""
    match = re.search(r"`(\w+)`", message)
    return match.group(1) if match else default


def _encode_image(image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper())
    return buffer.getvalue()
