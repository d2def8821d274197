"""Editing entry points of `ConsistencyPipeline` (Song et al. 2023, Algorithm 4): one call per task.

Each method validates its own inputs (image size, mask, scale factor, schedule), builds the reference y, the
transform A and the mask Omega, and hands them to `_edit`, the one prepared call: class labels, the noise levels,
`editing.consistency_edit` with this pipeline's f(x, sigma), post-processing.
"""

import math
from dataclasses import dataclass, fields
from typing import Sequence, TypedDict

import numpy as np
import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from typing_extensions import Unpack

from .editing import (
    DEFAULT_EDIT_STEPS,
    STROKE_REFERENCE_SIGMA_MAX,
    STROKE_SIGMAS,
    ColorizationTransform,
    IdentityTransform,
    SuperResolutionTransform,
    _describe,
    consistency_edit,
    image_to_tensor,
    mask_to_tensor,
    slerp,
)


class EditOptions(TypedDict, total=False):
    """The keyword options every editing task shares (see [`ConsistencyEditingMixin`])."""

    num_inference_steps: int | None
    timesteps: list[int] | None
    sigmas: list[float] | None
    class_labels: int | list[int] | torch.Tensor | None
    generator: torch.Generator | list[torch.Generator] | None
    output_type: str
    return_dict: bool
    input_range: tuple


@dataclass
class _EditCall:
    """`EditOptions` with their defaults filled in."""

    num_inference_steps: int | None = None
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    class_labels: int | list[int] | torch.Tensor | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    output_type: str = "pil"
    return_dict: bool = True
    input_range: tuple = (0.0, 1.0)


_SCHEDULE_OPTIONS = ("num_inference_steps", "timesteps", "sigmas")


def _edit_call(task: str, options: dict, exclude: Sequence[str] = ()) -> _EditCall:
    """The options of one call, with Python's own error for a keyword the task does not take."""
    allowed = {f.name for f in fields(_EditCall)} - set(exclude)
    for name in options:
        if name not in allowed:
            raise TypeError(f"{task}() got an unexpected keyword argument {name!r}")
    return _EditCall(**options)


