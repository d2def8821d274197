"""The consistency loss: one path for distillation (CD) and training (CT, iCT, ECT).

    loss = E[ lambda(sigma_n, sigma_{n+1}) d(f_theta(x_n, sigma_n), f_target(x_hat_{n+1}, sigma_{n+1})) ]

with x_n = x + sigma_n z (Song et al. 2023, eq. 7 and 10). A mode is a choice of four small parts, never a new loop:

- where x_hat_{n+1} comes from (`TeacherODEStep` for CD, `DataPointStep` for CT, iCT and ECT),
- how the pair (sigma_n, sigma_{n+1}) is drawn (`KarrasGridPairs` uniform or lognormal, `ECTPairs`),
- the weighting lambda (1, or `inverse_gap_weight` for iCT and ECT),
- the distance d (`l2`, `l1`, `PseudoHuber`, `LPIPS`), computed per sample and in float32.

`Curriculum` turns the global step into the schedule of the step (N(k), mu(k), the ECT stage), so every rank and
every resumed run agrees.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .distances import LPIPS, LPIPS_BACKBONE_FILES, PseudoHuber, l1, l2, make_distance  # noqa: F401 (re-exported)
from .forward_ad import forward_ad_attention
from .modes import Levels, get_mode
from .parameterization import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    append_dims,
    consistency_function,
    ect_r,
    edm_loss_weight,
    euler_step,
    heun_step,
    inverse_gap_weight,
    karras_sigma_at,
    lognormal_index_probs,
    trigflow_data_tangent,
    trigflow_sigma,
    trigflow_t,
    trigflow_tangent_from_denoised,
    trigflow_time_input,
    truncated_lognormal_sigmas,
)

# ----------------------------------------------------------------------------------------------------------------
# The schedule of a step, from the global step


@dataclass(frozen=True)
class Curriculum:
    """Global step -> `Levels` for a mode, by its record in `cm_diffusers.modes.MODES`: fixed N and mu (cd), CT's
    N(k)/mu(k), iCT's doubling N(k), ECT's stages, sCM's tangent warm-up."""

    mode: str
    total_steps: int
    num_scales: int = 18  # cd: the fixed grid size N
    target_ema: float = 0.0  # cd: the fixed target EMA rate mu
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9
    num_stages: int = 8  # ect
    tangent_warmup_steps: int = 0  # sct/scd: H

    def __call__(self, step: int) -> Levels:
        return get_mode(self.mode).levels(self, step)

    @property
    def uses_target_ema(self) -> bool:
        """Whether the target ever differs from the online network (otherwise target = stop-grad(online))."""
        return get_mode(self.mode).target_ema(self)


# ----------------------------------------------------------------------------------------------------------------
# Noise-level pairs (sigma_n > sigma_{n+1}), shape (B,) each


@functools.lru_cache(maxsize=16)
def _grid_index_probs(num_scales, sigma_min, sigma_max, rho, lognormal, p_mean, p_std) -> torch.Tensor:
    if not lognormal:
        return torch.full((num_scales - 1,), 1.0 / (num_scales - 1), dtype=torch.float64)
    ascending = karras_sigma_at(
        torch.arange(num_scales - 1, -1, -1, dtype=torch.float64), num_scales, sigma_min, sigma_max, rho
    )
    # iCT's pair i = (sigma_i, sigma_{i+1}) of the ascending grid is our descending pair n = N - 2 - i
    return lognormal_index_probs(ascending, p_mean, p_std).flip(0)


