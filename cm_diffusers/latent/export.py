"""What LCD saves, in the layouts plain diffusers loads:

- a full LCM: a `LatentConsistencyModelPipeline` folder (the teacher's VAE, text encoder and tokenizer, the
  w-conditioned UNet, an `LCMScheduler` made from the teacher's schedule), for `DiffusionPipeline.from_pretrained`;
- an LCM-LoRA: `pytorch_lora_weights.safetensors` in diffusers' LoRA format with its LoRA config as metadata, for
  `pipe.load_lora_weights(...)` on the teacher's pipeline with `LCMScheduler`.
"""

import os

import torch

README = "README.md"


def lcm_scheduler(teacher_scheduler_config: dict, original_inference_steps: int = 50, timestep_scaling: float = 10.0):
    """diffusers' `LCMScheduler` on the teacher's noise schedule and the distillation grid's size."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(teacher_scheduler_config, original_inference_steps=original_inference_steps,
                                    timestep_scaling=timestep_scaling)  # fmt: skip


def save_lcm_pipeline(folder, unet, teacher, original_inference_steps: int = 50, timestep_scaling: float = 10.0,
                      card: str = None):  # fmt: skip
    """Saves the distilled UNet with the teacher's other parts as a `LatentConsistencyModelPipeline` folder."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=unet,
        scheduler=lcm_scheduler(teacher.scheduler_config, original_inference_steps, timestep_scaling),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    if card is not None:
        _write(os.path.join(folder, README), card)
    return pipe


def lora_state_dict(unet) -> dict:
    """The UNet's LoRA adapter weights with peft's keys (`...to_q.lora_A.weight`), which `load_lora_weights` reads
    as they are. (Converting them to the older `lora.down`/`lora.up` names loses the attention layers on loading.)"""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lcm_lora(folder, unet, config, card: str = None):
    """Saves the adapters as `pytorch_lora_weights.safetensors` (diffusers' LoRA format, with the LoRA config as
    metadata so alpha != rank loads at the right scale); `pipe.load_lora_weights(folder)` reads it."""
    from diffusers import StableDiffusionPipeline

    weights = {name: value.detach().to("cpu", torch.float32) for name, value in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=weights,
        unet_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    if card is not None:
        _write(os.path.join(folder, README), card)


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
