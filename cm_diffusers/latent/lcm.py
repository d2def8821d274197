"""Pure math of latent consistency models (Luo et al. 2023, LCM) in a DDPM's discrete-time variance-preserving space.

x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t]. The consistency function is
f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t) with LCM's scalings at the scaled time 10 t (so f(x, 0) = x),
the target is one classifier-free-guided DDIM step of the teacher from t_{n+k} to t_n on a skipping-step grid, and
sampling is diffusers' `LCMScheduler`. Functions take tensors and numbers and keep no state; the names follow
diffusers' `LCMScheduler` and `LatentConsistencyModelPipeline`, whose numbers they reproduce (tested).
"""

import math

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def skipping_step_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """The DDIM grid t = k - 1, 2k - 1, ..., N k - 1 with skipping step k = T // N (LCM sec. 4.3), ascending."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(
            f"num_ddim_timesteps must be in [1, {num_train_timesteps}] (the teacher's training timesteps), "
            f"got {num_ddim_timesteps}."
        )
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * k - 1


def skipping_step_pair(index: torch.Tensor, grid: torch.Tensor):
    """(t_{n+k}, t_n) for grid indices: the grid point and the one below it, 0 below the first (where f(x, 0) = x)."""
    start = grid[index]
    end = torch.where(index > 0, grid[(index - 1).clamp(min=0)], torch.zeros_like(start))
    return start, end


def lcm_boundary_scalings(timestep, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2), s = 10."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predicted_original_sample(model_output, sample, alpha_prod_t, prediction_type: str = "epsilon"):
    """x0 from an eps-, v- or x0-prediction at x_t (DDPM/DDIM, Salimans & Ho 2022 for v)."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t**0.5
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * sample - (1 - alpha_prod_t) ** 0.5 * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}.")


def predicted_noise(model_output, sample, alpha_prod_t, prediction_type: str = "epsilon"):
    """eps from an eps-, v- or x0-prediction at x_t."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * model_output + (1 - alpha_prod_t) ** 0.5 * sample
    if prediction_type == "sample":
        return (sample - alpha_prod_t**0.5 * model_output) / (1 - alpha_prod_t) ** 0.5
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}.")


def lcm_consistency_output(model_output, sample, timestep, alpha_prod_t, prediction_type="epsilon",
                           timestep_scaling: float = 10.0):  # fmt: skip
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred: `LCMScheduler.step`'s `denoised`."""
    c_skip, c_out = lcm_boundary_scalings(timestep, timestep_scaling=timestep_scaling)
    return c_skip * sample + c_out * predicted_original_sample(model_output, sample, alpha_prod_t, prediction_type)


def guided(cond, uncond, w):
    """LCM's classifier-free guidance cond + w (cond - uncond) (w = 0: no guidance; diffusers' scale is w + 1)."""
    return cond + w * (cond - uncond)


def ddim_step(pred_original_sample, pred_noise, alpha_prod_t_prev):
    """The deterministic DDIM step (eta = 0) to a level a_prev: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    return alpha_prod_t_prev**0.5 * pred_original_sample + (1 - alpha_prod_t_prev) ** 0.5 * pred_noise


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of 1000 w (VDM), what `LatentConsistencyModelPipeline` feeds as `timestep_cond`."""
    half_dim = embedding_dim // 2
    frequencies = torch.exp(torch.arange(half_dim, dtype=dtype) * -(math.log(10000.0) / (half_dim - 1)))
    angles = (w.to(dtype) * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, embedding_dim % 2))


def lcm_inference_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                            original_inference_steps: int = 50) -> list:  # fmt: skip
    """The timesteps `LCMScheduler.set_timesteps(num_inference_steps)` samples at: evenly spaced indices into the
    descending skipping-step grid of `original_inference_steps` points."""
    if not 1 <= num_inference_steps <= original_inference_steps:
        raise ValueError(
            f"num_inference_steps must be in [1, {original_inference_steps}] (the distillation grid's size), "
            f"got {num_inference_steps}."
        )
    grid = skipping_step_timesteps(num_train_timesteps, original_inference_steps).flip(0)
    indices = np.floor(np.linspace(0, len(grid), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [int(grid[i]) for i in indices]
