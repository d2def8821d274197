"""Teacher samplers: the probability-flow ODE over EDM sigmas for any denoiser D(x, sigma), and DDIM for DDPM
teachers.

`sample_ode` integrates dx/dsigma = (x - D(x, sigma)) / sigma with Euler or Heun steps over a descending grid that
ends at 0 (Karras et al. 2022, Algorithm 1: the last Heun step, to sigma = 0, is an Euler step). `sample_teacher`
picks the grid for an NFE budget and also runs diffusers' `DDIMScheduler` on a DDPM teacher's UNet.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .parameterization import RHO, clamp_denoised, euler_step, heun_step, karras_sigmas
from .validation import validate_sigmas

ODE_SOLVERS = ("heun", "euler")
TEACHER_SAMPLERS = ("heun", "euler", "ddim")


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
        clip_denoised (`bool`, defaults to `False`): Clamp D(x, sigma) to [-1, 1] (what DDPM schedulers call
            `clip_sample`); Euler steps with it equal DDIM with `clip_sample=True, use_clipped_model_output=True`.
        cond: Passed to the denoiser (e.g. `class_labels`).

    Returns:
        [`SamplerOutput`]: the sample at sigmas[-1] and the number of denoiser calls.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}.")
    sigmas = validate_sigmas(sigmas, low=0.0, min_length=2).tolist()
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
    clip_denoised: Optional[bool] = None,
) -> SamplerOutput:
    """
    Deterministic DDIM (eta = 0) with diffusers' `DDIMScheduler` built from a DDPM teacher's scheduler config.

    `timestep_spacing="trailing"` (Lin et al. 2024) starts at the last training timestep, so that 1-4 steps start
    from pure noise; the config's own spacing ("leading" for DDPMScheduler) would start a 1-step sample at t = 0.
    Pass `timestep_spacing=None` to keep the config's. `clip_denoised` overrides the config's x0 clipping (its
    `clip_sample`).
    """
    from diffusers import DDIMScheduler

    overrides = {"timestep_spacing": timestep_spacing} if timestep_spacing is not None else {}
    if clip_denoised is not None:
        overrides["clip_sample"] = clip_denoised
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
                           clip_denoised=clip_denoised)
    sigmas = ode_sigmas(num_steps, teacher.sigma_min, teacher.sigma_max, rho)
    cond = {"class_labels": class_labels} if class_labels is not None else {}
    return sample_ode(teacher, noise, sigmas, solver=sampler, clip_denoised=clip_denoised, **cond)


def _check_sampler(sampler: str):
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"Unknown teacher sampler {sampler!r}; choose one of {TEACHER_SAMPLERS}.")
