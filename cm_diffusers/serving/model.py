"""The model deployment: loads a `ConsistencyPipeline` once per replica and batches generation across requests, one
forward pass at a time.

A generation request is cut into parts of at most `max_batch_size` rows. Each part runs the pipeline's sampling
loop (`consistency_sample`, as `ConsistencyPipeline.sample` runs it) on a thread of its own, whose network
evaluations are handed to the batcher: every forward pass takes the evaluations waiting, in turns across API keys
(the key served longest ago first), up to `max_batch_size` rows, whatever their noise levels (the UNet takes one sigma
per row). So a light request behind a heavy one from another key waits about one forward pass, not the heavy one's
whole schedule; and a request that is cancelled (it timed out, or its client went away) has its waiting evaluations
dropped and runs no further pass. Each request draws its noise and class labels from its own `torch.Generator`
exactly as `ConsistencyPipeline.__call__` draws them, and its re-noising draws between steps too, so a seeded request
gives the same images alone, batched with others, or split across several forward passes. All model calls run on one
thread per replica. Edits and the teacher (`serve --teacher`) run whole on that thread, unbatched.

The class needs no Ray: `embedded.py` uses it in the API's own process, `deployment.py` as a Ray Serve deployment.
"""

import asyncio
import concurrent.futures
import io
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Callable

import torch

from .schemas import EDIT_TASK_TABLE, EDIT_TASKS, NO_PROMPT, ServerSettings

TEACHER_ENDPOINT = "/v1/teacher/generate"
TEACHER_SAMPLER = "heun"  # on a Karras grid between the teacher's sigma_min and sigma_max, as `sample_teacher` does
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BAD_INPUT = (ValueError, ArithmeticError)  # what the pipeline raises on input it refuses (a 422, never a 500)
INLINE_ENCODE_VALUES = 4 * 3 * 64 * 64  # outputs up to this many values are encoded on the event loop


def request_error(field: str | None, message: str, kind: str = "validation_error", status: int = 422) -> dict:
    """An error answer that crosses the deployment boundary as data (no stack trace, no path)."""
    return {"error": {"type": kind, "field": field, "message": message, "status": status}}


class Cancelled(Exception):
    """The request of a part was cancelled: its sampling loop stops at its next network evaluation."""


@dataclass
class _Request:
    key: str | None
    arrived: float
    cancelled: bool = False
    first_pass: float | None = None
    batches: list = dataclass_field(default_factory=list)


@dataclass
class _Evaluation:
    """One network evaluation of one part, waiting for a forward pass."""

    request: _Request
    x: torch.Tensor
    sigma: torch.Tensor
    class_labels: torch.Tensor | None
    result: concurrent.futures.Future

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class _RequestNoise:
    """The re-noising draws of one request, shared by its parts: draw k covers all the request's rows at once, drawn
    from its generator as an unbatched pipeline call draws it, whichever part asks for it first."""

    def __init__(self, generator: torch.Generator, num_rows: int, device, dtype):
        from ..sampling import grouped_randn

        self.randn = grouped_randn([generator], [num_rows], device=device, dtype=dtype)
        self.num_rows = num_rows
        self.draws = []
        self.lock = threading.Lock()  # parts run on threads of their own

    def randn_for_rows(self, start: int, stop: int) -> Callable:
        """A `randn(shape)` that returns rows [start, stop) of each of the request's draws."""
        calls = 0

        def randn(shape):
            nonlocal calls
            with self.lock:
                if calls == len(self.draws):
                    self.draws.append(self.randn((self.num_rows, *shape[1:])))
                calls += 1
                return self.draws[calls - 1][start:stop]

        return randn


