"""The training modes, one record each: everything `--mode NAME` means, read by the loss (`losses.build_loss`,
`losses.Curriculum`), the training script (flag defaults, help text, teacher checks, the saved pipeline's schedules)
and the model card (Hub tag, method, loss and settings).

A record names its parts (estimator of the target, sampler of levels or times, weighting), which `cm_diffusers.losses`
implements, and holds its curriculum, flag defaults and card text. A new mode is a new entry here plus any new part;
never a new loop and never an `if mode == ...` elsewhere. This module imports no loss code, so the losses, the script
and the card can all read it.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

from .parameterization import ct_num_scales, ct_target_ema, ect_stage, ict_num_scales


@dataclass(frozen=True)
class Levels:
    """The training schedule at one global step: grid size N(k), target EMA rate mu(k), ECT stage, and sCM's tangent
    warm-up ratio r (Lu & Song 2024: r goes from 0 to 1 over the first H steps)."""

    num_scales: int
    target_ema: float
    stage: int = 0
    tangent_warmup: float = 1.0


class Mode(NamedTuple):
    """What one `--mode` is. The first two fields are the Hub tag and the card's description of the method."""

    tag: str  # the model card's Hub tag
    description: str  # the card's "method" row and summary
    help: str  # its line in `train_consistency.py --help`
    teacher: str  # "distill": the loss evaluates it; "init": its weights start the student (required); "optional"
    defaults: dict  # flag values `--mode` expands into; a flag given explicitly wins
    estimator: str  # the target's estimator, a name of `losses.ESTIMATORS`
    sampler: str  # how noise levels or times are drawn, a name of `losses.SAMPLERS`
    weighting: str  # the loss weighting, a name of `losses.WEIGHTINGS`
    weighting_text: str  # the card's description of that weighting
    levels: Callable  # (curriculum, step) -> Levels: the schedule of one step
    target_ema: Callable  # (curriculum) -> whether the target network is an EMA copy (else stop-grad of online)
    card_settings: Callable  # (args, final Levels) -> {name: value} for the card's training table
    sampling: str  # "grid": sampled by grid `timesteps`; "sigmas": continuous levels, sampled by sigmas; "trigflow":
    # a TrigFlow model (`TrigFlowSCMScheduler`); "lcm": a latent model sampled by diffusers' LCMScheduler
    loss: str = "consistency"  # "consistency": the discrete loss (`losses.ConsistencyLoss`); "trigflow": sCM's loss
    parameterization: str = "edm"  # how levels noise x and scale f, a name of `losses.PARAMETERIZATIONS`
    space: str = "pixel"  # "latent": a text-to-image latent model; `cm_diffusers.training.latent` builds its parts


# ----------------------------------------------------------------------------------------------------------------
# The parts of the records


def _fixed_grid(curriculum, step) -> Levels:
    return Levels(curriculum.num_scales, curriculum.target_ema)


def _ct_levels(curriculum, step) -> Levels:
    num_scales = ct_num_scales(step, curriculum.total_steps, curriculum.s0, curriculum.s1)
    return Levels(num_scales, ct_target_ema(num_scales, curriculum.s0, curriculum.mu0))


def _ict_levels(curriculum, step) -> Levels:
    return Levels(ict_num_scales(step, curriculum.total_steps, curriculum.s0, curriculum.s1), 0.0)


def _ect_levels(curriculum, step) -> Levels:
    return Levels(0, 0.0, ect_stage(step, curriculum.total_steps, curriculum.num_stages))


def _tangent_warmup(curriculum, step) -> Levels:
    """sCM: r = min(1, step / H) over the first H = tangent_warmup_steps steps; no grid, no target EMA."""
    warmup = curriculum.tangent_warmup_steps
    return Levels(0, 0.0, tangent_warmup=min(1.0, step / warmup) if warmup > 0 else 1.0)


def _never(curriculum) -> bool:
    return False


