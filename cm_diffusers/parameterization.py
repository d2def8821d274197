"""Pure math of consistency models in EDM sigma space (Song et al. 2023, Karras et al. 2022).

Every formula of the package lives here once: noise grids, the boundary-condition scalings, the network's time
input, schedule conversions, probability-flow ODE steps and the training curricula. Functions take tensors or
numbers and keep no state.
"""

import math
from typing import Callable, Sequence

import numpy as np
import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, sigma) -> denoised


# ----------------------------------------------------------------------------------------------------------------
# Noise levels


def sigmas_from_ramp(ramp, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """Karras et al. (2022) eq. 5: ramp 0 -> sigma_max, ramp 1 -> sigma_min (numpy or torch, float64 math)."""
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def karras_sigmas(num_scales: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO) -> np.ndarray:
    """The N-point Karras grid, index 0 = sigma_max, index N-1 = sigma_min (float64)."""
    if num_scales < 2:
        raise ValueError(f"A Karras grid needs at least 2 points, got num_scales={num_scales}.")
    return sigmas_from_ramp(np.linspace(0.0, 1.0, num_scales), sigma_min, sigma_max, rho)


def karras_sigma_at(index, num_scales, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """sigma_i of the N-point grid for (tensor or integer) indices i, without building the grid."""
    return sigmas_from_ramp(index / (num_scales - 1), sigma_min, sigma_max, rho)


def sigma_to_t(sigma):
    """Network time input t(sigma) = 1000 * 0.25 * ln(sigma), as OpenAI's checkpoints and diffusers use."""
    if isinstance(sigma, torch.Tensor):
        return 250.0 * torch.log(sigma + 1e-44)
    return 250.0 * np.log(np.asarray(sigma, dtype=np.float64) + 1e-44)


def t_to_sigma(t):
    """Inverse of `sigma_to_t`."""
    if isinstance(t, torch.Tensor):
        return torch.exp(t / 250.0)
    return np.exp(np.asarray(t, dtype=np.float64) / 250.0)


# ----------------------------------------------------------------------------------------------------------------
# Consistency-model parameterization (Song et al. 2023, appendix C)


def boundary_scalings(sigma, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
    """c_skip, c_out, c_in with c_skip(eps) = 1 and c_out(eps) = 0, so that f(x, eps) = x holds exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def consistency_output(model_output, sample, sigma, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
    """f(x, sigma) = c_skip * x + c_out * F(c_in * x, t(sigma)), given F's output."""
    c_skip, c_out, _ = boundary_scalings(sigma, sigma_min, sigma_data)
    return c_skip * sample + c_out * model_output


def clamp_denoised(denoised: torch.Tensor, clip_denoised: bool = True) -> torch.Tensor:
    """The denoised sample clamped to the data range [-1, 1] when `clip_denoised` (the schedulers' config key)."""
    return denoised.clamp(-1, 1) if clip_denoised else denoised


def renoise(denoised: torch.Tensor, sigma_next, noise: torch.Tensor, sigma_min=SIGMA_MIN, s_noise: float = 1.0):
    """Algorithm 1, line 5: x = x0 + s_noise sqrt(sigma_next^2 - eps^2) z, which puts x0 at noise level sigma_next."""
    variance = sigma_next**2 - sigma_min**2
    std = variance.clamp(min=0) ** 0.5 if isinstance(variance, torch.Tensor) else math.sqrt(max(variance, 0.0))
    return denoised + noise * (s_noise * std)


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Views a per-sample tensor of shape (B,) as (B, 1, 1, 1) for broadcasting over images."""
    return x.reshape(x.shape + (1,) * (target_ndim - x.ndim))


def consistency_function(
    model: Callable, sample: torch.Tensor, sigma: torch.Tensor, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA, **cond
):
    """f_theta(x, sigma) for a raw network F(x_in, t, **cond) -> output; sigma has shape (B,)."""
    sigma_b = append_dims(sigma, sample.ndim)
    _, _, c_in = boundary_scalings(sigma_b, sigma_min, sigma_data)
    model_output = model(c_in * sample, sigma_to_t(sigma), **cond)
    return consistency_output(model_output, sample, sigma_b, sigma_min, sigma_data)


# ----------------------------------------------------------------------------------------------------------------
# Schedule conversions between OpenAI's `ts` and diffusers' `timesteps`


def openai_ts_to_timesteps(ts: Sequence[int], num_train_timesteps: int) -> list:
    """OpenAI's ascending indices ("0,22,39" of 40) -> diffusers' descending `timesteps` ([22, 0])."""
    ts = [int(t) for t in ts]
    if ts and ts[-1] == num_train_timesteps - 1:
        ts = ts[:-1]  # OpenAI's last index is the end point sigma_min, where no network is evaluated
    if not ts or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 0 or ts[-1] >= num_train_timesteps:
        raise ValueError(
            f"OpenAI `ts` must be strictly ascending indices in [0, {num_train_timesteps - 1}] (e.g. '0,22,39'), "
            f"got {ts}."
        )
    return ts[::-1]


def timesteps_to_openai_ts(timesteps: Sequence[int], num_train_timesteps: int) -> list:
    """diffusers' descending `timesteps` ([22, 0]) -> OpenAI's ascending `ts` ([0, 22, 39])."""
    ts = [int(t) for t in timesteps][::-1]
    if not ts or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 0 or ts[-1] >= num_train_timesteps - 1:
        raise ValueError(
            f"`timesteps` must be strictly descending indices in [0, {num_train_timesteps - 2}] (e.g. [22, 0]), "
            f"got {list(timesteps)}."
        )
    return ts + [num_train_timesteps - 1]


def timesteps_to_sigmas(timesteps, num_train_timesteps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """diffusers' descending `timesteps` ([22, 0]) -> the sigmas they sample at, in sampling order (float64).

    Index i is the i-th point of the N-point grid (0 = sigma_max), so [22, 0] samples at sigma_0, then sigma_22.
    """
    ramp = np.asarray(timesteps, dtype=np.float64)[::-1] / (num_train_timesteps - 1)
    return sigmas_from_ramp(ramp, sigma_min, sigma_max, rho)


# ----------------------------------------------------------------------------------------------------------------
# Probability-flow ODE in sigma space: dx/dsigma = (x - D(x, sigma)) / sigma


def euler_step(x, sigma, sigma_next, denoised):
    """One Euler step of the PF-ODE from sigma to sigma_next, given D(x, sigma)."""
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d


def heun_step(denoiser: DenoiserFn, x, sigma, sigma_next, denoised=None):
    """One Heun (2nd-order) step of the PF-ODE, Karras et al. (2022) Algorithm 1; Euler when sigma_next = 0."""
    if denoised is None:
        denoised = denoiser(x, sigma)
    d = (x - denoised) / sigma
    x_next = x + (sigma_next - sigma) * d
    if isinstance(sigma_next, torch.Tensor) or sigma_next > 0:
        d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
        x_heun = x + (sigma_next - sigma) * (d + d_next) / 2
        if isinstance(sigma_next, torch.Tensor):
            return torch.where(sigma_next > 0, x_heun, x_next)
        return x_heun
    return x_next


# ----------------------------------------------------------------------------------------------------------------
# Training curricula: pure functions of the global step, so every rank and every resumed run agrees


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (Song et al. 2023, appendix C)."""
    return int(math.ceil(math.sqrt(step / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1)


def ct_target_ema(num_scales: int, s0: int = 2, mu0: float = 0.9) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)): the target EMA rate that goes with N(k)."""
    return math.exp(s0 * math.log(mu0) / num_scales)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT doubling curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1))."""
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    return int(min(s0 * 2 ** math.floor(step / max(k_prime, 1)), s1) + 1)


def lognormal_index_probs(sigmas, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT: p(i) ~ erf((ln sigma_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln sigma_i - P_mean)/(sqrt2 P_std)).

    `sigmas` is the ascending grid sigma_min = sigma_0 < ... < sigma_{N-1} = sigma_max of iCT's notation; the
    result has N-1 entries, one per adjacent pair, and sums to 1.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def pseudo_huber_c(num_values: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(d), d = number of values per sample."""
    return 0.00054 * math.sqrt(num_values)


def ect_stage(step: int, total_steps: int, num_stages: int) -> int:
    """ECT stage index: the gap between sigma and r halves (by q) at each of `num_stages` equal stages."""
    return min(int(step * num_stages // max(total_steps, 1)), num_stages - 1)


def ect_r(sigma, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0, sigma_min: float = SIGMA_MIN):
    """ECT (Geng et al. 2024): r = sigma (1 - q^-(stage+1) (1 + k sigmoid(-b sigma))), clamped to >= sigma_min."""
    adj = 1 + k * torch.sigmoid(-b * sigma)
    r = sigma * (1 - adj / q ** (stage + 1))
    return r.clamp(min=sigma_min)


def inverse_gap_weight(sigma, sigma_next):
    """iCT / ECT loss weighting lambda = 1 / (sigma_n - sigma_{n+1}) (Song & Dhariwal 2023, sec. 3.3)."""
    return 1.0 / (sigma - sigma_next)


def truncated_lognormal_sigmas(u, p_mean=-1.1, p_std=2.0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """ECT's ln sigma ~ N(P_mean, P_std^2) restricted to [sigma_min, sigma_max], by inverse CDF of u in [0, 1]."""
    u = torch.as_tensor(u, dtype=torch.float64)
    erf_lo, erf_hi = (math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in (sigma_min, sigma_max))
    log_sigma = p_mean + p_std * math.sqrt(2) * torch.erfinv(erf_lo + u * (erf_hi - erf_lo))
    return log_sigma.exp().clamp(sigma_min, sigma_max)


def edm_loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """EDM's loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# ----------------------------------------------------------------------------------------------------------------
# TrigFlow (Lu & Song 2024, sCM): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]. The EDM view of
# the same point is sigma = sigma_d tan(t), x_sigma = x_t / cos(t); an EDM network F_edm is the TrigFlow F = -F_edm.

# The network's time input c_noise(t): the paper's t (times 1000, the range of the timesteps a UNet2DModel's
# sinusoidal embedding was designed for), the consistency models' 250 ln sigma (OpenAI's checkpoints, our EDM
# teacher's --edm_time_input consistency), or diffusers' EDM 0.25 ln sigma.
TRIGFLOW_TIME_INPUTS = ("t", "log_sigma", "edm_log_sigma")


def trigflow_t(sigma, sigma_data: float = SIGMA_DATA):
    """TrigFlow time of an EDM noise level: t = arctan(sigma / sigma_d)."""
    if isinstance(sigma, torch.Tensor):
        return torch.atan(sigma / sigma_data)
    return np.arctan(np.asarray(sigma, dtype=np.float64) / sigma_data)


def trigflow_sigma(t, sigma_data: float = SIGMA_DATA):
    """EDM noise level of a TrigFlow time: sigma = sigma_d tan(t)."""
    if isinstance(t, torch.Tensor):
        return sigma_data * torch.tan(t)
    return sigma_data * np.tan(np.asarray(t, dtype=np.float64))


def trigflow_time_input(t: torch.Tensor, time_input: str = "t", sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """c_noise(t) fed to the network (see TRIGFLOW_TIME_INPUTS); differentiable in t, computed in float32 or more."""
    t = t if t.dtype == torch.float64 else t.float()
    if time_input == "t":
        return 1000.0 * t
    log_sigma = torch.log(sigma_data * torch.tan(t))
    if time_input == "log_sigma":
        return 250.0 * log_sigma
    if time_input == "edm_log_sigma":
        return 0.25 * log_sigma
    raise ValueError(f"Unknown TrigFlow time input {time_input!r}; choose one of {', '.join(TRIGFLOW_TIME_INPUTS)}.")


def trigflow_output(model_output, sample, t, sigma_data: float = SIGMA_DATA):
    """sCM eq. 5: f(x_t, t) = cos(t) x_t - sin(t) sigma_d F, given F's output; f(x, 0) = x exactly."""
    return torch.cos(t) * sample - torch.sin(t) * sigma_data * model_output


def trigflow_function(model: Callable, sample, t, sigma_data: float = SIGMA_DATA, time_input: str = "t", **cond):
    """f_theta(x_t, t) for a raw network F(x_t / sigma_d, c_noise(t), **cond); t has shape (B,)."""
    model_output = model(sample / sigma_data, trigflow_time_input(t, time_input, sigma_data), **cond)
    return trigflow_output(model_output, sample, append_dims(t, sample.ndim), sigma_data)


def trigflow_tangent_from_denoised(sample, t, denoised):
    """dx_t/dt of the PF-ODE from a denoiser D(x_t / cos t, sigma_d tan t): (cos(t) x_t - D) / sin(t) = sigma_d F."""
    return (torch.cos(t) * sample - denoised) / torch.sin(t)


def trigflow_data_tangent(sample, noise, t):
    """sCT's tangent given the data point: d/dt (cos(t) x0 + sin(t) z) = cos(t) z - sin(t) x0."""
    return torch.cos(t) * noise - torch.sin(t) * sample


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA):
    """EDM's c_skip, c_out, c_in (Karras et al. 2022, table 1): the boundary scalings without the eps shift."""
    return boundary_scalings(sigma, 0.0, sigma_data)
