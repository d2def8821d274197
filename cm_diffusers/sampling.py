"""Samplers. Consistency models: one validated schedule function and one loop that runs Algorithm 1 (generation)
and, with a projection after each step, Algorithm 4 (zero-shot editing) of Song et al. (2023). Teachers: the
probability-flow ODE over EDM sigmas for any denoiser D(x, sigma), and DDIM for DDPM teachers.

`consistency_schedule` is a pure function of the scheduler config and the request, so that concurrent callers
(threads, a server's batches) never share mutable scheduler state. `sample_ode` integrates dx/dsigma = (x - D(x,
sigma)) / sigma with Euler or Heun steps over a descending grid that ends at 0 (Karras et al. 2022, Algorithm 1: the
last Heun step, to sigma = 0, is an Euler step). `sample_teacher` picks the grid for an NFE budget and also runs
diffusers' `DDIMScheduler` on a DDPM teacher's UNet.
"""

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .parameterization import (
    RHO,
    SIGMA_MIN,
    clamp_denoised,
    euler_step,
    heun_step,
    karras_sigmas,
    renoise,
    timesteps_to_sigmas,
)

ODE_SOLVERS = ("heun", "euler")
TEACHER_SAMPLERS = ("heun", "euler", "ddim")


# ----------------------------------------------------------------------------------------------------------------
# Consistency models: the schedule and the sampling loop


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
        raise ValueError(
            f"Pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`, got {given or 'none'}."
        )
    n_train, sigma_min, sigma_max = config["num_train_timesteps"], config["sigma_min"], config["sigma_max"]
    if sigmas is not None:
        return _validate_sigmas(sigmas, sigma_min, sigma_max)
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"`num_inference_steps` must be an integer, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(
                f"`num_inference_steps` must be between 1 and num_train_timesteps={n_train}, got "
                f"{num_inference_steps}; pass explicit `sigmas` for a finer schedule."
            )
        step_ratio = n_train // int(num_inference_steps)
        indices = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
    else:
        indices = _validate_timesteps(timesteps, n_train)
    return timesteps_to_sigmas(indices, n_train, sigma_min, sigma_max, config["rho"])


def _validate_timesteps(timesteps, num_train_timesteps: int) -> np.ndarray:
    values = timesteps.tolist() if isinstance(timesteps, (torch.Tensor, np.ndarray)) else list(timesteps)
    if len(values) == 0:
        raise ValueError("`timesteps` is empty; pass at least one grid index, e.g. [0] for one step.")
    if any(isinstance(v, bool) or not np.isfinite(float(v)) or float(v) != int(v) for v in values):
        raise ValueError(
            f"`timesteps` must be integer indices into the {num_train_timesteps}-point training grid (e.g. [22, 0]), "
            f"got {values}; pass `sigmas` for arbitrary noise levels."
        )
    indices = np.asarray([int(v) for v in values], dtype=np.int64)
    if np.any(indices[1:] >= indices[:-1]):
        raise ValueError(f"`timesteps` must be strictly descending (e.g. [22, 0]), got {indices.tolist()}.")
    if indices[0] >= num_train_timesteps or indices[-1] < 0:
        raise ValueError(
            f"`timesteps` must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps}), "
            f"got {indices.tolist()}."
        )
    return indices


def _validate_sigmas(sigmas, sigma_min: float, sigma_max: float) -> np.ndarray:
    try:
        values = np.asarray(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"`sigmas` must be a non-empty 1-D list of finite noise levels, got {sigmas!r}.")
    if np.any(values[1:] >= values[:-1]):
        raise ValueError(f"`sigmas` must be strictly descending, got {values.tolist()}.")
    tol = 1e-6 * sigma_max  # float32 round trips of the end points must not be rejected
    if values[-1] < sigma_min - 1e-9 or values[0] > sigma_max + tol:
        raise ValueError(
            f"`sigmas` must lie within [sigma_min={sigma_min}, sigma_max={sigma_max}] of this model, got "
            f"[{values[-1]}, {values[0]}]."
        )
    return np.clip(values, sigma_min, sigma_max)


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


# ----------------------------------------------------------------------------------------------------------------
# Teachers


@dataclass
class SamplerOutput:
    """A teacher sample in model space ([-1, 1] for images) and the number of network evaluations it cost."""

    sample: torch.Tensor
    nfe: int