def _scm_card_settings(args, final) -> dict:
    settings = dict(p_mean=args.p_mean, p_std=args.p_std, time_input=args.time_input,
                    tangent_warmup_steps=args.tangent_warmup_steps, tangent_norm_c=args.tangent_norm_c,
                    adaptive_weighting=args.adaptive_weighting, prior_weighting=args.prior_weighting)  # fmt: skip
    if args.mode == "scd":
        settings.update(teacher_clip_denoised=args.teacher_clip_denoised)
    return settings


# sCM's squared L2 on F and its weighting, as the card names them
_SCM_WEIGHTING = "squared L2 on F; e^{-w(t)}, w(t) a learned log-variance (see adaptive_weighting, prior_weighting)"
_SCM_DEFAULTS = dict(learning_rate=1e-4, loss_type="l2", dropout=0.0, p_mean=-1.0, p_std=1.4, tangent_norm_c=0.1,
                     tangent_warmup_steps=1000, adaptive_weighting=True, time_input="auto")  # fmt: skip


def _scm_mode(tag: str, description: str, help: str, teacher: str, estimator: str) -> Mode:
    """sCT and sCD: one TrigFlow loss, times, weighting and warm-up; only the tangent (the estimator) differs."""
    return Mode(tag=tag, description=description, help=help, teacher=teacher, defaults=dict(_SCM_DEFAULTS),
                estimator=estimator, sampler="trigflow_lognormal", weighting="adaptive", weighting_text=_SCM_WEIGHTING,
                levels=_tangent_warmup, target_ema=_never, card_settings=_scm_card_settings, sampling="trigflow",
                loss="trigflow")


# ----------------------------------------------------------------------------------------------------------------
# The table. Defaults are CIFAR-10 paper values (Song et al. 2023 for cd/ct, Song & Dhariwal 2023 for ict, Geng et
# al. 2024 for ect); pseudo-Huber replaces LPIPS, whose backbone weights cannot be downloaded here (iCT shows
# pseudo-Huber matches it).

