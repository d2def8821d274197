"""Latent consistency distillation (LCM and LCM-LoRA) of Stable-Diffusion-shaped text-to-image teachers.

Needs the `lcd` extra (`pip install cm_diffusers[lcd]`: transformers and peft).
"""

from .components import AdaptersDisabled, LatentTeacher, LatentUNet, encode_images, encode_prompt, load_latent_teacher
from .distill import (
    LCM_LORA_TARGET_MODULES,
    GuidedDDIMStep,
    LCMParameterization,
    SkippingStepPairs,
    add_lcm_lora,
    build_lcm_student,
    lcd_loss,
    lora_config,
    sample_guidance,
)
from .export import lcm_scheduler, save_lcm_lora, save_lcm_pipeline
from .sampling import decode_latents, lcm_sample_latents

__all__ = [
    "LCM_LORA_TARGET_MODULES", "AdaptersDisabled", "GuidedDDIMStep", "LCMParameterization", "LatentTeacher",
    "LatentUNet", "SkippingStepPairs", "add_lcm_lora", "build_lcm_student", "decode_latents",
    "encode_images", "encode_prompt", "lcd_loss", "lcm_sample_latents", "lcm_scheduler", "load_latent_teacher",
    "lora_config", "sample_guidance", "save_lcm_lora", "save_lcm_pipeline",
]  # fmt: skip
