"""Tiny Stable-Diffusion-shaped components built from configs (no downloads): a UNet2DConditionModel, an
AutoencoderKL, a transformers CLIPTextModel and a CLIPTokenizer whose vocab.json/merges.txt the project writes."""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from cm_diffusers.latent.tokenizer import build_clip_tokenizer

CROSS_ATTENTION_DIM = 16
IMAGE_SIZE = 16  # pixels; the VAE halves it once, so latents are 4 x 8 x 8


def make_tiny_sd_components(tokenizer_dir, seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """The components of a StableDiffusionPipeline at toy size, seeded (calls repeat exactly)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    tokenizer = build_clip_tokenizer(tokenizer_dir, model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler)  # fmt: skip


def save_tiny_sd_pipeline(folder, tokenizer_dir, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A StableDiffusionPipeline folder of the tiny components (no safety checker), as a teacher for --mode lcd."""
    components = make_tiny_sd_components(tokenizer_dir, seed, prediction_type)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    return str(folder)
