"""Latent consistency distillation (LCM, Luo et al. 2023; LCM-LoRA, Luo et al. 2023b) as parts of the project's one
consistency loss (`cm_diffusers.losses.ConsistencyLoss`):

- levels are DDPM timesteps (t_{n+k}, t_n) of the skipping-step DDIM grid (`SkippingStepPairs`),
- x_{t_{n+k}} = sqrt(a) x + sqrt(1 - a) z and f use LCM's scalings (`LCMParameterization`),
- the target's next point is the teacher's classifier-free-guided DDIM step (`GuidedDDIMStep`),
- the student is the full UNet with a w-embedding (`build_lcm_student`) or LoRA adapters on the teacher's UNet
  (`add_lcm_lora`), whose teacher is the same UNet with the adapters off.

`cm_diffusers.losses.build_loss("lcd", distance, teacher=..., num_train_timesteps=..., num_ddim_timesteps=...,
timestep_scaling=...)` assembles them from the mode's record, as for every mode (this module imports no loss code).
"""

from typing import Callable, Optional, Sequence

import torch

from ..parameterization import append_dims
from .components import LatentUNet
from .lcm import (
    ddim_step,
    guided,
    lcm_consistency_output,
    predicted_noise,
    predicted_original_sample,
    skipping_step_pair,
    skipping_step_timesteps,
)

# LCM-LoRA's adapted layers (diffusers' LCM-LoRA script): attention and feed-forward projections, the ResNet
# convolutions, the up/down-sampling convolutions and the time-embedding projections.
LCM_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip


class _AlphaSchedule:
    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def alpha(self, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a_t for per-sample timesteps (B,), as float32 (B, 1, 1, 1) on `like`'s device."""
        a = self.alphas_cumprod.to(timestep.device)[timestep.long()].float()
        return append_dims(a, like.ndim).to(like.device)


class LCMParameterization(_AlphaSchedule):
    """LCD's levels are DDPM timesteps: x_t = sqrt(a_t) x + sqrt(1 - a_t) z and f(x_t, t) with LCM's scalings."""

    def __init__(self, alphas_cumprod, prediction_type: str = "epsilon", timestep_scaling: float = 10.0):
        super().__init__(alphas_cumprod)
        self.prediction_type, self.timestep_scaling = prediction_type, timestep_scaling

    def add_noise(self, sample, noise, timestep):
        a = self.alpha(timestep, sample)
        return a**0.5 * sample + (1 - a) ** 0.5 * noise

    def __call__(self, model: Callable, sample, timestep, **cond):
        model_output = model(sample, timestep, **cond).float()
        a, t = self.alpha(timestep, sample), append_dims(timestep.float(), sample.ndim)
        return lcm_consistency_output(model_output, sample, t, a, self.prediction_type, self.timestep_scaling)


class SkippingStepPairs:
    """(t_{n+k}, t_n) with n ~ U{0, ..., N-1} on the N-point skipping-step DDIM grid (k = T // N).

    The timesteps come as float32 (whole numbers, exact), like the sigmas of the other modes' samplers; the UNet's
    time embedding casts them to float anyway.
    """

    def __init__(self, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50):
        self.grid = skipping_step_timesteps(num_train_timesteps, num_ddim_timesteps)

    def __call__(self, batch_size: int, levels=None, device=None, generator=None):
        index = torch.randint(0, len(self.grid), (batch_size,), generator=generator)
        start, end = skipping_step_pair(index, self.grid)
        return start.float().to(device), end.float().to(device)


class GuidedDDIMStep(_AlphaSchedule):
    """LCD's x_hat_{t_n}: one DDIM step of the teacher from t_{n+k} to t_n with guided x0 and eps,
    x0_w = x0_c + w (x0_c - x0_u), eps_w likewise (LCM eq. 9; w = 0 is the unguided teacher).

    The teacher is a raw network F(x_t, t, encoder_hidden_states=...) -> its prediction; the conditional and
    unconditional calls run as one batch of 2B.
    """

    def __init__(self, teacher: Callable, alphas_cumprod, prediction_type: str = "epsilon"):
        super().__init__(alphas_cumprod)
        self.teacher, self.prediction_type = teacher, prediction_type

    def __call__(self, x_n, timestep, timestep_next, sample, noise, encoder_hidden_states, uncond_hidden_states,
                 guidance, **_):  # fmt: skip
        both = self.teacher(
            torch.cat([x_n, x_n]),
            torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([encoder_hidden_states, uncond_hidden_states]),
        ).float()
        cond, uncond = both.chunk(2)
        a, a_next = self.alpha(timestep, x_n), self.alpha(timestep_next, x_n)
        w = append_dims(guidance.float(), x_n.ndim)
        pred_x0 = guided(*(predicted_original_sample(o, x_n, a, self.prediction_type) for o in (cond, uncond)), w)
        pred_eps = guided(*(predicted_noise(o, x_n, a, self.prediction_type) for o in (cond, uncond)), w)
        return ddim_step(pred_x0, pred_eps, a_next)


def sample_guidance(batch_size: int, w_min: float, w_max: float, generator=None) -> torch.Tensor:
    """w ~ U[w_min, w_max] per sample, in LCM's convention (diffusers' guidance_scale = w + 1)."""
    return w_min + (w_max - w_min) * torch.rand(batch_size, generator=generator)


def build_lcm_student(teacher_unet, time_cond_proj_dim: int = 256):
    """LCM's student: the teacher's UNet plus a w-embedding (`time_cond_proj_dim`), initialised from the teacher.

    The new projection of the w-embedding starts at zero, so the student starts exactly as the teacher's
    conditional prediction (diffusers' script leaves it random, which starts the student off the teacher).
    """
    from diffusers import UNet2DConditionModel

    config = teacher_unet.config
    dim = config.time_cond_proj_dim or time_cond_proj_dim
    student = UNet2DConditionModel.from_config(config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not key.startswith("time_embedding.cond_proj") for key in missing):
        raise ValueError(f"The teacher's UNet does not fit its LCM student: missing {missing}, extra {unexpected}.")
    if config.time_cond_proj_dim is None:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher_unet.device).train().requires_grad_(True)