def nfe_for_steps(sampler: str, num_steps: int) -> int:
    """Network evaluations of `num_steps` steps: Heun 2n - 1 (its last step is Euler), Euler and DDIM n."""
    _check_sampler(sampler)
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps whose cost fits in `nfe` network evaluations (Heun: (nfe + 1) // 2)."""
    _check_sampler(sampler)
    if nfe < 1:
        raise ValueError(f"An NFE budget must be at least 1, got {nfe}.")
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def ode_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> torch.Tensor:
    """The `num_steps`-point Karras grid from sigma_max to sigma_min with 0 appended (float64, descending)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    grid = [sigma_max] if num_steps == 1 else karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    return torch.tensor(grid + [0.0], dtype=torch.float64)


@torch.no_grad()
def sample_ode(
    denoiser: Callable, noise: torch.Tensor, sigmas, solver: str = "heun", clip_denoised: bool = False, **cond
) -> SamplerOutput:
    """
    Solves the probability-flow ODE from x = sigmas[0] * noise down the grid `sigmas` (descending, usually ending
    at 0) with Heun or Euler steps.

    Args:
        denoiser (`Callable`): D(x, sigma, **cond) -> denoised, called with sigma as a (B,) tensor.
        noise (`torch.Tensor`): Standard normal noise (B, C, H, W).
        sigmas (sequence of floats): The noise levels, descending; see [`ode_sigmas`].
        solver (`str`, defaults to `"heun"`): `"heun"` (2nd order) or `"euler"`.
        clip_denoised (`bool`, defaults to `False`): Clamp D(x, sigma) to [-1, 1], as DDPM schedulers' `clip_sample`
            does; Euler steps with it equal DDIM with `clip_sample=True, use_clipped_model_output=True`.
        cond: Passed to the denoiser (e.g. `class_labels`).

    Returns:
        [`SamplerOutput`]: the sample at sigmas[-1] and the number of denoiser calls.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}.")
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2 or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] < 0:
        raise ValueError(f"`sigmas` must be at least 2 strictly descending levels >= 0, got {sigmas}.")
    nfe = 0

    def D(x, sigma):
        nonlocal nfe
        nfe += 1
        sigma = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        denoised = denoiser(x, sigma, **cond)
        return clamp_denoised(denoised, clip_denoised)

    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if solver == "heun":
            x = heun_step(D, x, sigma, sigma_next)
        else:
            x = euler_step(x, sigma, sigma_next, D(x, sigma))
    return SamplerOutput(sample=x, nfe=nfe)


@torch.no_grad()
def sample_ddim(
    unet,
    scheduler_config,
    noise: torch.Tensor,
    num_inference_steps: int,
    class_labels: Optional[torch.Tensor] = None,
    timestep_spacing: str = "trailing",
    clip_sample: Optional[bool] = None,
) -> SamplerOutput:
    """
    Deterministic DDIM (eta = 0) with diffusers' `DDIMScheduler` built from a DDPM teacher's scheduler config.

    `timestep_spacing="trailing"` (Lin et al. 2024) starts at the last training timestep, so that 1-4 steps start
    from pure noise; the config's own spacing ("leading" for DDPMScheduler) would start a 1-step sample at t = 0.
    Pass `timestep_spacing=None` to keep the config's. `clip_sample` overrides the config's x0 clipping.
    """
    from diffusers import DDIMScheduler

    overrides = {"timestep_spacing": timestep_spacing} if timestep_spacing is not None else {}
    if clip_sample is not None:
        overrides["clip_sample"] = clip_sample
    scheduler = DDIMScheduler.from_config(dict(scheduler_config), **overrides)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    cond = {"class_labels": class_labels} if class_labels is not None else {}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(x, t), t, return_dict=False, **cond)[0]
        x = scheduler.step(model_output, t, x, eta=0.0).prev_sample
    return SamplerOutput(sample=x, nfe=len(scheduler.timesteps))


def teacher_clips_denoised(teacher) -> bool:
    """Whether a teacher's own scheduler clamps its x0 predictions to [-1, 1] (DDPMScheduler's `clip_sample`)."""
    return getattr(teacher, "kind", None) == "ddpm" and bool(teacher.scheduler_config.get("clip_sample", True))


def sample_teacher(
    teacher,
    noise: torch.Tensor,
    sampler: str = "heun",
    nfe: int = 35,
    class_labels=None,
    clip_denoised: Optional[bool] = None,
    rho: float = RHO,
) -> SamplerOutput:
    """
    Samples a teacher from [`load_teacher`] with at most `nfe` network evaluations.

    Heun and Euler integrate the PF-ODE over a Karras grid between the teacher's `sigma_min` and `sigma_max`
    (Heun with n steps costs 2n - 1 evaluations); DDIM needs a DDPM teacher (`teacher.kind == "ddpm"`).
    `clip_denoised` (default: what the teacher's scheduler does, see [`teacher_clips_denoised`]) clamps the x0
    predictions to [-1, 1] for every sampler, so that all of them get the same help: a DDPM's x0 = x - sigma eps
    at sigma ~ 150 amplifies epsilon errors 150-fold, and without the clamp an undertrained teacher's ODE diverges.
    """
    num_steps = steps_for_nfe(sampler, nfe)
    clip_denoised = teacher_clips_denoised(teacher) if clip_denoised is None else clip_denoised
    if sampler == "ddim":
        if getattr(teacher, "kind", None) != "ddpm":
            raise ValueError(
                f"DDIM samples DDPM teachers; this teacher is {getattr(teacher, 'kind', 'unknown')!r}. "
                "Use heun or euler."
            )
        return sample_ddim(teacher.unet, teacher.scheduler_config, noise, num_steps, class_labels,
                           clip_sample=clip_denoised)
    sigmas = ode_sigmas(num_steps, teacher.sigma_min, teacher.sigma_max, rho)
    cond = {"class_labels": class_labels} if class_labels is not None else {}
    return sample_ode(teacher, noise, sigmas, solver=sampler, clip_denoised=clip_denoised, **cond)


def _check_sampler(sampler: str):
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"Unknown teacher sampler {sampler!r}; choose one of {TEACHER_SAMPLERS}.")
