"""Text-to-image generation with a distilled latent model, through plain diffusers: an LCM pipeline folder, or a
teacher folder plus LCM-LoRA weights with `LCMScheduler` (what `cm-diffusers generate --prompt` runs)."""

import os
from typing import Optional

import numpy as np
import torch

MAX_PROMPT_CHARACTERS = 1000
DEFAULT_STEPS = 4  # LCMScheduler steps when none are asked for: generate --prompt, the API


def check_text_to_image(model: str, lora: Optional[str] = None):
    """Refuses, before any weights load, what `load_text_to_image` could not sample: the `lcd` extra missing, a
    LoRA that is neither a folder, a shipped name nor a Hub id, and a model that is not an LCM without a LoRA."""
    import importlib.util

    from diffusers import DiffusionPipeline

    from ..shipped_models import resolve_pretrained

    needed = ("transformers", "peft") if lora else ("transformers",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"Text-to-image models need {' and '.join(missing)}: pip install 'cm_diffusers[lcd]'.")
    if lora is not None:
        lora = resolve_pretrained(lora)
        if not os.path.isdir(lora) and lora.count("/") != 1:
            raise FileNotFoundError(f"--lora {lora!r}: no such folder (pass an LCM-LoRA folder, a Hub repo id or a "
                                    "shipped name such as fashion-mnist-lcm-lora).")  # fmt: skip
        return
    scheduler = (DiffusionPipeline.load_config(resolve_pretrained(model)).get("scheduler") or [None, None])[1]
    if scheduler != "LCMScheduler":
        raise ValueError(f"{model} samples with {scheduler}, not LCMScheduler: pass the LCM-LoRA with --lora, or an "
                         "LCM folder.")  # fmt: skip


def load_text_to_image(model: str, lora: Optional[str] = None, dtype=torch.float32, device="cpu"):
    """The diffusers pipeline of `model`; with `lora`, its scheduler becomes LCMScheduler and the adapters load."""
    from diffusers import DiffusionPipeline, LCMScheduler

    from ..shipped_models import resolve_pretrained

    check_text_to_image(model, lora)
    model, lora = resolve_pretrained(model), (None if lora is None else resolve_pretrained(lora))  # shipped names
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(f"--prompt needs a text-to-image model (a text encoder and tokenizer); {model} has none.")
    if lora is not None:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_text_to_image(model: str) -> bool:
    """Whether the pipeline folder (or Hub repo id) `model` has a text encoder and a tokenizer (its model_index.json
    names both), i.e. is what `load_text_to_image` loads."""
    from diffusers import DiffusionPipeline

    from ..shipped_models import resolve_pretrained

    config = DiffusionPipeline.load_config(resolve_pretrained(model))
    named = [config.get(name) for name in ("text_encoder", "tokenizer")]
    return all(isinstance(entry, list) and None not in entry for entry in named)


def check_prompts(prompts, num_images: int) -> list:
    """One prompt, or one per image; each non-empty and at most MAX_PROMPT_CHARACTERS long."""
    if len(prompts) not in (1, num_images):
        raise ValueError(f"Give 1 prompt or {num_images} (one per image), got {len(prompts)}.")
    for prompt in prompts:
        if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARACTERS:
            raise ValueError(f"A prompt must hold 1 to {MAX_PROMPT_CHARACTERS} characters, not only spaces; got "
                             f"{len(prompt)}.")
    return prompts * num_images if len(prompts) == 1 else list(prompts)


def default_guidance_scale(pipe) -> float:
    """The LCM's training midpoint for a w-embedded UNet (8.5, diffusers' pipeline default); 1 (no guidance) for
    LCM-LoRA, as LCM-LoRA is meant to be sampled."""
    return 8.5 if pipe.unet.config.time_cond_proj_dim is not None else 1.0


def generate(pipe, prompts, num_inference_steps: int = DEFAULT_STEPS, guidance_scale: Optional[float] = None,
             seed: int = 0, batch_size: int = 64) -> np.ndarray:  # fmt: skip
    """Images (N, H, W, C) in [0, 1] for `prompts`, in batches, from one seeded generator (same seed, same images);
    guidance_scale defaults to `default_guidance_scale(pipe)`."""
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(pipe)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        out = pipe(list(prompts[start:start + batch_size]), num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=generator, output_type="np")  # fmt: skip
        images.append(out.images)
    return np.concatenate(images)