def lora_config(rank: int = 64, alpha: Optional[float] = None, target_modules: Sequence[str] = LCM_LORA_TARGET_MODULES,
                dropout: float = 0.0):  # fmt: skip
    """peft's LoraConfig of an LCM-LoRA (rank 64, alpha = rank, LCM-LoRA's target modules by default)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules),
                      lora_dropout=dropout)  # fmt: skip


def add_lcm_lora(unet, config) -> torch.nn.Module:
    """LCM-LoRA's student: LoRA adapters (peft) on the frozen teacher UNet; only the adapters train."""
    unet.requires_grad_(False)
    unet.add_adapter(config)
    unet.train()
    return unet


def lcd_loss(loss, student: Callable, target: Callable, latents, prompt_embeds, uncond_embeds, w_min: float,
             w_max: float):  # fmt: skip
    """One LCD loss on the project's `ConsistencyLoss`: draws w, conditions student, target and teacher on it.

    `student`/`target` are raw networks (`LatentUNet`); returns (loss, statistics) as `ConsistencyLoss` does.
    """
    guidance = sample_guidance(latents.shape[0], w_min, w_max).to(latents.device)
    uncond = uncond_embeds.expand(latents.shape[0], *uncond_embeds.shape[1:])
    loss_value, logs = loss(student, target, latents, None, encoder_hidden_states=prompt_embeds,
                            uncond_hidden_states=uncond, guidance=guidance)  # fmt: skip
    logs["guidance_mean"] = guidance.mean()
    return loss_value, logs


__all__ = [
    "LCM_LORA_TARGET_MODULES", "GuidedDDIMStep", "LCMParameterization", "LatentUNet", "SkippingStepPairs",
    "add_lcm_lora", "build_lcm_student", "lcd_loss", "lora_config", "sample_guidance",
]  # fmt: skip
