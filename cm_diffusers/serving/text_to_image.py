"""The deployment of a latent text-to-image model (an LCM folder, or a teacher with LCM-LoRA weights): it loads the
model with `latent.text_to_image.load_text_to_image` and samples with `latent.text_to_image.generate`, what
`cm-diffusers generate --prompt` runs, so a seeded request gives the images `generate` gives.

A request runs on the model thread, one at a time, in parts of at most `max_batch_size` images: diffusers' pipeline
keeps its scheduler's state during a call, so two requests cannot share forward passes as the pixel model's requests
do (`model.py`). Admission counts its cost (images x steps) like any other. A cancelled request (timed out, client
gone) stops before its next network evaluation, and one still waiting for the model thread never starts.
"""

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..latent.text_to_image import DEFAULT_STEPS
from .model import DTYPES, Cancelled, ConsistencyModel, _encode_image, _Request, request_error
from .schemas import ServerSettings


def model_class(settings: ServerSettings) -> type:
    """The deployment class of the served model: `TextToImageModel` for a text-to-image model, else
    `ConsistencyModel`."""
    return TextToImageModel if settings.text_to_image else ConsistencyModel


class TextToImageModel:
    """One replica: the diffusers pipeline and one model thread, with the request methods of `ConsistencyModel`."""

    def __init__(self, settings: dict):
        from ..latent.text_to_image import generate, load_text_to_image

        self.settings = ServerSettings(**settings)
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        self.pipe = load_text_to_image(self.settings.model, self.settings.lora, DTYPES[self.settings.dtype],
                                       self.settings.device)
        self.name = self.settings.model_name or self.settings.model
        if self.settings.lora:  # the images are the LoRA's, not the teacher's
            self.name += f" + {self.settings.lora}"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cm-model")
        self._running = None  # the request on the model thread
        self._stats = {"forward_passes": 0, "network_evaluations": 0, "cancelled_requests": 0}
        self.pipe.unet.register_forward_pre_hook(self._before_evaluation, with_kwargs=True)
        self._info = self._model_info()
        generate(self.pipe, ["warm-up"], 1, seed=0)  # the first call pays one-off costs that a user should not

    def _model_info(self) -> dict:
        from ..latent.text_to_image import MAX_PROMPT_CHARACTERS, default_guidance_scale

        size = self.pipe.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        factor = self.pipe.vae_scale_factor
        return {
            "name": self.name, "resolution": [height * factor, width * factor],
            "channels": self.pipe.vae.config.out_channels, "num_classes": None, "takes_prompt": True,
            "max_prompt_characters": MAX_PROMPT_CHARACTERS, "guidance_scale": default_guidance_scale(self.pipe),
            "sigma_min": None, "sigma_max": None,
            "num_train_timesteps": int(self.pipe.scheduler.config.num_train_timesteps),
            "recommended_schedules": [{"num_inference_steps": DEFAULT_STEPS}], "edit_tasks": [],
            "max_batch_size": self.settings.max_batch_size, "limits": self.settings.limits.model_dump(),
        }

    def info(self) -> dict:
        return self._info

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        """Counters of the model: forward passes, image rows evaluated, requests cancelled."""
        return dict(self._stats)

    # -- generation ------------------------------------------------------------------------------------------------

    async def generate(self, request: dict, key: str | None = None) -> dict:
        """One `/v1/generate` request (a `TextToImageRequest` as a dict) -> encoded images. Cancelling the call drops
        the request's remaining network evaluations."""
        from ..latent.text_to_image import check_prompts

        started = time.perf_counter()
        prompt = request.get("prompt")
        if prompt is None:
            return request_error("prompt", "prompt: this is a text-to-image model; send a `prompt`.")
        try:
            prompts = check_prompts([prompt] if isinstance(prompt, str) else prompt, request["num_images"])
        except (ValueError, TypeError) as error:
            return request_error("prompt", f"prompt: {error}")
        steps = request.get("num_inference_steps") or DEFAULT_STEPS
        most = self.pipe.scheduler.config.original_inference_steps
        if steps > most:  # LCMScheduler's skipping-step grid has this many points
            return request_error("num_inference_steps", f"num_inference_steps: at most {most} for this model (its "
                                                        f"LCMScheduler's original_inference_steps), got {steps}.")
        seed = request["seed"] if request.get("seed") is not None else secrets.randbelow(2**32)
        state = _Request(key, started)
        try:
            images = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._sample, state, prompts, steps, request.get("guidance_scale"), seed)
        except BaseException:
            state.cancelled = True  # its thread stops before the next network evaluation
            self._stats["cancelled_requests"] += 1
            raise
        output_format = request.get("output_format", "png")
        encoded = await asyncio.to_thread(lambda: [_encode_image(image, output_format) for image in images])
        return {
            "images": encoded, "seed": seed, "model": self.name,
            "nfe": sum(batch["images"] for batch in state.batches) // len(prompts),
            "latency_ms": (time.perf_counter() - started) * 1000,
            "queue_wait_s": (state.first_pass or time.perf_counter()) - started, "batches": state.batches,
        }

    def _sample(self, state: _Request, prompts: list, steps: int, guidance_scale, seed: int) -> list:
        """Runs on the model thread: `latent.text_to_image.generate`, as PIL images."""
        from ..latent.text_to_image import generate

        if state.cancelled:
            raise Cancelled()
        self._running = state
        try:
            images = generate(self.pipe, prompts, steps, guidance_scale, seed, self.settings.max_batch_size)
        finally:
            self._running = None
        return self.pipe.numpy_to_pil(images)

    def _before_evaluation(self, module, args, kwargs):
        """A forward pre-hook of the UNet: stops a cancelled request before its next evaluation, and counts passes."""
        request = self._running
        if request is None:
            return
        if request.cancelled:
            raise Cancelled()
        sample = args[0] if args else kwargs["sample"]
        rows = sample.shape[0]  # twice the images when the pipeline applies classifier-free guidance
        request.first_pass = request.first_pass or time.perf_counter()
        request.batches.append({"images": rows, "requests": 1})
        self._stats["forward_passes"] += 1
        self._stats["network_evaluations"] += rows

    # -- what needs a pixel consistency model ------------------------------------------------------------------------

    async def teacher_generate(self, request: dict, key: str | None = None) -> dict:
        return request_error(None, f"{self.name} is a text-to-image model: there is no teacher route.", "not_found",
                             404)

    async def edit(self, task: str, image, mask, options: dict, key: str | None = None) -> dict:
        return request_error("task", f"Editing needs a pixel consistency model; {self.name} is a text-to-image "
                                     "model.", "not_found", 404)