class _Batcher:
    """Forms the forward passes: waiting evaluations in turns across keys, up to `max_rows` rows; runs them with
    `run(evaluations)` on the model thread. `submit` may be called from any thread."""

    def __init__(self, run: Callable, executor, max_rows: int, wait_s: float):
        self.run, self.executor, self.max_rows, self.wait_s = run, executor, max_rows, wait_s
        self.waiting: list = []
        self.stepping = 0  # parts between two evaluations (their next one comes within microseconds)
        self.served = {}  # key -> number of the last pass that served it
        self.passes = 0
        self.loop = None
        self.wakeup = None
        self.task = None

    def start(self):
        if self.task is None or self.loop is not asyncio.get_running_loop():  # (a new event loop: tests)
            self.loop = asyncio.get_running_loop()
            self.wakeup = asyncio.Event()
            self.task = self.loop.create_task(self._serve())

    def submit(self, evaluation: _Evaluation):
        self.loop.call_soon_threadsafe(self._add, evaluation)

    def part_started(self):
        """On the event loop, before a part's thread starts: it will send its first evaluation."""
        self.stepping += 1

    def part_done(self):
        self.loop.call_soon_threadsafe(self._step_done)

    def _add(self, evaluation):
        self._step_done()
        self.waiting.append(evaluation)
        self.wakeup.set()

    def _step_done(self):
        self.stepping = max(0, self.stepping - 1)
        if not self.stepping:
            self.wakeup.set()

    async def _serve(self):
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            # Parts that just finished a step send their next evaluation at once: wait for them (at most wait_s)
            # so that a multistep request is not cut into one pass per step of each of its parts.
            deadline = time.monotonic() + self.wait_s
            while self.stepping and sum(e.rows for e in self.waiting) < self.max_rows and time.monotonic() < deadline:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            batch = self._pick()
            if not batch:
                continue
            self.passes += 1
            for evaluation in batch:
                self.served[evaluation.request.key] = self.passes
            self.stepping += len(batch)
            try:
                outputs = await self.loop.run_in_executor(self.executor, self.run, batch)
            except BaseException as error:  # a bug in the model code: every part of the pass gets it
                for evaluation in batch:
                    evaluation.result.set_exception(error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            for evaluation, output in zip(batch, outputs):
                evaluation.result.set_result(output)
            if self.waiting:
                self.wakeup.set()

    def _pick(self) -> list:
        """Drops cancelled evaluations; then, key by key (served longest ago first), one evaluation per key per
        round, while they fit in `max_rows` (the first always goes, whatever its size)."""
        kept = []
        for evaluation in self.waiting:
            if evaluation.request.cancelled:
                evaluation.result.set_exception(Cancelled())
                self.stepping += 1  # its part ends now (and says so)
            else:
                kept.append(evaluation)
        queues = {}
        for evaluation in kept:
            queues.setdefault(evaluation.request.key, []).append(evaluation)
        order = sorted(queues, key=lambda key: self.served.get(key, 0))
        batch, rows, progress = [], 0, True
        while progress:
            progress = False
            for key in order:
                queue = queues[key]
                if queue and (not batch or rows + queue[0].rows <= self.max_rows):  # one per key per round
                    batch.append(queue.pop(0))
                    rows += batch[-1].rows
                    progress = True
        self.waiting = [e for queue in queues.values() for e in queue]
        self.waiting.sort(key=lambda e: e.request.arrived)
        return batch


class ConsistencyModel:
    """One replica: the pipeline, one model thread, the batcher of forward passes, and the request methods."""

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
        # The parts' sampling loops wait on their evaluations; admission bounds how many there are.
        self.part_threads = ThreadPoolExecutor(max_workers=512, thread_name_prefix="cm-part")
        self.batcher = _Batcher(self._forward, self.executor, self.settings.max_batch_size,
                                self.settings.batch_wait_ms / 1000)
        self._info = self._model_info()
        self._stats = {"forward_passes": 0, "network_evaluations": 0, "cancelled_requests": 0}
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

    def stats(self) -> dict:
        """Counters of the model: forward passes, image rows evaluated, requests cancelled."""
        return dict(self._stats)

    async def generate(self, request: dict, key: str | None = None) -> dict:
        """One `/v1/generate` request (a `GenerateRequest` as a dict) from API key `key` -> encoded images and batching
        statistics. Cancelling the call (a timeout, a client gone) drops the request's remaining forward passes."""
        started = time.perf_counter()
        if request.get("prompt") is not None:
            return request_error("prompt", f"prompt: {NO_PROMPT}.")
        seed = request["seed"] if request.get("seed") is not None else secrets.randbelow(2**32)
        num_images = request["num_images"]
        try:
            sigmas = self.pipe.sampling_sigmas(**_schedule_of(request))
        except BAD_INPUT as error:
            return request_error(getattr(error, "field", None) or _schedule_field(request), str(error))
        try:
            generator, latents, labels = self._starting_noise(request, seed)
        except BAD_INPUT as error:
            return request_error("class_labels", str(error))

        self.batcher.start()
        state = _Request(key, started)
        step = self.settings.max_batch_size
        noise = _RequestNoise(generator, num_images, latents.device, latents.dtype)
        schedule = sigmas.tolist()
        loop = asyncio.get_running_loop()
        parts = []
        for start in range(0, num_images, step):
            stop = min(start + step, num_images)
            self.batcher.part_started()
            parts.append(loop.run_in_executor(
                self.part_threads, self._sample_part, state, latents[start:stop],
                None if labels is None else labels[start:stop], schedule, noise.randn_for_rows(start, stop)))
        try:
            samples = await asyncio.gather(*parts)
        except BaseException:
            state.cancelled = True
            self._stats["cancelled_requests"] += 1
            for part in parts:  # they end at their next evaluation; nothing waits for them
                part.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        sample, output_format = torch.cat(samples), request.get("output_format", "png")
        # A few small images encode in microseconds: a thread hop would cost more than it frees the event loop.
        images = self._encode(sample, output_format) if sample[0].numel() * len(sample) <= INLINE_ENCODE_VALUES \
            else await asyncio.to_thread(self._encode, sample, output_format)
        return {
            "images": images, "seed": seed, "model": self.name, "nfe": len(schedule),
            "latency_ms": (time.perf_counter() - started) * 1000,
            "queue_wait_s": (state.first_pass or time.perf_counter()) - started, "batches": state.batches,
        }

    def _sample_part(self, state: _Request, latents, class_labels, schedule: list, randn) -> torch.Tensor:
        """Runs on a part thread: the pipeline's sampling loop, its network evaluations batched by the batcher."""
        from ..sampling import consistency_sample

        config = self.pipe.scheduler.config

        def evaluate(x, sigma):
            if state.cancelled:
                raise Cancelled()
            result = concurrent.futures.Future()
            self.batcher.submit(_Evaluation(state, x, sigma, class_labels, result))
            return result.result()

        try:
            with torch.no_grad():
                return consistency_sample(evaluate, latents, schedule, config.sigma_min, config.s_noise,
                                          config.clip_denoised, randn=randn)
        finally:
            self.batcher.part_done()

    @torch.no_grad()
    def _forward(self, batch: list) -> list:
        """Runs on the model thread: one forward pass over the evaluations of `batch` (one sigma per row)."""
        now = time.perf_counter()
        requests = {}
        for evaluation in batch:
            requests.setdefault(id(evaluation.request), evaluation.request)
        rows = sum(evaluation.rows for evaluation in batch)
        report = {"images": rows, "requests": len(requests)}
        first = next(iter(requests.values()))
        first.batches.append(report)  # each pass reported once, so that the server's histograms count passes
        for request in requests.values():
            request.first_pass = request.first_pass or now
        labels = [evaluation.class_labels for evaluation in batch]
        output = self.pipe.consistency_function(torch.cat([evaluation.x for evaluation in batch]),
                                                torch.cat([evaluation.sigma for evaluation in batch]),
                                                None if labels[0] is None else torch.cat(labels), clip_denoised=False)
        self._stats["forward_passes"] += 1
        self._stats["network_evaluations"] += rows
        return list(output.split([evaluation.rows for evaluation in batch]))

    def _encode(self, sample: torch.Tensor, output_format: str) -> list:
        return [_encode_image(image, output_format) for image in self.pipe.postprocess(sample, "pil")]

    # -- the teacher -----------------------------------------------------------------------------------------------

    async def teacher_generate(self, request: dict, key: str | None = None) -> dict:
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
        except BAD_INPUT as error:
            return request_error("class_labels", str(error))
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

    async def edit(self, task: str, image, mask, options: dict, key: str | None = None) -> dict:
        """One `/v1/edit/{task}` request, unbatched: decoded PIL uploads and `EditFormOptions` as a dict."""
        started = time.perf_counter()
        if task not in EDIT_TASK_TABLE:
            return request_error("task", f"Unknown task {task!r}; choose one of {list(EDIT_TASKS)}.", status=404)
        spec = EDIT_TASK_TABLE[task]
        method, allowed = spec.method, spec.fields
        given = {key: value for key, value in options.items()
                 if key not in ("seed", "output_format") and value not in (None, False)}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            return request_error(unknown[0], f"`{unknown[0]}` does not apply to {task}; it takes {list(allowed)}.")
        for name in spec.required:
            if name not in given:
                return request_error(name, f"{task} needs the form field `{name}`.")
        if spec.mask and mask is None:
            return request_error("mask", "inpaint needs a `mask` file: white = regenerate, black = keep.")
        if not spec.mask and mask is not None:
            return request_error("mask", f"{task} takes no mask.")

        _, channels, height, width = self.pipe.sample_shape(1)
        sigma_max = float(self.pipe.scheduler.config.sigma_max)
        if task == "denoise" and given["sigma"] > sigma_max:
            return request_error("sigma", f"sigma={given['sigma']:g} is above this model's sigma_max={sigma_max:g}.")
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
        except BAD_INPUT as error:
            return request_error(_field_of(error, spec), str(error))
        fmt = options.get("output_format", "png")
        images = await asyncio.to_thread(lambda: [_encode_image(pil, fmt) for pil in pil_images])
        return {"images": images, "seed": seed, "model": self.name, "nfe": nfe,
                "latency_ms": (time.perf_counter() - started) * 1000}


def _field_of(error: Exception, spec) -> str:
    """The form field of an edit task that a pipeline error is about: the field it carries (`InputError.field`) if the
    task takes it; a schedule the task does not take by that name (denoise's `sigma` makes its `sigmas`) is the task's
    schedule field; anything else is about the image."""
    named = getattr(error, "field", None)
    if named in spec.fields or named in ("image", "mask"):
        return named
    if named in ("sigmas", "timesteps", "num_inference_steps"):
        return spec.schedule_field
    return "image"


def _schedule_of(request: dict) -> dict:
    """The schedule a generation request names (decided as the pipeline decides it, `sampling.named_schedule`)."""
    from ..sampling import named_schedule

    return named_schedule(request.get("num_inference_steps"), request.get("timesteps"), request.get("sigmas"))


def _schedule_field(request: dict) -> str:
    """The field that names a generation request's schedule (errors about the schedule name it)."""
    return next(iter(_schedule_of(request)))


def _encode_image(image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper())
    return buffer.getvalue()
