"""ConsistencyPipeline: one-step and multistep image generation with a consistency model.

Loads OpenAI's converted Hub repos and diffusers' `ConsistencyModelPipeline` folders unchanged, and saves folders
that plain `diffusers.DiffusionPipeline.from_pretrained` also loads (as diffusers' own `ConsistencyModelPipeline`):
diffusers >= 0.40 refuses third-party class names in model_index.json, so `save_pretrained` writes the diffusers
names of the (config-identical) scheduler and pipeline.
"""

import json
import os
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .editing import ConsistencyEditingMixin
from .parameterization import consistency_function
from .scheduling_consistency import ConsistencyScheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_SCHEDULER_NAMES = {"ConsistencyScheduler", "CMStochasticIterativeScheduler"}
_DIFFUSERS_PIPELINE_NAME = "ConsistencyModelPipeline"
_DIFFUSERS_SCHEDULER_NAME = "CMStochasticIterativeScheduler"


class ConsistencyPipeline(ConsistencyEditingMixin, DiffusionPipeline):
    """
    Pipeline for unconditional or class-conditional image generation with a consistency model, in one network
    evaluation or a few, plus zero-shot editing (`inpaint`, `colorize`, `super_resolve`, `stroke_edit`, `denoise`,
    `interpolate`, `edit`).

    Args:
        unet ([`UNet2DModel`]): The network F of f(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)); any number of
            channels, square or rectangular `sample_size`, optionally class-conditional (`num_class_embeds`).
        scheduler ([`ConsistencyScheduler`]): The sampler. diffusers' `CMStochasticIterativeScheduler` is accepted
            and converted (their configs are identical).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if not isinstance(scheduler, ConsistencyScheduler):
            if type(scheduler).__name__ not in _SCHEDULER_NAMES:
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
        Accepts every keyword of [`DiffusionPipeline.from_pretrained`].
        """
        from .shipped_models import resolve_pretrained

        path = resolve_pretrained(pretrained_model_name_or_path)
        config_kwargs = {k: kwargs[k] for k in ("cache_dir", "token", "revision", "local_files_only") if k in kwargs}
        index = cls.load_config(path, **config_kwargs)
        _check_is_consistency_model(index, str(pretrained_model_name_or_path))
        return super().from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """
        Saves the pipeline (safetensors weights) so that both `ConsistencyPipeline.from_pretrained` and plain
        `diffusers.DiffusionPipeline.from_pretrained` load it; the latter gives diffusers' `ConsistencyModelPipeline`
        with `CMStochasticIterativeScheduler`, whose config keys are identical to ours.
        """
        kwargs.setdefault("safe_serialization", True)
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, **kwargs)
        _rewrite_json(os.path.join(save_directory, "model_index.json"), {
            "_class_name": _DIFFUSERS_PIPELINE_NAME,
            "scheduler": ["diffusers", _DIFFUSERS_SCHEDULER_NAME],
            "unet": ["diffusers", type(self.unet).__name__],
        })
        _rewrite_json(os.path.join(save_directory, "scheduler", "scheduler_config.json"),
                      {"_class_name": _DIFFUSERS_SCHEDULER_NAME})
        if push_to_hub:
            from .hub import push_to_hub as push

            return push(save_directory, kwargs.get("repo_id") or os.path.basename(os.path.abspath(save_directory)),
                        token=kwargs.get("token"), private=kwargs.get("private", False))

    # ------------------------------------------------------------------------------------------------------------
    # Building blocks shared by generation and editing

    def sample_shape(self, batch_size: int) -> tuple:
        """(batch, channels, height, width) of the model's samples; `sample_size` may be an int or (h, w)."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def sampling_sigmas(self, num_inference_steps=None, timesteps=None, sigmas=None) -> torch.Tensor:
        """The descending noise levels a schedule evaluates the model at (one per NFE), validated by the scheduler."""
        self.scheduler.set_timesteps(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        return self.scheduler.sigmas[:-1].clone()

    def consistency_function(self, sample: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """f(x, sigma) with the scheduler's scalings, clamped to [-1, 1] when `clip_denoised`; sigma: float or (B,)."""
        config = self.scheduler.config
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
        sigma = sigma.expand(sample.shape[0]) if sigma.ndim == 0 else sigma

        unet_dtype = self._device_and_dtype()[1]

        def network(scaled, t, **cond):
            return self.unet(scaled.to(unet_dtype), t, return_dict=False, **cond)[0].to(sample.dtype)

        cond = {"class_labels": class_labels} if class_labels is not None else {}
        denoised = consistency_function(network, sample, sigma, config.sigma_min, config.sigma_data, **cond)
        return denoised.clamp(-1, 1) if config.clip_denoised else denoised

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

    def check_inputs(self, batch_size, latents, output_type, callback_on_step_end_tensor_inputs):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type={output_type!r}; choose one of {OUTPUT_TYPES}.")
        expected = self.sample_shape(batch_size)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"`latents` have shape {tuple(latents.shape)}, but this model needs {expected} "
                "(batch_size, unet.config.in_channels, *unet.config.sample_size)."
            )
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {sorted(unknown)} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )

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

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images.
        """
        # 1. Check inputs
        self.check_inputs(batch_size, latents, output_type, callback_on_step_end_tensor_inputs)
        if timesteps is not None or sigmas is not None:
            num_inference_steps = None
        device, dtype = self._device_and_dtype()

        # 2. Noise levels (the scheduler validates them and keeps sigmas on the host)
        self.scheduler.set_timesteps(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                                     device=device)
        self.scheduler.set_begin_index(0)  # no timestep lookup, hence no host-device sync, in the loop
        schedule = self.scheduler.timesteps

        # 3. Initial noise x = sigma_0 * z and class labels
        if latents is None:
            latents = randn_tensor(self.sample_shape(batch_size), generator=generator, device=device, dtype=dtype)
        sample = latents.to(device=device, dtype=dtype) * self.scheduler.sigmas[0].item()
        class_labels = self.prepare_class_labels(batch_size, class_labels, generator, device)

        # 4. Consistency steps: denoise, then re-noise to the next level
        for i, t in enumerate(self.progress_bar(schedule)):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_output = self.unet(model_input, t, class_labels=class_labels, return_dict=False)[0]
            sample, denoised = self.scheduler.step(model_output, t, sample, generator=generator, return_dict=False)
            if callback_on_step_end is not None:
                tensors = {"latents": sample, "denoised": denoised}
                callback_outputs = callback_on_step_end(
                    self, i, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                )
                sample = (callback_outputs or {}).get("latents", sample)

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


def _rewrite_json(path: str, updates: dict):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(updates)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_is_consistency_model(index: dict, name: str):
    """Refuse pipelines that are not consistency models, saying what they are and what to use instead."""
    scheduler = (index.get("scheduler") or [None, None])[1]
    unet = (index.get("unet") or [None, None])[1]
    if scheduler in _SCHEDULER_NAMES and unet is not None:
        return
    kind = index.get("_class_name", "an unknown pipeline")
    if scheduler is not None and unet is not None:
        hint = (
            f"It is a diffusion model ({kind} with {scheduler}): sample it with diffusers.{kind}, or distill it "
            "into a consistency model with `accelerate launch training/train_consistency.py --mode cd "
            f"--teacher_model_name_or_path {name}`."
        )
    else:
        hint = f"It is {kind} with components {sorted(k for k in index if not k.startswith('_'))}."
    raise ValueError(f"{name} is not a consistency-model pipeline (UNet2DModel + ConsistencyScheduler). {hint}")