class ConsistencyEditingMixin:
    """
    Editing entry points of [`ConsistencyPipeline`]: `inpaint`, `colorize`, `super_resolve`, `stroke_edit`,
    `denoise`, `interpolate` and `edit` (any invertible linear transform).

    Images may be PIL images, numpy arrays (HW, HWC, BHWC) or torch tensors (HW, CHW, BCHW), or a list of them.
    PIL images and uint8 arrays are read as 0..255; float arrays and tensors in `input_range`, (0, 1) by default
    (what `output_type="np"`/`"pt"` return); pass `input_range=(-1, 1)` for tensors in the model's space.

    The multistep editing methods default to `DEFAULT_EDIT_STEPS` (10) noise levels spread over the training grid,
    as `num_inference_steps` spreads them in `__call__`; `timesteps` or `sigmas` give an explicit schedule. With
    `output_type="latent"` the result is the raw projected sample, whose kept coefficients equal the input's
    exactly; the other output types clamp to the displayable range [0, 1].

    Options every task takes as keywords ([`EditOptions`]):
        num_inference_steps (`int`, *optional*): Number of network evaluations (default 10).
        timesteps (`list[int]`, *optional*): Descending indices into the training grid, e.g. `[22, 0]`.
        sigmas (`list[float]`, *optional*): Descending noise levels.
        class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): Labels of a class-conditional model.
        generator (`torch.Generator`, *optional*): Makes the edit deterministic.
        output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
        return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.
        input_range (`tuple`, defaults to `(0, 1)`): Value range of float arrays and tensors.
    """

    # -- helpers shared by the entry points ------------------------------------------------------------------------

    def _model_image(self, image, input_range, what="image", size=None, allow_gray=False) -> torch.Tensor:
        """`image` as (B, C, H, W) on the model's device and dtype, validated against the model's channels and size."""
        _, channels, height, width = self.sample_shape(1)
        size = size or (height, width)
        tensor = image_to_tensor(image, input_range)
        if tensor.shape[1] != channels and not (allow_gray and tensor.shape[1] == 1):
            hint = " (convert it with `.convert('L')`)" if channels == 1 else " (convert it with `.convert('RGB')`)"
            if isinstance(image, np.ndarray) and image.ndim in (3, 4) and image.shape[-3] == channels:
                hint = (" (numpy images are read channels-last, HWC or BHWC; this looks like CHW: pass "
                        "`array.transpose(1, 2, 0)`, or a torch tensor, which is read as CHW)")
            raise ValueError(
                f"The {what} has {tensor.shape[1]} channel(s), but this model works on {channels}{hint}."
            )
        if tuple(tensor.shape[2:]) != tuple(size):
            raise ValueError(
                f"The {what} is {tensor.shape[2]}x{tensor.shape[3]} (height x width), but it must be "
                f"{size[0]}x{size[1]} for this model; resize it first."
            )
        device, dtype = self._device_and_dtype()
        return tensor.to(device=device, dtype=dtype)

    def _edit_sigmas(self, num_inference_steps, timesteps, sigmas, default_steps=DEFAULT_EDIT_STEPS) -> torch.Tensor:
        if num_inference_steps is None and timesteps is None and sigmas is None:
            # Spread the default levels over the whole grid (diffusers' N // k spacing would use only its top half
            # when k > N / 2), leaving out the end point sigma_min where f is the identity.
            n_train = self.scheduler.config.num_train_timesteps
            grid = np.linspace(0, n_train - 1, min(default_steps, n_train - 1) + 1)[:-1]
            timesteps = sorted({int(round(index)) for index in grid}, reverse=True)
        return self.sampling_sigmas(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)

    def _check_output_type(self, output_type):
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"Unknown output_type={output_type!r}; choose one of ('pil', 'np', 'pt', 'latent').")

    def _edit(self, y, transform, mask, call: _EditCall, sigmas=None, **edit_kwargs):
        """The prepared call every task ends in: class labels, the noise levels (the call's schedule unless `sigmas`
        is given), Algorithm 4 with this pipeline's f, post-processing."""
        self._check_output_type(call.output_type)
        if sigmas is None:
            sigmas = self._edit_sigmas(call.num_inference_steps, call.timesteps, call.sigmas)
        labels = self.prepare_class_labels(y.shape[0], call.class_labels, call.generator, y.device)

        def consistency_fn(x, sigma):
            return self.consistency_function(x, sigma, class_labels=labels, clip_denoised=False)

        config = self.scheduler.config
        sample = consistency_edit(
            consistency_fn, y, transform, mask, sigmas, generator=call.generator, sigma_min=config.sigma_min,
            s_noise=config.s_noise, **edit_kwargs,
        )
        images = self.postprocess(sample, call.output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if call.return_dict else (images,)

    # -- tasks -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def inpaint(
        self,
        image,
        mask_image,
        **options: Unpack[EditOptions],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Fills the masked region of `image` with content consistent with the rest (Algorithm 4 with A = I).

        Args:
            image: The image(s) to inpaint, at the model's size and channel count (see the class docstring).
            mask_image: White (1) = regenerate, black (0) = keep, as in diffusers' inpainting pipelines; binarized at
                0.5. One channel or one per image channel; a batch of 1 or one mask per image.
            options ([`EditOptions`]): The schedule (default 10 levels), class labels, generator and output options
                every task takes (see the class docstring).

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the inpainted images; the kept pixels equal the input's.
        """
        call = _edit_call("inpaint", options)
        y = self._model_image(image, call.input_range)
        mask = mask_to_tensor(mask_image).to(device=y.device, dtype=y.dtype)
        if tuple(mask.shape[2:]) != tuple(y.shape[2:]):
            raise ValueError(
                f"The mask is {mask.shape[2]}x{mask.shape[3]}, but the image is {y.shape[2]}x{y.shape[3]}; they must "
                "have the same height and width."
            )
        if mask.shape[1] not in (1, y.shape[1]) or mask.shape[0] not in (1, y.shape[0]):
            raise ValueError(
                f"The mask has shape {tuple(mask.shape)} (batch, channels, h, w) for images of shape "
                f"{tuple(y.shape)}; give 1 channel or {y.shape[1]}, and a batch of 1 or {y.shape[0]}."
            )
        mask = (mask >= 0.5).to(y.dtype)
        return self._edit(y, IdentityTransform(), mask, call)

    @torch.no_grad()
    def colorize(
        self,
        image,
        **options: Unpack[EditOptions],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Colorizes a grayscale image with an RGB model, keeping its luma 0.2989 R + 0.5870 G + 0.1140 B per pixel.

        Args:
            image: A grayscale (1-channel, taken as R = G = B) or color (3-channel) image at the model's size.
            options ([`EditOptions`]): The schedule, class labels, generator and output options every task takes
                (see the class docstring).

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the colorized images.
        """
        call = _edit_call("colorize", options)
        channels = self.sample_shape(1)[1]
        if channels != 3:
            raise ValueError(f"colorize needs an RGB model (3 channels); this model has {channels} channel(s).")
        y = self._model_image(image, call.input_range, allow_gray=True).expand(-1, 3, -1, -1).contiguous()
        transform = ColorizationTransform()
        return self._edit(y, transform, transform.mask_like(y), call)

    @torch.no_grad()
    def super_resolve(
        self,
        image,
        scale_factor: int,
        **options: Unpack[EditOptions],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Upsamples a low-resolution image by `scale_factor` to the model's size; every scale_factor x scale_factor
        patch of the result has the mean of the corresponding low-resolution pixel.

        Args:
            image: The low-resolution image(s), of size (height / scale_factor, width / scale_factor).
            scale_factor (`int`): Integer factor that divides the model's height and width.
            options ([`EditOptions`]): The schedule, class labels, generator and output options every task takes
                (see the class docstring).

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the upsampled images.
        """
        call = _edit_call("super_resolve", options)
        _, _, height, width = self.sample_shape(1)
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, np.integer)) or scale_factor < 1:
            raise ValueError(f"`scale_factor` must be a positive integer, got {scale_factor!r}.")
        if height % scale_factor or width % scale_factor:
            raise ValueError(
                f"scale_factor={scale_factor} does not divide the model's size {height}x{width}; choose a divisor of "
                f"both (e.g. {[d for d in range(2, min(height, width) + 1) if not height % d and not width % d]})."
            )
        low = self._model_image(image, call.input_range, what="low-resolution image",
                                size=(height // scale_factor, width // scale_factor))
        y = low.repeat_interleave(scale_factor, dim=2).repeat_interleave(scale_factor, dim=3)
        transform = SuperResolutionTransform(scale_factor)
        return self._edit(y, transform, transform.mask_like(y), call)

    def default_stroke_sigmas(self) -> list:
        """The paper's stroke-editing levels (5.38, 2.24 on LSUN, sigma_max = 80) scaled to this model's sigma_max."""
        config = self.scheduler.config
        scale = config.sigma_max / STROKE_REFERENCE_SIGMA_MAX
        return [max(sigma * scale, config.sigma_min) for sigma in STROKE_SIGMAS]

    @torch.no_grad()
    def stroke_edit(
        self,
        image,
        **options: Unpack[EditOptions],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Stroke-guided editing (SDEdit-like): noises a rough stroke painting to an intermediate level and maps it to a
        realistic image (Omega = 1, nothing kept exactly).

        Args:
            image: The stroke painting(s) at the model's size.
            options ([`EditOptions`]): As for every task (see the class docstring), except the schedule: `sigmas`
                (default `default_stroke_sigmas()`, the paper's (5.38, 2.24) scaled by sigma_max / 80) or
                `timesteps`; `num_inference_steps` is refused, since such a schedule starts at `sigma_max`, where the
                strokes are lost.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the edited images.
        """
        call = _edit_call("stroke_edit", options)
        if call.num_inference_steps is not None:
            raise ValueError(
                "stroke_edit starts from an intermediate noise level; `num_inference_steps` would start at sigma_max "
                f"and discard the strokes. Pass `sigmas` (default {self.default_stroke_sigmas()}) or `timesteps`."
            )
        y = self._model_image(image, call.input_range)
        if call.timesteps is None and call.sigmas is None:
            call.sigmas = self.default_stroke_sigmas()
        return self._edit(y, IdentityTransform(), None, call, start_from_reference=True)

    @torch.no_grad()
    def denoise(
        self,
        image,
        sigma: float,
        add_noise: bool = False,
        **options: Unpack[EditOptions],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Denoises an image that carries Gaussian noise of std `sigma` (in the [-1, 1] model space) with one
        evaluation f(image, sigma).

        Args:
            image: The noisy image(s) at the model's size.
            sigma (`float`): The noise level, within [sigma_min, sigma_max] of the scheduler.
            add_noise (`bool`, defaults to `False`): Add noise of std `sigma` (from `generator`) to a clean image
                first, e.g. to demonstrate the round trip.
            options: `class_labels`, `generator`, `output_type`, `return_dict`, `input_range` (see the class
                docstring); the schedule is the single level `sigma`.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the denoised images.
        """
        call = _edit_call("denoise", options, exclude=_SCHEDULE_OPTIONS)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
            raise ValueError(f"`sigma` must be a number, got {sigma!r}.")
        sigma_schedule = self.sampling_sigmas(sigmas=[float(sigma)])
        y = self._model_image(image, call.input_range)
        # Algorithm 4 with one level: x = y + sigma z, then f(x, sigma); zero noise evaluates f on the image itself.
        latents = None if add_noise else torch.zeros_like(y)
        return self._edit(y, IdentityTransform(), None, call, sigmas=sigma_schedule, latents=latents,
                          start_from_reference=True)

    @torch.no_grad()
    def interpolate(
        self,
        latents_a: torch.Tensor | None = None,
        latents_b: torch.Tensor | None = None,
        num_frames: int | None = None,
        alphas: Sequence[float] | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        class_labels=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Interpolates between two samples: spherical interpolation (`slerp`) of their standard normal noise, then one
        consistency step at sigma_max per frame (or the given multistep schedule).

        Args:
            latents_a, latents_b (`torch.Tensor`, *optional*): Standard normal noise of shape (C, H, W) or
                (B, C, H, W), as `latents` of `__call__`; drawn from `generator` (a first) when omitted.
            num_frames (`int`, *optional*): Number of evenly spaced frames from a (alpha 0) to b (alpha 1), >= 2.
            alphas (`list[float]`, *optional*): Explicit interpolation weights instead of `num_frames`.
            num_inference_steps (`int`, *optional*): Network evaluations per frame (default 1).
            timesteps, sigmas, class_labels, generator, output_type, return_dict: As in `__call__`; class labels
                are drawn or given per sample of the batch and shared by all its frames.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: num_frames x B images, frame by frame (all samples of frame 0 first).
        """
        self._check_output_type(output_type)
        if (num_frames is None) == (alphas is None):
            raise ValueError("Pass exactly one of `num_frames` (e.g. 8) or `alphas` (e.g. [0, 0.5, 1]).")
        if num_frames is not None:
            if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
                raise ValueError(f"`num_frames` must be an integer >= 2, got {num_frames!r}.")
            alphas = np.linspace(0.0, 1.0, int(num_frames)).tolist()
        alphas = [float(a) for a in np.asarray(alphas, dtype=np.float64).reshape(-1)]
        if not alphas or not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"`alphas` must be a non-empty list of finite numbers, got {alphas}.")
        device, dtype = self._device_and_dtype()
        shape = self.sample_shape(1)[1:]
        noise = []
        for name, latents in (("latents_a", latents_a), ("latents_b", latents_b)):
            if latents is None:
                latents = randn_tensor((1, *shape), generator=generator, device=device, dtype=dtype)
            valid = isinstance(latents, torch.Tensor) and latents.ndim in (3, 4) and tuple(latents.shape[-3:]) == shape
            if not valid:
                raise ValueError(f"`{name}` must be a tensor of shape {shape} or (batch, *{shape}), got "
                                 f"{_describe(latents)}.")
            noise.append(latents.reshape(-1, *shape).to(device=device, dtype=dtype))
        if noise[0].shape != noise[1].shape:
            raise ValueError(f"`latents_a` and `latents_b` differ in shape: {tuple(noise[0].shape)} and "
                             f"{tuple(noise[1].shape)}.")
        frames = torch.cat([slerp(noise[0], noise[1], alpha) for alpha in alphas])
        batch_size = noise[0].shape[0]
        labels = self.prepare_class_labels(batch_size, class_labels, generator, device)
        labels = labels.repeat(len(alphas)) if labels is not None else None
        sigma_schedule = self._edit_sigmas(num_inference_steps, timesteps, sigmas, default_steps=1)
        images = self.postprocess(self.sample(frames, sigma_schedule, labels, generator), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def edit(
        self,
        image,
        transform,
        mask=None,
        **options: Unpack[EditOptions],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Algorithm 4 with any invertible linear transform: keeps the coefficients of `transform.forward(image)` where
        `mask` is 0 and generates those where it is 1.

        Args:
            image: The reference image(s) at the model's size.
            transform: An object with `forward(x)` and `inverse(x)` on (B, C, H, W) tensors, e.g.
                [`LinearTransform`], [`ColorizationTransform`] or [`SuperResolutionTransform`].
            mask (`torch.Tensor` or `np.ndarray`, *optional*): Omega in the transform's output space, broadcastable to
                `transform.forward(image)`, values in [0, 1]. Defaults to `transform.mask_like(image)` for the
                built-in transforms that have it.
            options ([`EditOptions`]): The schedule, class labels, generator and output options every task takes
                (see the class docstring).

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the edited images.
        """
        call = _edit_call("edit", options)
        y = self._model_image(image, call.input_range)
        if mask is None:
            if not callable(getattr(transform, "mask_like", None)):
                raise ValueError("Pass `mask` (Omega in the transform's output space: 1 = generate, 0 = keep).")
            mask = transform.mask_like(y)
        return self._edit(y, transform, mask, call)