MODES = {
    "cd": Mode(
        tag="consistency-distillation",
        description="consistency distillation (CD) from a pretrained diffusion model",
        help="distill a diffusion teacher: one Heun/Euler PF-ODE step of the teacher (Song et al. 2023)",
        teacher="distill",
        defaults=dict(num_scales=18, target_ema_decay=0.0, learning_rate=4e-4, loss_type="pseudo_huber", dropout=0.0),
        levels=_fixed_grid,
        target_ema=lambda curriculum: curriculum.target_ema > 0,
        estimator="teacher_ode_step",
        sampler="karras_grid",
        weighting="unit",
        weighting_text="1",
        card_settings=lambda args, final: dict(num_scales=args.num_scales, ode_solver=args.ode_solver,
                                               target_ema_decay=args.target_ema_decay,
                                               teacher_clip_denoised=args.teacher_clip_denoised),  # fmt: skip
        sampling="grid",
    ),
    "ct": Mode(
        tag="consistency-training",
        description="consistency training (CT) from data alone, without a teacher",
        help="train from data alone: x_hat_{n+1} = x + sigma_{n+1} z, curriculum N(k) and target EMA mu(k)",
        teacher="optional",
        defaults=dict(s0=2, s1=150, mu0=0.9, learning_rate=4e-4, loss_type="pseudo_huber", dropout=0.0),
        levels=_ct_levels,
        target_ema=lambda curriculum: True,
        estimator="data_point",
        sampler="karras_grid",
        weighting="unit",
        weighting_text="1",
        card_settings=lambda args, final: dict(s0=args.s0, s1=args.s1, final_num_scales=final.num_scales,
                                               mu0=args.mu0),  # fmt: skip
        sampling="grid",
    ),
    "ict": Mode(
        tag="improved-consistency-training",
        description="improved consistency training (iCT, Song & Dhariwal 2023)",
        help="improved CT (Song & Dhariwal 2023): pseudo-Huber, 1/(sigma_n - sigma_{n+1}) weights, lognormal noise "
        "levels, doubling curriculum, no EMA target, dropout",
        teacher="optional",
        defaults=dict(s0=10, s1=1280, learning_rate=1e-4, loss_type="pseudo_huber", dropout=0.3),
        levels=_ict_levels,
        target_ema=_never,
        estimator="data_point",
        sampler="karras_grid_lognormal",
        weighting="inverse_gap",
        weighting_text="1/(sigma_n - sigma_{n+1})",
        card_settings=lambda args, final: dict(s0=args.s0, s1=args.s1, final_num_scales=final.num_scales,
                                               p_mean=args.p_mean, p_std=args.p_std),  # fmt: skip
        sampling="grid",
    ),
    "ect": Mode(
        tag="easy-consistency-tuning",
        description="easy consistency tuning (ECT, Geng et al. 2024) of a diffusion model",
        help="easy consistency tuning (Geng et al. 2024): start from a diffusion model's UNet, continuous sigma and a "
        "gap sigma - r that shrinks stage by stage",
        teacher="init",
        defaults=dict(learning_rate=1e-4, loss_type="pseudo_huber", dropout=0.2),
        levels=_ect_levels,
        target_ema=_never,
        estimator="data_point",
        sampler="ect_pairs",
        weighting="inverse_gap",
        weighting_text="1/(sigma_n - sigma_{n+1})",
        card_settings=lambda args, final: dict(p_mean=args.p_mean, p_std=args.p_std, q=args.ect_q, k=args.ect_k,
                                               b=args.ect_b, num_stages=args.ect_num_stages),  # fmt: skip
        sampling="sigmas",
    ),
    "sct": _scm_mode(
        tag="continuous-time-consistency-training",
        description="continuous-time consistency training (sCT, Lu & Song 2024) in TrigFlow",
        help="continuous-time CT (Lu & Song 2024): TrigFlow times, the JVP of the network along the data tangent "
        "cos(t) z - sin(t) x0, tangent normalisation and warm-up, learned adaptive weighting",
        teacher="optional",
        estimator="data_tangent",
    ),
    "scd": _scm_mode(
        tag="continuous-time-consistency-distillation",
        description="continuous-time consistency distillation (sCD, Lu & Song 2024) in TrigFlow",
        help="continuous-time CD (Lu & Song 2024): as sct, with the teacher's PF-ODE tangent sigma_d F_teacher "
        "(any EDM or DDPM teacher) in place of the data tangent",
        teacher="distill",
        estimator="teacher_tangent",
    ),
    "lcd": Mode(
        tag="latent-consistency-distillation",
        description="latent consistency distillation (LCM, Luo et al. 2023) of a text-to-image latent diffusion model",
        help="latent consistency distillation (LCM) of a Stable-Diffusion-shaped text-to-image teacher: one "
        "classifier-free-guided DDIM step of the teacher over a skipping-step grid of --num_scales DDIM timesteps "
        "in its VAE latent space, guidance w drawn from [--w_min, --w_max]; the student is the full UNet with a "
        "w-embedding (--lcd_student lcm) or LoRA adapters on the teacher's UNet (--lcd_student lora)",
        teacher="distill",
        defaults=dict(num_scales=50, learning_rate=1e-4, loss_type="l2", dropout=0.0),
        levels=_fixed_grid,
        target_ema=lambda curriculum: curriculum.target_ema > 0,
        estimator="guided_ddim_step",
        sampler="skipping_step",
        weighting="unit",
        weighting_text="1",
        card_settings=lambda args, final: dict(student=args.lcd_student, num_ddim_timesteps=args.num_scales,
                                               w_min=args.w_min, w_max=args.w_max,
                                               timestep_scaling=args.timestep_scaling,
                                               target_ema_decay=args.target_ema_decay),  # fmt: skip
        sampling="lcm",
        parameterization="lcm",
        space="latent",
    ),
}


def get_mode(name: str) -> Mode:
    """The record of `name`, or a ValueError listing the modes."""
    if name not in MODES:
        raise ValueError(f"Unknown mode {name!r}; choose one of {', '.join(MODES)}.")
    return MODES[name]
