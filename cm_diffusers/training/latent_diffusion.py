"""The parts of `training/train_latent_diffusion.py`: a small Stable-Diffusion-shaped text-to-image model (VAE, CLIP
text encoder with the project's own byte-level tokenizer, UNet2DConditionModel) as one module, its two training
stages (the VAE, then the latent diffusion model with the text encoder), validation grids and the saved folder."""

import logging
import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..files import save_image_atomic
from ..images import image_grid
from .checkpoints import save_pretrained_atomic

logger = logging.getLogger(__name__)

# Stable Diffusion's noise schedule, so LCD and LCMScheduler see the family they were made for
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def _channels(text: str) -> tuple:
    return tuple(int(c) for c in text.split(","))


class LatentDiffusionModel(torch.nn.Module):
    """VAE, UNet and text encoder of a latent text-to-image model as one module, so one optimizer, one checkpoint
    and one EMA (of the UNet) cover both stages; the tokenizer is a file set, not weights."""

    def __init__(self, vae, unet, text_encoder):
        super().__init__()
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder


def build_latent_diffusion_model(args, resolution: int, channels: int, tokenizer) -> LatentDiffusionModel:
    """A small latent text-to-image model for `resolution`-pixel images: the VAE halves the size per extra level."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_channels, unet_channels = _channels(args.vae_channels), _channels(args.unet_channels)
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), block_out_channels=vae_channels,
        layers_per_block=1, norm_num_groups=min(32, vae_channels[0]), sample_size=resolution,
        mid_block_add_attention=False,  # small images: the convolutions see enough; attention costs most of a step
    )  # fmt: skip
    latent_size = resolution // 2 ** (len(vae_channels) - 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_hidden_size, intermediate_size=2 * args.text_hidden_size,
        num_attention_heads=4, num_hidden_layers=args.text_layers, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=args.latent_channels, out_channels=args.latent_channels,
        block_out_channels=unet_channels, layers_per_block=args.unet_layers_per_block,
        cross_attention_dim=args.text_hidden_size,
        # cross-attention on the coarser levels (and the middle) only: a fraction of the cost at full resolution
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=8, norm_num_groups=min(32, unet_channels[0]),
    )  # fmt: skip
    return LatentDiffusionModel(vae, unet, text_encoder)


def build_noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon", clip_sample=False)


def vae_loss(model, clean, kl_weight: float, generator):
    """Stage 1: reconstruction MSE of a posterior draw plus kl_weight x the KL per latent value."""
    posterior = model.vae.encode(clean).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=clean.device)
    reconstruction = model.vae.decode(z).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.mse_loss(reconstruction.float(), clean.float()) + kl_weight * kl


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the posterior means of a fixed batch: latents of unit variance, as SD's scaling_factor makes."""
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


def encode_captions(tokenizer, text_encoder, captions, device):
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)  # fmt: skip
    return text_encoder(ids)[0]


def diffusion_loss(model, noise_scheduler, clean, captions, tokenizer, caption_dropout: float, generator):
    """Stage 2: eps-prediction MSE in the frozen VAE's latent space, prompts through the (trained) text encoder;
    a `caption_dropout` share of prompts is emptied so classifier-free guidance has an unconditional model."""
    with torch.no_grad():
        posterior = model.vae.encode(clean).latent_dist
        noise_z = torch.randn(posterior.mean.shape, generator=generator, device=clean.device)
        latents = (posterior.mean + posterior.std * noise_z) * model.vae.config.scaling_factor
    keep = torch.rand(len(captions), generator=generator, device=clean.device) >= caption_dropout
    captions = [caption if k else "" for caption, k in zip(captions, keep.tolist())]
    embeds = encode_captions(tokenizer, model.text_encoder, captions, clean.device)
    noise = torch.randn(latents.shape, generator=generator, device=clean.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=clean.device)  # fmt: skip
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    return F.mse_loss(prediction.float(), noise.float())


def pipeline_of(vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """The parts as a StableDiffusionPipeline with SD's DDIM sampler (no safety checker: toy data)."""
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def validate(pipeline, prompts, args, global_step) -> str:
    """One image per prompt with DDIM and guidance; saves a grid under samples/."""
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(list(prompts), num_inference_steps=args.validation_inference_steps,
                      guidance_scale=args.validation_guidance_scale, output_type="np",
                      generator=torch.Generator().manual_seed(args.seed)).images  # fmt: skip
    path = os.path.join(args.output_dir, "samples", f"step_{global_step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image_atomic(image_grid(images, nrow=min(len(images), 5)), path)
    return path


def save_pipeline(pipeline, output_dir: str):
    """Writes the StableDiffusionPipeline folder atomically (the teacher `--mode lcd` distills)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in pipeline.unet.parameters())
    save_pretrained_atomic(pipeline.save_pretrained, output_dir, PIPELINE_COMPONENTS, weight_bytes)
