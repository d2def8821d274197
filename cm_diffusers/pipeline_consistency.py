"""ConsistencyPipeline: one-step and multistep image generation with a consistency model.

Loads OpenAI's converted Hub repos and diffusers' `ConsistencyModelPipeline` folders unchanged, and saves folders
that plain `diffusers.DiffusionPipeline.from_pretrained` also loads (as diffusers' own `ConsistencyModelPipeline`):
diffusers >= 0.40 refuses third-party class names in model_index.json, so `save_pretrained` writes the diffusers
names of the (config-identical) scheduler and pipeline.

Continuous-time models (sCT / sCD in TrigFlow, scheduler `TrigFlowSCMScheduler`) go through the same loop: their
f(x_t, t) is evaluated in sigma space (x_t = cos(t) x_sigma, sigma = sigma_d tan t), where re-noising x0 to sigma is
exactly TrigFlow's cos(t) x0 + sin(t) sigma_d z; their folders name a self-contained pipeline file
(`trigflow_pipeline.py`) that plain diffusers runs with `trust_remote_code=True`.
"""

import math
import os
import warnings
from typing import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import randn_tensor

from .model_index import (
    DIFFUSERS_PIPELINE_NAME,
    DIFFUSERS_SCHEDULER_NAME,
    SCHEDULER_NAMES,
    TRIGFLOW_SCHEDULER_NAME,
    check_is_consistency_model,
    rewrite_json,
    write_trigflow_pipeline_files,
)
from .networks import unet_forward
from .parameterization import (
    clamp_denoised,
    consistency_function,
    sigma_to_t,
    trigflow_function,
    trigflow_sigma,
    trigflow_t,
)
from .pipeline_editing import ConsistencyEditingMixin
from .sampling import consistency_sample, consistency_schedule, named_schedule
from .scheduling_consistency import ConsistencyScheduler
from .trigflow_pipeline import TrigFlowSCMScheduler
from .validation import InputError, validate_sigmas

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class ConsistencyPipeline(ConsistencyEditingMixin, DiffusionPipeline):
    """
    Pipeline for unconditional or class-conditional image generation with a consistency model, in one network
    evaluation or a few, plus zero-shot editing (`inpaint`, `colorize`, `super_resolve`, `stroke_edit`, `denoise`,
    `interpolate`, `edit`).

    Args:
        unet ([`UNet2DModel`]): The network F of f(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)); any number of
            channels, square or rectangular `sample_size`, optionally class-conditional (`num_class_embeds`).
        scheduler ([`ConsistencyScheduler`]): The sampler. diffusers' `CMStochasticIterativeScheduler` is accepted
            and converted (their configs are identical). A [`TrigFlowSCMScheduler`] makes it a continuous-time
            (TrigFlow) model: f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t)), `timesteps` are
            TrigFlow times t (descending), `sigmas` EDM levels sigma_d tan(t).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if not isinstance(scheduler, (ConsistencyScheduler, TrigFlowSCMScheduler)):
            if type(scheduler).__name__ not in SCHEDULER_NAMES:
                raise ValueError(
                    f"ConsistencyPipeline needs a ConsistencyScheduler (or diffusers' CMStochasticIterativeScheduler),"
                    f" got {type(scheduler).__name__}; build one with ConsistencyScheduler.from_config(...)."
                )
            scheduler = ConsistencyScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """
        Loads a consistency-model pipeline from a folder, a Hub repo id (or its local cache with
        HF_HUB_OFFLINE=1), or the short name of a model shipped with this package (e.g. `"fashion-mnist-cd"`).
        Accepts every keyword of [`DiffusionPipeline.from_pretrained`] (`variant`, `torch_dtype`, `use_safetensors`,
        ...). Weights load as diffusers loads them: safetensors first, and pickled `.bin` weights (what
        `save_pretrained(..., safe_serialization=False)` writes) only through `torch.load(weights_only=True)`, which
        rebuilds tensors and never runs code; a pickle that holds anything else is refused naming the file.
        """
        from .shipped_models import resolve_pretrained

        path = resolve_pretrained(pretrained_model_name_or_path)
        config_kwargs = {k: kwargs[k] for k in ("cache_dir", "token", "revision", "local_files_only") if k in kwargs}
        index = cls.load_config(path, **config_kwargs)
        check_is_consistency_model(index, str(pretrained_model_name_or_path))
        if (index.get("scheduler") or [None, None])[1] == TRIGFLOW_SCHEDULER_NAME:
            # its model_index names the folder's own code (for plain diffusers); ours is the same file, imported
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", **kwargs)
            scheduler = TrigFlowSCMScheduler.from_pretrained(path, subfolder="scheduler", **config_kwargs)
            return cls(unet=unet, scheduler=scheduler)
        try:
            return super().from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:
            refused = _unsafe_pickle(path)
            if refused is None:
                raise
            raise ValueError(
                f"{refused} is a pickle that holds more than tensors (objects whose loading would run code), so it "
                "was refused by torch.load(weights_only=True), as diffusers loads weights; nothing in it was run. "
                "Load a copy saved with safetensors (`save_pretrained(folder)`), or re-save weights you trust."
            ) from error

    def save_pretrained(self, save_directory, **kwargs):
        """
        Saves the pipeline (safetensors weights) so that both `ConsistencyPipeline.from_pretrained` and plain
        `diffusers.DiffusionPipeline.from_pretrained` load it; the latter gives diffusers' `ConsistencyModelPipeline`
        with `CMStochasticIterativeScheduler`, whose config keys are identical to ours.
        """
        kwargs.setdefault("safe_serialization", True)
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, **kwargs)
        if self.is_trigflow:  # plain diffusers samples it through the self-contained pipeline file it names
            write_trigflow_pipeline_files(save_directory, type(self.unet).__name__)
        else:
            self._name_diffusers_classes(save_directory)
        if push_to_hub:
            from .hub import push_to_hub as push

            return push(save_directory, kwargs.get("repo_id") or os.path.basename(os.path.abspath(save_directory)),
                        token=kwargs.get("token"), private=kwargs.get("private", False))

    def _name_diffusers_classes(self, save_directory):
        rewrite_json(os.path.join(save_directory, "model_index.json"), {
            "_class_name": DIFFUSERS_PIPELINE_NAME,
            "scheduler": ["diffusers", DIFFUSERS_SCHEDULER_NAME],
            "unet": ["diffusers", type(self.unet).__name__],
        })
        rewrite_json(os.path.join(save_directory, "scheduler", "scheduler_config.json"),
                      {"_class_name": DIFFUSERS_SCHEDULER_NAME})

    @property
    def is_trigflow(self) -> bool:
        """Whether the model is a continuous-time (TrigFlow) consistency model (sCT / sCD)."""
        return isinstance(self.scheduler, TrigFlowSCMScheduler)

    def boundary_sigma(self) -> float:
        """The level where f is the identity: epsilon = sigma_min, or 0 for TrigFlow (f(x, 0) = x); re-noising x0
        to sigma adds noise of std sqrt(sigma^2 - boundary^2)."""
        return 0.0 if self.is_trigflow else self.scheduler.config.sigma_min

    # ------------------------------------------------------------------------------------------------------------
    # Building blocks shared by generation and editing

    def sample_shape(self, batch_size: int) -> tuple:
        """(batch, channels, height, width) of the model's samples; `sample_size` may be an int or (h, w)."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def sampling_sigmas(self, num_inference_steps=None, timesteps=None, sigmas=None) -> torch.Tensor:
        """The descending noise levels a schedule evaluates the model at (one per NFE), validated; a pure function of
        the request and the scheduler config (the shared scheduler is not touched, so concurrent calls are safe)."""
        if self.is_trigflow:
            return torch.from_numpy(self._trigflow_schedule(num_inference_steps, timesteps, sigmas).astype(np.float32))
        schedule = consistency_schedule(self.scheduler.config, num_inference_steps, timesteps, sigmas)
        return torch.from_numpy(schedule.astype(np.float32))

    def _trigflow_schedule(self, num_inference_steps=None, timesteps=None, sigmas=None) -> np.ndarray:
        """A TrigFlow model's levels: `sigmas` as given, TrigFlow `timesteps` (or the scheduler's default times for
        `num_inference_steps`) mapped to sigma = sigma_d tan(t); validated as every schedule is."""
        config = self.scheduler.config
        given = [name for name, value in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                          ("sigmas", sigmas)) if value is not None]  # fmt: skip
        if len(given) != 1:
            raise InputError(f"Pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`, got "
                             f"{given or 'none'}.", given[1] if len(given) > 1 else "num_inference_steps")  # fmt: skip
        if sigmas is None:
            try:
                times = self.scheduler.trigflow_times(num_inference_steps, timesteps)
            except ValueError as error:
                raise InputError(str(error), given[0]) from None
            sigmas = trigflow_sigma(np.asarray(times, dtype=np.float64), config.sigma_data).tolist()
        return np.clip(validate_sigmas(sigmas, config.sigma_min, config.sigma_max, field=given[0]), config.sigma_min,
                       config.sigma_max)  # fmt: skip

    def consistency_function(self, sample: torch.Tensor, sigma, class_labels=None, clip_denoised=None) -> torch.Tensor:
        """
        f(x, sigma) with the scheduler's scalings; sigma: float or (B,). `clip_denoised` clamps the output to
        [-1, 1] (default: the scheduler config's `clip_denoised`; `False` gives the raw f, e.g. for projections).
        """
        config = self.scheduler.config
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
        sigma = sigma.expand(sample.shape[0]) if sigma.ndim == 0 else sigma

        network = unet_forward(self.unet, dtype=self._device_and_dtype()[1])
        if self.is_trigflow:  # f(x_t, t) at x_t = cos(t) x_sigma, t = arctan(sigma / sigma_d)
            t = trigflow_t(sigma, config.sigma_data)
            x_t = torch.cos(t).reshape(-1, *([1] * (sample.ndim - 1))).to(sample.dtype) * sample
            denoised = trigflow_function(network, x_t, t, config.sigma_data, config.time_input,
                                         class_labels=class_labels)  # fmt: skip
        else:
            denoised = consistency_function(network, sample, sigma, config.sigma_min, config.sigma_data,
                                            class_labels=class_labels)
        return clamp_denoised(denoised, config.clip_denoised if clip_denoised is None else clip_denoised)

    def denoise_raw(self, sample: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """Deprecated: `consistency_function(sample, sigma, class_labels, clip_denoised=False)`."""
        warnings.warn("ConsistencyPipeline.denoise_raw is deprecated (its name suggested the `denoise` editing task); "
                      "use consistency_function(sample, sigma, class_labels, clip_denoised=False).", FutureWarning,
                      stacklevel=2)
        return self.consistency_function(sample, sigma, class_labels, clip_denoised=False)

    def prepare_latents(self, batch_size: int, generator=None, latents=None) -> torch.Tensor:
        """Standard normal noise of the model's sample shape, drawn from `generator` (or the given `latents`)."""
        device, dtype = self._device_and_dtype()
        if latents is None:
            return randn_tensor(self.sample_shape(batch_size), generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype)

    @torch.no_grad()
    def sample(self, latents, sigmas, class_labels=None, generator=None, randn=None, callback=None) -> torch.Tensor:
        """
        Algorithm 1 on a batch: samples in the model's space [-1, 1] from standard normal `latents` over the
        descending `sigmas` (from [`~ConsistencyPipeline.sampling_sigmas`]). The noise between steps comes from
        `randn(shape)` when given (see [`cm_diffusers.sampling.grouped_randn`]), else from `generator`.
        `callback(i, sigma, x, denoised)` runs after each step, as in [`cm_diffusers.sampling.consistency_sample`].
        """
        config = self.scheduler.config
        if randn is None:
            def randn(shape):
                return randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)

        def f(x, sigma):
            return self.consistency_function(x, sigma, class_labels, clip_denoised=False)

        if self.is_trigflow:  # TrigFlow starts at x_t = sigma_d z, i.e. x_sigma = sqrt(sigma_d^2 + sigma^2) z
            sigma_0 = float(sigmas[0])
            latents = latents * (math.sqrt(config.sigma_data**2 + sigma_0**2) / sigma_0)
        return consistency_sample(f, latents, sigmas, self.boundary_sigma(), config.s_noise, config.clip_denoised,
                                  randn=randn, callback=callback)

    def prepare_class_labels(self, batch_size: int, class_labels=None, generator=None, device=None):
        """Class labels as a (B,) long tensor for a class-conditional UNet; random ones come from `generator`."""
        num_classes = self.unet.config.num_class_embeds
        device = device or self._device_and_dtype()[0]
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("`class_labels` were given, but this UNet is unconditional (num_class_embeds=None).")
            return None
        if class_labels is None:
            gen = generator[0] if isinstance(generator, list) else generator
            gen_device = gen.device if gen is not None else "cpu"
            return torch.randint(0, num_classes, (batch_size,), generator=gen, device=gen_device).to(device)
        if isinstance(class_labels, int):
            class_labels = [class_labels] * batch_size
        labels = torch.as_tensor(class_labels).flatten()
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"`class_labels` must be integers, got dtype {labels.dtype}.")
        if labels.numel() != batch_size:
            raise ValueError(f"Got {labels.numel()} class labels for batch_size={batch_size}; pass one per image.")
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(f"`class_labels` must lie in [0, {num_classes - 1}], got {labels.tolist()}.")
        return labels.to(device=device, dtype=torch.long)

    def postprocess(self, sample: torch.Tensor, output_type: str = "pil"):
        """Model-space samples in [-1, 1] -> `latent` (unchanged), `pt` (BCHW in [0, 1]), `np` (BHWC) or `pil`."""
        if output_type == "latent":
            return sample
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return image if output_type == "np" else self.numpy_to_pil(image)

    def _device_and_dtype(self):
        """Execution device and dtype without diffusers' per-call scan of every submodule for offload hooks (~ms per
        call, 17% of a one-step sample of a small UNet at batch 1): weights that live on an accelerator, or a machine
        without one, leave no doubt; anything else (CPU weights that offloading may move) takes the full lookup."""
        param = next(self.unet.parameters(), None)
        if param is not None and param.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            if param.device.type != "cpu" or not _accelerator_available():
                return param.device, param.dtype
        return self._execution_device, self.unet.dtype

    def check_inputs(self, batch_size, latents, generator, output_type, callback_on_step_end_tensor_inputs,
                     callback_steps=1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if isinstance(generator, list) and len(generator) not in (1, batch_size):
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
                f"size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type={output_type!r}; choose one of {OUTPUT_TYPES}.")
        expected = self.sample_shape(batch_size)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` have shape {tuple(getattr(latents, 'shape', ()))}, but this model needs {expected} "
                    "(batch_size, unet.config.in_channels, *unet.config.sample_size)."
                )
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` contain NaN or infinite values; pass standard normal noise.")
        if isinstance(callback_steps, bool) or not isinstance(callback_steps, (int, np.integer)) or callback_steps < 1:
            raise ValueError(
                f"`callback_steps` has to be a positive integer but is {callback_steps} of type "
                f"{type(callback_steps)}."
            )
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {sorted(unknown)} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )

    @property
    def num_timesteps(self) -> int:
        """The number of network evaluations of the last call (diffusers' name; `callback_on_step_end` uses it)."""
        return self._num_timesteps

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: torch.Tensor | list[int] | int | None = None,
        num_inference_steps: int | None = 1,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        callback: Callable | None = None,
        callback_steps: int = 1,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images (Algorithm 1 of Song et al. 2023).

        Args:
            batch_size (`int`, defaults to 1): Number of images.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): Labels for a class-conditional UNet
                (an int applies to the whole batch). When omitted, labels are drawn from `generator`.
            num_inference_steps (`int`, defaults to 1): Number of network evaluations. Ignored when `timesteps` or
                `sigmas` is given.
            timesteps (`list[int]`, *optional*): Descending indices into the training grid, e.g. `[22, 0]`.
            sigmas (`list[float]`, *optional*): Descending noise levels, e.g. for iCT/ECT models.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Makes generation deterministic.
            latents (`torch.Tensor`, *optional*): Standard normal noise of shape (batch, channels, height, width);
                it is scaled by the first noise level of the schedule.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or `"latent"`
                (the raw sample in [-1, 1]).
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): Called as `callback_on_step_end(pipe, i, t,
                callback_kwargs)` after each step; `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs` (`"latents"`, `"denoised"`); a returned dict may replace
                `latents`.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`).
            callback (`Callable`, *optional*): Deprecated (use `callback_on_step_end`), as in diffusers'
                `ConsistencyModelPipeline`: called as `callback(i, t, latents)` every `callback_steps` steps.
            callback_steps (`int`, defaults to 1): How often `callback` is called.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images.
        """
        # 1. Check inputs
        self.check_inputs(batch_size, latents, generator, output_type, callback_on_step_end_tensor_inputs,
                          callback_steps)
        if callback is not None:
            deprecate("callback", "1.0.0", "Passing `callback` to `__call__` is deprecated, consider using "
                      "`callback_on_step_end`.")
        batch_size = int(batch_size)
        device = self._device_and_dtype()[0]

        # 2. Noise levels: a validated schedule as a value; the shared scheduler is not mutated
        sigma_schedule = self.sampling_sigmas(**named_schedule(num_inference_steps, timesteps, sigmas))
        to_time = (lambda s: trigflow_t(s, self.scheduler.config.sigma_data)) if self.is_trigflow else sigma_to_t
        schedule_timesteps = torch.from_numpy(to_time(sigma_schedule.double().numpy())).to(device, torch.float32)
        self._num_timesteps = len(sigma_schedule)

        # 3. Initial noise z (scaled by sigma_0 in the loop) and class labels
        latents = self.prepare_latents(batch_size, generator, latents)
        class_labels = self.prepare_class_labels(batch_size, class_labels, generator, device)

        # 4. Consistency steps: denoise, then re-noise to the next level
        with self.progress_bar(total=len(sigma_schedule)) as progress_bar:

            def on_step_end(i, sigma, sample, denoised):
                t = schedule_timesteps[i]
                if callback_on_step_end is not None:
                    tensors = {"latents": sample, "denoised": denoised}
                    outputs = callback_on_step_end(
                        self, i, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    )
                    sample = (outputs or {}).get("latents", sample)
                if callback is not None and i % callback_steps == 0:
                    callback(i, t, sample)
                progress_bar.update()
                return sample

            sample = self.sample(latents, sigma_schedule, class_labels, generator, callback=on_step_end)

        # 5. Post-process
        image = self.postprocess(sample, output_type)
        if getattr(self, "_all_hooks", None) or hasattr(self.unet, "_reset_stateful_cache"):
            self.maybe_free_model_hooks()  # inspects every component's signature: only when there is work to do
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def _accelerator_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or (mps is not None and mps.is_available())
            or (xpu is not None and xpu.is_available()))


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _unsafe_pickle(path):
    """The first pickled weights file under a local pipeline folder that `torch.load(weights_only=True)` refuses
    (None when there is none): what a failed load is explained by. The weights-only unpickler never runs code."""
    import pickle

    if not os.path.isdir(str(path)):
        return None
    for folder, _, names in sorted(os.walk(str(path))):
        for name in sorted(names):
            if not name.endswith(_PICKLE_SUFFIXES):
                continue
            file = os.path.join(folder, name)
            try:
                torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return file
            except Exception:  # noqa: BLE001 - unreadable for another reason (truncated, not a pickle): not this error
                continue
    return None
