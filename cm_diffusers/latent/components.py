"""A Stable-Diffusion-shaped teacher folder as the parts latent consistency distillation needs.

`LatentTeacher` holds the frozen VAE, text encoder, tokenizer and UNet of any `StableDiffusionPipeline`-shaped folder
(or Hub repo) and its noise schedule; `encode_prompt` and `encode_images` are what diffusers' pipelines and LCM
scripts do (tested against them), and `LatentUNet` turns a `UNet2DConditionModel` into the raw network
F(x_t, t, **cond) the consistency loss calls.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .lcm import PREDICTION_TYPES, guidance_scale_embedding

REQUIRED_COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "a transformers text encoder (CLIPTextModel)",
    "tokenizer": "a transformers tokenizer (CLIPTokenizer)",
    "scheduler": "a DDPM-family scheduler (DDPM, DDIM, PNDM, ...)",
}


@dataclass
class LatentTeacher:
    """The frozen parts of a latent text-to-image teacher and its DDPM noise schedule."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    alphas_cumprod: torch.Tensor  # float64, (num_train_timesteps,)
    prediction_type: str
    network: Optional[Callable] = None  # the raw teacher F(x_t, t, encoder_hidden_states): its UNet by default

    def __post_init__(self):
        if self.network is None:
            self.network = LatentUNet(self.unet)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device):
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self


def load_latent_teacher(path: str, revision: Optional[str] = None, dtype=torch.float32) -> LatentTeacher:
    """Loads a `StableDiffusionPipeline`-shaped folder or Hub repo; a clear error names what is missing."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    pipe = DiffusionPipeline.from_pretrained(path, revision=revision, dtype=dtype, safety_checker=None)
    components = pipe.components
    missing = [f"{name} ({kind})" for name, kind in REQUIRED_COMPONENTS.items() if components.get(name) is None]
    if missing:
        raise ValueError(
            f"--mode lcd needs a Stable-Diffusion-shaped teacher (model_index.json with unet, vae, text_encoder, "
            f"tokenizer, scheduler); {path} has no {', '.join(missing)}."
        )
    if not isinstance(pipe.unet, UNet2DConditionModel) or not isinstance(pipe.vae, AutoencoderKL):
        raise ValueError(
            f"--mode lcd needs a UNet2DConditionModel and an AutoencoderKL; {path} has "
            f"{type(pipe.unet).__name__} and {type(pipe.vae).__name__}."
        )
    config = dict(pipe.scheduler.config)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"The teacher's scheduler predicts {prediction_type!r}; LCD supports {PREDICTION_TYPES}.")
    # The DDPM schedule from the teacher's own config (betas, zero-SNR rescaling), as diffusers' LCM scripts take it.
    alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod.double()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return LatentTeacher(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, config, alphas_cumprod,
                         prediction_type)  # fmt: skip


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompts) -> torch.Tensor:
    """Text embeddings (B, L, D) of prompts exactly as `StableDiffusionPipeline.encode_prompt` computes them."""
    inputs = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = inputs.attention_mask.to(device) if use_mask else None
    return text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """Latents z = scaling_factor * (a draw from the VAE posterior) of images in [-1, 1], as LCM's scripts encode."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
    # contiguous: the VAE's convolutions may hand back another memory layout, and the loss's randn_like follows it
    return latents.float().contiguous() * vae.config.scaling_factor


class LatentUNet:
    """A `UNet2DConditionModel` as the raw network F(x_t, t, encoder_hidden_states, guidance) of the loss.

    A UNet with `time_cond_proj_dim` (LCM's w-conditioned student) gets the guidance scale w embedded as
    `timestep_cond`, exactly as `LatentConsistencyModelPipeline` does with w = guidance_scale - 1; others ignore w.
    """

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, sample, timestep, encoder_hidden_states, guidance=None, class_labels=None, **_):
        if class_labels is not None:
            raise ValueError("A text-conditioned latent model takes prompts, not class labels.")
        config = getattr(self.unet, "module", self.unet).config  # DDP-wrapped or not
        timestep_cond = None
        if config.time_cond_proj_dim is not None:
            if guidance is None:
                raise ValueError("This UNet embeds the guidance scale w (time_cond_proj_dim): pass guidance.")
            timestep_cond = guidance_scale_embedding(guidance, config.time_cond_proj_dim).to(sample)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         timestep_cond=timestep_cond).sample  # fmt: skip


class AdaptersDisabled:
    """The teacher inside a LoRA student: the same UNet with its adapters switched off for the call (LCM-LoRA)."""

    def __init__(self, unet):
        self.unet = unet
        self.network = LatentUNet(unet)

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.network(*args, **kwargs)
        finally:
            self.unet.enable_adapters()
