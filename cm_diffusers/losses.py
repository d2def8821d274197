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
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

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
    pseudo_huber_c,
    truncated_lognormal_sigmas,
)

# ----------------------------------------------------------------------------------------------------------------
# Distances: (B, ...) x (B, ...) -> (B,), one value per sample


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample (the paper's l2 metric)."""
    return _flat(a - b).square().mean(dim=1)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample."""
    return _flat(a - b).abs().mean(dim=1)


class PseudoHuber:
    """iCT's pseudo-Huber distance sqrt(||a - b||_2^2 + c^2) - c on the per-sample L2 norm (not elementwise)."""

    def __init__(self, c: Optional[float] = None):
        self.c = c  # None: iCT's c = 0.00054 sqrt(d), d = values per sample

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = pseudo_huber_c(a[0].numel()) if self.c is None else self.c
        return torch.sqrt(_flat(a - b).square().sum(dim=1) + c**2) - c


# The torchvision ImageNet backbones that `lpips` loads; torchvision would download them, which cannot happen here.
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class LPIPS:
    """LPIPS (Zhang et al. 2018) as the CD/CT paper used it: inputs upsampled to 224 px, gray repeated to RGB."""

    def __init__(self, net: str = "vgg", device=None):
        try:
            import lpips
        except ImportError as err:
            raise ImportError(
                "--loss_type lpips needs the `lpips` package (`pip install lpips`) and the torchvision backbone "
                f"weights {LPIPS_BACKBONE_FILES[net]} in {self.checkpoint_dir()}. Without them use --loss_type "
                "pseudo_huber (the default; iCT shows it matches LPIPS without its bias)."
            ) from err
        weights = os.path.join(self.checkpoint_dir(), LPIPS_BACKBONE_FILES[net])
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"--loss_type lpips needs the torchvision {net} backbone weights at {weights}; they cannot be "
                "downloaded on this machine. Copy the file there (set TORCH_HOME to use another folder) or use "
                "--loss_type pseudo_huber."
            )
        self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False).to(device)

    @staticmethod
    def checkpoint_dir() -> str:
        return os.path.join(torch.hub.get_dir(), "checkpoints")

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        if a.shape[-1] < 224:
            a = torch.nn.functional.interpolate(a, size=224, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=224, mode="bilinear", align_corners=False)
        return self.model.to(a.device)(a, b).reshape(a.shape[0])


def make_distance(loss_type: str, huber_c: Optional[float] = None, device=None) -> Callable:
    """The distance named by `--loss_type`: l2, l1, pseudo_huber (c = 0.00054 sqrt(d) unless given) or lpips."""
    if loss_type == "l2":
        return l2
    if loss_type == "l1":
        return l1
    if loss_type == "pseudo_huber":
        return PseudoHuber(huber_c)
    if loss_type == "lpips":
        return LPIPS(device=device)
    raise ValueError(f"Unknown loss_type {loss_type!r}; choose l2, l1, pseudo_huber or lpips.")


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
    if ESTIMATOR_NEEDS_TEACHER.get(record.estimator) and teacher is None:
        raise ValueError(f"--mode {mode} distills a teacher: pass --teacher_model_name_or_path.")
    next_point = ESTIMATORS[record.estimator](teacher, settings)
    sampler = SAMPLERS[record.sampler](settings)
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
    # lcd: `teacher` is a `latent.LatentTeacher` (its raw network, noise schedule and prediction type)
    "guided_ddim_step": lambda teacher, s: _latent().GuidedDDIMStep(teacher.network, teacher.alphas_cumprod,
                                                                    teacher.prediction_type),  # fmt: skip
}
ESTIMATOR_NEEDS_TEACHER = {"teacher_ode_step": True, "guided_ddim_step": True}
SAMPLERS = {
    "karras_grid": lambda s: KarrasGridPairs(s["sigma_min"], s["sigma_max"], s["rho"], p_mean=s["p_mean"],
                                             p_std=s["p_std"]),  # fmt: skip
    "karras_grid_lognormal": lambda s: KarrasGridPairs(s["sigma_min"], s["sigma_max"], s["rho"], lognormal=True,
                                                       p_mean=s["p_mean"], p_std=s["p_std"]),  # fmt: skip
    "ect_pairs": lambda s: ECTPairs(s["sigma_min"], s["sigma_max"], s["p_mean"], s["p_std"], s["q"], s["k"], s["b"]),
    "skipping_step": lambda s: _latent().SkippingStepPairs(s["num_train_timesteps"], s["num_ddim_timesteps"]),
}
WEIGHTINGS = {"unit": unit_weight, "inverse_gap": inverse_gap_weight}
PARAMETERIZATIONS = {
    "edm": lambda teacher, s: EDMParameterization(s["sigma_min"], s["sigma_data"]),
    "lcm": lambda teacher, s: _latent().LCMParameterization(teacher.alphas_cumprod, teacher.prediction_type,
                                                            s["timestep_scaling"]),  # fmt: skip
}
