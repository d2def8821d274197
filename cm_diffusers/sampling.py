"""Consistency sampling: one validated schedule function and one loop that runs Algorithm 1 (generation) and, with a
projection after each step, Algorithm 4 (zero-shot editing) of Song et al. (2023).

`consistency_schedule` is a pure function of the scheduler config and the request, so that concurrent callers
(threads, a server's batches) never share mutable scheduler state. The teachers' samplers (PF-ODE, DDIM) live in
`teacher_sampling`, so the scheduler and the pipeline import no teacher code.
"""

import importlib
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .parameterization import SIGMA_MIN, clamp_denoised, renoise, timesteps_to_sigmas
from .validation import InputError, validate_sigmas, validate_timesteps


def named_schedule(num_inference_steps=None, timesteps=None, sigmas=None) -> dict:
    """
    The schedule a sampling request names, as keywords of [`consistency_schedule`]: explicit `timesteps` or `sigmas`
    win over `num_inference_steps` (which pipelines and the API default to 1); both explicit ones are passed on, so
    that a request naming two is refused naming the second. The one place this decision is made (pipeline, server).
    """
    explicit = {name: value for name, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None}
    return explicit or {"num_inference_steps": num_inference_steps}


def consistency_schedule(
    config: Mapping, num_inference_steps: int | None = None, timesteps=None, sigmas=None
) -> np.ndarray:
    """
    The descending noise levels (float64, one per network evaluation) of a consistency sampling request.

    Args:
        config (`Mapping`): A scheduler config with `num_train_timesteps`, `sigma_min`, `sigma_max` and `rho`.
        num_inference_steps (`int`, *optional*): Evenly spaced indices of the training grid, as diffusers spaces
            them (1 step samples at `sigma_max`).
        timesteps (`list[int]`, *optional*): Strictly descending indices into the grid (0 = `sigma_max`), e.g.
            `[22, 0]`, OpenAI's `ts=0,22,39`.
        sigmas (`list[float]`, *optional*): Strictly descending noise levels within [`sigma_min`, `sigma_max`].

    Exactly one of the three must be given; anything else raises a `ValueError` that says what to pass.
    """
    given = [name for name, value in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if value is not None]
    if len(given) != 1:
        raise InputError(
            f"Pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`, got {given or 'none'}.",
            given[1] if len(given) > 1 else "num_inference_steps",
        )
    n_train, sigma_min, sigma_max = config["num_train_timesteps"], config["sigma_min"], config["sigma_max"]
    if sigmas is not None:
        return np.clip(validate_sigmas(sigmas, sigma_min, sigma_max), sigma_min, sigma_max)
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise InputError(f"`num_inference_steps` must be an integer, got {num_inference_steps!r}.",
                             "num_inference_steps")
        if not 1 <= num_inference_steps <= n_train:
            raise InputError(
                f"`num_inference_steps` must be between 1 and num_train_timesteps={n_train}, got "
                f"{num_inference_steps}; pass explicit `sigmas` for a finer schedule.", "num_inference_steps"
            )
        step_ratio = n_train // int(num_inference_steps)
        indices = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
    else:
        indices = validate_timesteps(timesteps, n_train)
    return timesteps_to_sigmas(indices, n_train, sigma_min, sigma_max, config["rho"])


def consistency_sample(
    consistency_fn: Callable,
    latents: torch.Tensor,
    sigmas: Sequence[float],
    sigma_min: float = SIGMA_MIN,
    s_noise: float = 1.0,
    clip_denoised: bool = True,
    randn: Callable | None = None,
    start: torch.Tensor | None = None,
    project: Callable | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """
    Multistep consistency sampling, Song et al. (2023) Algorithm 1; with `project`, Algorithm 4 (zero-shot editing).

    x = start + sigma_0 z; then for each level: x0 = f(x, sigma) (clamped when `clip_denoised`, then projected),
    and, unless it was the last level, x = x0 + s_noise sqrt(sigma_next^2 - eps^2) z'. No noise after the last step.

    Args:
        consistency_fn (`Callable`): f(x, sigma) -> denoised, called with a (B,) float32 tensor of noise levels.
        latents (`torch.Tensor`): Standard normal noise z of shape (B, C, H, W).
        sigmas (sequence of `float`): The validated descending levels, e.g. from [`consistency_schedule`].
        sigma_min (`float`): The model's epsilon.
        s_noise (`float`): Scale of the noise added between steps.
        clip_denoised (`bool`): Clamp f's output to [-1, 1] (before the projection).
        randn (`Callable`, *optional*): `randn(shape) -> Tensor`, the source of the noise between steps; see
            [`grouped_randn`] for a batch whose rows belong to different requests. Defaults to `torch.randn`.
        start (`torch.Tensor`, *optional*): The clean image the first noisy sample is centred on (0 when omitted).
        project (`Callable`, *optional*): Algorithm 4's x <- A^-1[(A y)(1 - Omega) + (A x) Omega].
        callback (`Callable`, *optional*): `callback(i, sigma, x, denoised)` after step i, where x is the input of
            the next step; a tensor it returns replaces x.

    Returns:
        `torch.Tensor`: the sample after the last step.
    """
    sigmas = [float(sigma) for sigma in sigmas]
    if randn is None:
        def randn(shape):
            return torch.randn(shape, device=latents.device, dtype=latents.dtype)
    x = sigmas[0] * latents if start is None else start + sigmas[0] * latents
    for i, sigma in enumerate(sigmas):
        sigma_batch = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
        denoised = clamp_denoised(consistency_fn(x, sigma_batch), clip_denoised)
        if project is not None:
            denoised = project(denoised)
        if i + 1 < len(sigmas):
            x = renoise(denoised, sigmas[i + 1], randn(denoised.shape), sigma_min, s_noise)
        else:
            x = denoised
        if callback is not None:
            replaced = callback(i, sigma, x, denoised)
            x = x if replaced is None else replaced
    return x


def grouped_randn(generators: Sequence, sizes: Sequence[int], device=None, dtype=None) -> Callable:
    """
    A `randn(shape)` for a batch made of several requests: rows [sum(sizes[:k]), sum(sizes[:k+1])) are drawn from
    `generators[k]` as that request would draw them alone, so a batched result equals the unbatched ones.
    """
    if len(generators) != len(sizes) or any(int(n) < 1 for n in sizes):
        raise ValueError(f"Need one generator per request and positive sizes, got {len(generators)} generators "
                         f"for sizes {list(sizes)}.")

    def randn(shape):
        if shape[0] != sum(sizes):
            raise ValueError(f"A batch of {shape[0]} rows does not match the request sizes {list(sizes)}.")
        return torch.cat([randn_tensor((int(n), *shape[1:]), generator=generator, device=device, dtype=dtype)
                          for generator, n in zip(generators, sizes)])

    return randn


_MOVED_TO_TEACHER_SAMPLING = ("ODE_SOLVERS", "TEACHER_SAMPLERS", "SamplerOutput", "nfe_for_steps", "steps_for_nfe",
                              "ode_sigmas", "sample_ode", "sample_ddim", "teacher_clips_denoised", "sample_teacher")


def __getattr__(name):
    if name in _MOVED_TO_TEACHER_SAMPLING:
        warnings.warn(f"cm_diffusers.sampling.{name} moved to cm_diffusers.teacher_sampling.{name}; import it from "
                      "there (this alias will be removed in a future release).", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(".teacher_sampling", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