class KarrasGridPairs:
    """Adjacent points (sigma_n, sigma_{n+1}) of the N-point Karras grid, index 0 = sigma_max.

    n ~ U{0, ..., N-2} for CD and CT (Song et al. 2023), or from iCT's discretised lognormal (Song & Dhariwal 2023,
    eq. 9) when `lognormal` is set.
    """

    def __init__(self, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0, lognormal=False, p_mean=-1.1, p_std=2.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.lognormal, self.p_mean, self.p_std = lognormal, p_mean, p_std

    def index_probs(self, num_scales: int) -> torch.Tensor:
        """p(n) for n = 0 .. N-2 (float64, sums to 1)."""
        return _grid_index_probs(
            num_scales, self.sigma_min, self.sigma_max, self.rho, self.lognormal, self.p_mean, self.p_std
        )

    def __call__(self, batch_size: int, levels: Levels, device=None, generator=None):
        n = torch.multinomial(self.index_probs(levels.num_scales), batch_size, replacement=True, generator=generator)
        grid = functools.partial(
            karras_sigma_at,
            num_scales=levels.num_scales,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            rho=self.rho,
        )
        sigma, sigma_next = grid(n.double()), grid(n.double() + 1)
        return sigma.float().to(device), sigma_next.float().to(device)


class ECTPairs:
    """ECT (Geng et al. 2024): sigma ~ lognormal(P_mean, P_std) on [sigma_min, sigma_max], r = ect_r(sigma, stage)."""

    def __init__(self, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0):
        self.sigma_min, self.sigma_max, self.p_mean, self.p_std = sigma_min, sigma_max, p_mean, p_std
        self.q, self.k, self.b = q, k, b

    def __call__(self, batch_size: int, levels: Levels, device=None, generator=None):
        u = torch.rand(batch_size, dtype=torch.float64, generator=generator)
        sigma = truncated_lognormal_sigmas(u, self.p_mean, self.p_std, self.sigma_min, self.sigma_max)
        sigma = sigma.clamp(min=self.sigma_min * (1 + 1e-5))  # keeps sigma - r > 0 where r is clamped to sigma_min
        sigma_next = ect_r(sigma, levels.stage, self.q, self.k, self.b, self.sigma_min)
        return sigma.float().to(device), sigma_next.float().to(device)


# ----------------------------------------------------------------------------------------------------------------
# Estimators of the next trajectory point x_hat_{n+1}


class DataPointStep:
    """CT/iCT/ECT: the Euler step with the data point x as the denoiser lands on x + sigma_{n+1} z exactly."""

    def __call__(self, x_n, sigma, sigma_next, sample, noise, class_labels=None):
        return sample + append_dims(sigma_next, sample.ndim) * noise


def teacher_denoised(teacher: Callable, x, sigma, class_labels=None, clip_denoised: bool = False) -> torch.Tensor:
    """The teacher's D(x, sigma) in float32, clamped to [-1, 1] with `clip_denoised` (see `TeacherODEStep`)."""
    denoised = teacher(x, sigma, class_labels=class_labels).float()
    return denoised.clamp(-1, 1) if clip_denoised else denoised


class TeacherODEStep:
    """CD: one Heun (default) or Euler step of the teacher's PF-ODE from sigma_n to sigma_{n+1}.

    The teacher D(x, sigma, class_labels=None) takes sigma of shape (B,); it may hold half-precision weights (the
    adapters of `cm_diffusers.teachers` compute their scalings in float32), and its output is used in float32.
    With `clip_denoised`, D is clamped to [-1, 1] as DDPM/DDIM samplers do (`clip_sample`): an eps-prediction
    teacher's x0 = x - sigma eps amplifies its errors by sigma and can leave the data range far at large sigma.
    """

    def __init__(self, teacher: Callable, solver: str = "heun", clip_denoised: bool = False):
        if solver not in ("heun", "euler"):
            raise ValueError(f"Unknown ODE solver {solver!r}; choose heun or euler.")
        self.teacher, self.solver, self.clip_denoised = teacher, solver, clip_denoised

    def __call__(self, x_n, sigma, sigma_next, sample, noise, class_labels=None):
        def denoise(x, sigma_b):
            return teacher_denoised(self.teacher, x, sigma_b.reshape(-1), class_labels, self.clip_denoised)

        sigma, sigma_next = append_dims(sigma, x_n.ndim), append_dims(sigma_next, x_n.ndim)
        if self.solver == "euler":
            return euler_step(x_n, sigma, sigma_next, denoise(x_n, sigma))
        return heun_step(denoise, x_n, sigma, sigma_next)


# ----------------------------------------------------------------------------------------------------------------
# The loss


def unit_weight(sigma, sigma_next):
    """CD/CT weighting lambda = 1."""
    return torch.ones_like(sigma)


def shared_dropout(device: torch.device):
    """Forks the RNG of `device` (CPU always included): what runs inside leaves the RNG as it found it."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


class EDMParameterization:
    """Levels are EDM sigmas: x_n = x + sigma z, f = c_skip x + c_out F(c_in x, t(sigma)) (`consistency_function`)."""

    def __init__(self, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
        self.sigma_min, self.sigma_data = sigma_min, sigma_data

    def add_noise(self, sample, noise, sigma):
        return sample + append_dims(sigma, sample.ndim) * noise

    def __call__(self, model: Callable, sample, sigma, **cond):
        return consistency_function(model, sample, sigma, self.sigma_min, self.sigma_data, **cond)


class ConsistencyLoss:
    """d(f_theta(x_n, sigma_n), f_target(x_hat_{n+1}, sigma_{n+1})) weighted by lambda: every mode's loss.

    Args:
        next_point: (x_n, sigma_n, sigma_{n+1}, x, z, class_labels) -> x_hat_{n+1} (`TeacherODEStep`,
            `DataPointStep`).
        sample_sigmas: (batch_size, levels, device) -> (sigma_n, sigma_{n+1}) (`KarrasGridPairs`, `ECTPairs`).
        distance: (a, b) -> per-sample distance (B,).
        weighting: (sigma_n, sigma_{n+1}) -> lambda (B,); `unit_weight` or `inverse_gap_weight`.
        sigma_min, sigma_data: the boundary scalings, the same ones the sampler uses.
        parameterization: how x_n is noised and f evaluated at a level; EDM sigma space (`EDMParameterization`)
            unless a mode brings its own (LCD: DDPM timesteps and LCM's scalings, `cm_diffusers.latent`).
    """

    def __init__(
        self,
        next_point,
        sample_sigmas,
        distance=l2,
        weighting=unit_weight,
        sigma_min=SIGMA_MIN,
        sigma_data=SIGMA_DATA,
        parameterization=None,
    ):
        self.next_point, self.sample_sigmas, self.distance, self.weighting = (
            next_point,
            sample_sigmas,
            distance,
            weighting,
        )
        self.sigma_min, self.sigma_data = sigma_min, sigma_data
        self.parameterization = parameterization or EDMParameterization(sigma_min, sigma_data)

    def __call__(
        self, student: Callable, target: Callable, sample: torch.Tensor, levels: Levels, class_labels=None, **cond
    ):
        """Returns the loss (float32 scalar) and a dict of detached per-batch statistics for logging.

        `student` and `target` are raw networks F(x_in, t, class_labels=None, **cond) (see `networks.unet_forward`);
        the target may be the student itself (mu = 0: stop-gradient of the online network). Further conditioning
        (`cond`, e.g. LCD's text embeddings and guidance scale) goes to the networks and to `next_point` alike.
        """
        cond = {"class_labels": class_labels, **cond}
        sigma, sigma_next = self.sample_sigmas(sample.shape[0], levels, device=sample.device)
        noise = torch.randn_like(sample)
        x_n = self.parameterization.add_noise(sample, noise, sigma)
        with torch.no_grad():
            x_next = self.next_point(x_n, sigma, sigma_next, sample, noise, **cond)

        with shared_dropout(sample.device):  # the target below draws the same dropout masks as the student
            denoised = self.parameterization(student, x_n, sigma, **cond)
        with torch.no_grad():
            target_denoised = self.parameterization(target, x_next, sigma_next, **cond)

        distance = self.distance(denoised.float(), target_denoised.float())
        weight = self.weighting(sigma, sigma_next).float()
        loss = (weight * distance).mean()
        logs = {"sigma_mean": sigma.mean(), "sigma_next_mean": sigma_next.mean(), "distance": distance.mean()}
        return loss, {name: value.detach() for name, value in logs.items()}


class DenoiserLoss:
    """The denoiser warm-up before a consistency loss: EDM-weighted MSE of f_theta(x + sigma z, sigma) to a denoiser.

    The target is the teacher's D(x + sigma z, sigma) (`teacher` given: regression onto the teacher, as in CD), or the
    clean data x (plain denoising score matching, for runs that must not use a teacher's outputs). A few hundred
    steps turn a student initialised from a DDPM eps-teacher's weights, whose time input, input scaling and output
    head mean something else under the consistency parameterization, into a denoiser with the student's own
    scalings, which is where CD and ECT expect to start (OpenAI's CD starts from an EDM teacher with exactly these
    scalings). sigma ~ lognormal(p_mean, p_std) restricted to [sigma_min, sigma_max]; the weight
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 makes every level's error count alike (Karras et al. 2022).
    """

    def __init__(
        self,
        teacher: Optional[Callable] = None,
        clip_denoised: bool = False,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        sigma_data=SIGMA_DATA,
        p_mean=-1.1,
        p_std=2.0,
    ):
        self.teacher, self.clip_denoised = teacher, clip_denoised
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, student: Callable, target: Callable, sample: torch.Tensor, levels: Levels, class_labels=None):
        """Same signature as `ConsistencyLoss` (`target` and `levels` are unused); returns (loss, statistics)."""
        u = torch.rand(sample.shape[0], dtype=torch.float64)
        sigma = truncated_lognormal_sigmas(u, self.p_mean, self.p_std, self.sigma_min, self.sigma_max)
        sigma = sigma.to(sample.device, torch.float32)
        noisy = sample + append_dims(sigma, sample.ndim) * torch.randn_like(sample)
        with torch.no_grad():
            if self.teacher is None:
                goal = sample.float()
            else:
                goal = teacher_denoised(self.teacher, noisy, sigma, class_labels, self.clip_denoised)
        denoised = consistency_function(
            student, noisy, sigma, self.sigma_min, self.sigma_data, class_labels=class_labels
        )
        distance = l2(denoised.float(), goal)
        loss = (edm_loss_weight(sigma, self.sigma_data) * distance).mean()
        return loss, {"sigma_mean": sigma.mean().detach(), "distance": distance.mean().detach()}


# ----------------------------------------------------------------------------------------------------------------
# Continuous-time consistency models (sCM, Lu & Song 2024) in TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2)


class TrigFlowTimes:
    """sCM's times: sigma ~ lognormal(P_mean, P_std) on [sigma_min, sigma_max], t = arctan(sigma / sigma_d)."""

    def __init__(self, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA, p_mean=-1.0, p_std=1.4):
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, batch_size: int, levels: Levels, device=None, generator=None) -> torch.Tensor:
        u = torch.rand(batch_size, dtype=torch.float64, generator=generator)
        sigma = truncated_lognormal_sigmas(u, self.p_mean, self.p_std, self.sigma_min, self.sigma_max)
        return trigflow_t(sigma, self.sigma_data).float().to(device)


class DataTangent:
    """sCT: the tangent of the PF-ODE estimated by the data point, dx_t/dt = cos(t) z - sin(t) x0."""

    def __call__(self, x_t, t, sample, noise, class_labels=None):
        return trigflow_data_tangent(sample, noise, t)


class TeacherTangent:
    """sCD: the teacher's PF-ODE tangent dx_t/dt = sigma_d F_teacher = (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) /
    sin(t), with D any denoiser of `cm_diffusers.teachers` (EDM or DDPM), in float32."""

    def __init__(self, teacher: Callable, clip_denoised: bool = False, sigma_data: float = SIGMA_DATA):
        self.teacher, self.clip_denoised, self.sigma_data = teacher, clip_denoised, sigma_data

    def __call__(self, x_t, t, sample, noise, class_labels=None):
        sigma = trigflow_sigma(t, self.sigma_data).reshape(-1)
        denoised = teacher_denoised(self.teacher, x_t / torch.cos(t), sigma, class_labels, self.clip_denoised)
        return trigflow_tangent_from_denoised(x_t, t, denoised)


class LogVarianceHead(torch.nn.Module):
    """sCM's adaptive weighting: a learned log-variance w(t) over time (a linear map of a sinusoidal embedding of
    1000 t, zero at the start). It trains with the student and is saved in the training checkpoints only."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.channels = channels
        self.linear = torch.nn.Linear(channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        embedding = get_timestep_embedding(1000.0 * t.float(), self.channels, flip_sin_to_cos=True,
                                           downscale_freq_shift=0)  # fmt: skip
        return self.linear(embedding.to(self.linear.weight.dtype)).reshape(-1).float()


class TrigFlowConsistencyLoss(torch.nn.Module):
    """sCT / sCD (Lu & Song 2024, Algorithm 1): one loss, the tangent estimator is the only difference.

        (F-, dF-) = jvp(F_theta-, (x_t / sigma_d, t), (cos t sin t dx_t/dt / sigma_d, cos t sin t))
        g = -cos^2(t) (sigma_d F- - dx_t/dt) - r (cos t sin t x_t + sigma_d dF-),   g <- g / (||g|| + c)
        loss = e^{-w(t)} ||F_theta - F- - g||^2 / D + w(t)    (w: `LogVarianceHead`; optional prior 1/(sigma_d tan t))

    g is cos(t) df/dt along the PF-ODE, so the gradient is that of the continuous-time consistency objective; r is the
    tangent warm-up of `Levels.tangent_warmup`. The JVP runs on `target` (the unwrapped network: forward-mode AD
    through a DDP wrapper would bypass its gradient hooks) and the gradient flows through `student` (the wrapper).

    Args:
        tangent: (x_t, t, x0, z, class_labels) -> dx_t/dt (`DataTangent`, `TeacherTangent`).
        sample_times: (batch_size, levels, device) -> t of shape (B,) (`TrigFlowTimes`).
        sigma_data: sigma_d. time_input: the network's c_noise(t) (`parameterization.TRIGFLOW_TIME_INPUTS`).
        adaptive_weighting: learn w(t) (`log_variance`); prior_weighting: weight by 1 / (sigma_d tan t).
        tangent_norm_c: c of the tangent normalisation (0: none).
    """

    def __init__(self, tangent, sample_times, sigma_data=SIGMA_DATA, time_input="t", adaptive_weighting=True,
                 prior_weighting=False, tangent_norm_c=0.1):  # fmt: skip
        super().__init__()
        self.tangent, self.sample_times = tangent, sample_times
        self.sigma_data, self.time_input = sigma_data, time_input
        self.log_variance = LogVarianceHead() if adaptive_weighting else None
        self.prior_weighting, self.tangent_norm_c = prior_weighting, tangent_norm_c

    def forward(self, student: Callable, target: Callable, sample: torch.Tensor, levels: Levels, class_labels=None):
        """Returns the loss (float32 scalar) and detached statistics, like `ConsistencyLoss`."""
        sigma_d = self.sigma_data
        t = self.sample_times(sample.shape[0], levels, device=sample.device)
        t_b = append_dims(t, sample.ndim)
        cos_t, sin_t = torch.cos(t_b), torch.sin(t_b)
        noise = torch.randn_like(sample) * sigma_d
        x_t = cos_t * sample + sin_t * noise
        with torch.no_grad():
            dxt_dt = self.tangent(x_t, t_b, sample, noise, class_labels).float()

        def network(x_in, time):
            return target(x_in, trigflow_time_input(time, self.time_input, sigma_d), class_labels=class_labels)

        # the student below draws the same dropout masks as the JVP of the stop-gradient network
        tangents = (cos_t * sin_t * dxt_dt / sigma_d, (cos_t * sin_t).reshape(-1))
        with shared_dropout(sample.device), torch.no_grad(), forward_ad_attention():
            F_minus, dF_minus = torch.func.jvp(network, (x_t / sigma_d, t), tangents)
        F_theta = student(x_t / sigma_d, trigflow_time_input(t, self.time_input, sigma_d), class_labels=class_labels)
        F_minus, dF_minus = F_minus.float(), dF_minus.float()
        r = levels.tangent_warmup
        g = -(cos_t**2) * (sigma_d * F_minus - dxt_dt) - r * (cos_t * sin_t * x_t + sigma_d * dF_minus)
        g_norm = g.reshape(g.shape[0], -1).norm(dim=1)
        if self.tangent_norm_c > 0:
            g = g / (append_dims(g_norm, g.ndim) + self.tangent_norm_c)
        distance = (F_theta.float() - F_minus - g).reshape(g.shape[0], -1).square().mean(dim=1)
        if self.prior_weighting:
            distance = distance / trigflow_sigma(t.float(), sigma_d)
        if self.log_variance is not None:
            log_variance = self.log_variance(t)
            loss = (torch.exp(-log_variance) * distance + log_variance).mean()
        else:
            loss = distance.mean()
        logs = {"t_mean": t.mean(), "tangent_norm": g_norm.mean(), "distance": distance.mean(),
                "tangent_warmup": torch.tensor(float(levels.tangent_warmup), device=sample.device)}  # fmt: skip
        return loss, {name: value.detach().float() for name, value in logs.items()}


# ----------------------------------------------------------------------------------------------------------------
# A mode's loss, from the parts its record names


def build_loss(
    mode: str,
    distance: Callable,
    teacher: Optional[Callable] = None,
    ode_solver: str = "heun",
    teacher_clip_denoised: bool = False,
    sigma_min=SIGMA_MIN,
    sigma_max=SIGMA_MAX,
    sigma_data=SIGMA_DATA,
    rho=7.0,
    p_mean=-1.1,
    p_std=2.0,
    q=2.0,
    k=8.0,
    b=1.0,
    **mode_settings,
):
    """The loss of a mode: the parts its record in `cm_diffusers.modes.MODES` names, built from these settings."""
    settings = dict(ode_solver=ode_solver, teacher_clip_denoised=teacher_clip_denoised, sigma_min=sigma_min,
                    sigma_max=sigma_max, sigma_data=sigma_data, rho=rho, p_mean=p_mean, p_std=p_std, q=q, k=k, b=b,
                    **mode_settings)  # fmt: skip
    record = get_mode(mode)
    if record.estimator in NEEDS_TEACHER and teacher is None:
        raise ValueError(f"--mode {mode} distills a teacher: pass --teacher_model_name_or_path.")
    next_point = ESTIMATORS[record.estimator](teacher, settings)
    sampler = SAMPLERS[record.sampler](settings)
    if record.loss == "trigflow":
        return TrigFlowConsistencyLoss(next_point, sampler, sigma_data, settings.get("time_input", "t"),
                                       record.weighting == "adaptive" and settings.get("adaptive_weighting", True),
                                       settings.get("prior_weighting", False),
                                       settings.get("tangent_norm_c", 0.1))  # fmt: skip
    parameterization = PARAMETERIZATIONS[record.parameterization](teacher, settings)
    return ConsistencyLoss(next_point, sampler, distance, WEIGHTINGS[record.weighting], sigma_min, sigma_data,
                           parameterization)  # fmt: skip


def _latent():
    from .latent import distill  # LCD's parts need transformers and peft (the `lcd` extra) only when used

    return distill


# The parts a mode's record names (`cm_diffusers.modes`), each built from the loss settings.
ESTIMATORS = {
    "teacher_ode_step": lambda teacher, s: TeacherODEStep(teacher, s["ode_solver"], s["teacher_clip_denoised"]),
    "data_point": lambda teacher, s: DataPointStep(),
    "teacher_tangent": lambda teacher, s: TeacherTangent(teacher, s["teacher_clip_denoised"], s["sigma_data"]),
    "data_tangent": lambda teacher, s: DataTangent(),
    # lcd: `teacher` is a `latent.LatentTeacher` (its raw network, noise schedule and prediction type)
    "guided_ddim_step": lambda teacher, s: _latent().GuidedDDIMStep(teacher.network, teacher.alphas_cumprod,
                                                                    teacher.prediction_type),  # fmt: skip
}
NEEDS_TEACHER = ("teacher_ode_step", "teacher_tangent", "guided_ddim_step")
SAMPLERS = {
    "karras_grid": lambda s: KarrasGridPairs(s["sigma_min"], s["sigma_max"], s["rho"], p_mean=s["p_mean"],
                                             p_std=s["p_std"]),  # fmt: skip
    "karras_grid_lognormal": lambda s: KarrasGridPairs(s["sigma_min"], s["sigma_max"], s["rho"], lognormal=True,
                                                       p_mean=s["p_mean"], p_std=s["p_std"]),  # fmt: skip
    "ect_pairs": lambda s: ECTPairs(s["sigma_min"], s["sigma_max"], s["p_mean"], s["p_std"], s["q"], s["k"], s["b"]),
    "trigflow_lognormal": lambda s: TrigFlowTimes(s["sigma_min"], s["sigma_max"], s["sigma_data"], s["p_mean"],
                                                  s["p_std"]),  # fmt: skip
    "skipping_step": lambda s: _latent().SkippingStepPairs(s["num_train_timesteps"], s["num_ddim_timesteps"]),
}
# sigma_n, sigma_{n+1} -> lambda for the discrete loss; "adaptive" is sCM's learned log-variance (`LogVarianceHead`)
WEIGHTINGS = {"unit": unit_weight, "inverse_gap": inverse_gap_weight, "adaptive": LogVarianceHead}
PARAMETERIZATIONS = {
    "edm": lambda teacher, s: EDMParameterization(s["sigma_min"], s["sigma_data"]),
    "lcm": lambda teacher, s: _latent().LCMParameterization(teacher.alphas_cumprod, teacher.prediction_type,
                                                            s["timestep_scaling"]),  # fmt: skip
}
