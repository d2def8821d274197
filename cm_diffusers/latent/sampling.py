"""Few-step sampling of a latent consistency model (LCM, Luo et al. 2023, Algorithm 3) with the package's own math.

The same numbers as diffusers' `LatentConsistencyModelPipeline` (w-embedded LCM) and `StableDiffusionPipeline` with
`LCMScheduler` (LCM-LoRA) for the same generator (tested to 1e-5), so a served or evaluated image is the one a
diffusers user gets.
"""

from typing import Optional

import torch

from .components import LatentUNet
from .lcm import guidance_scale_embedding, lcm_consistency_output, lcm_inference_timesteps


@torch.no_grad()
def lcm_sample_latents(
    unet,
    prompt_embeds: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int = 4,
    guidance_scale: float = 8.5,
    latent_shape: Optional[tuple] = None,
    generator: Optional[torch.Generator] = None,
    negative_prompt_embeds: Optional[torch.Tensor] = None,
    prediction_type: str = "epsilon",
    original_inference_steps: int = 50,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """Multistep consistency sampling in latent space; returns the last denoised latents (B, C, h, w).

    A UNet with `time_cond_proj_dim` (LCM) embeds w = guidance_scale - 1; one without (LCM-LoRA on the teacher)
    applies ordinary classifier-free guidance against `negative_prompt_embeds` when guidance_scale > 1, as
    `StableDiffusionPipeline` does (LCM-LoRA is meant for guidance_scale 1-2).
    """
    # 1. Schedule: the skipping-step grid's evenly spaced timesteps (LCMScheduler.set_timesteps)
    num_train_timesteps = len(alphas_cumprod)
    timesteps = lcm_inference_timesteps(num_inference_steps, num_train_timesteps, original_inference_steps)
    batch_size = prompt_embeds.shape[0]
    embeds_w = unet.config.time_cond_proj_dim is not None
    use_cfg = guidance_scale > 1 and not embeds_w
    if use_cfg:
        if negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 without a w-embedding needs negative_prompt_embeds (of '').")
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    w = torch.full((batch_size,), guidance_scale - 1.0)
    network = LatentUNet(unet)

    # 2. Initial noise: x_T ~ N(0, I) (LCMScheduler.init_noise_sigma = 1), drawn like diffusers' `randn_tensor`
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    latents = torch.randn(latent_shape, generator=generator, dtype=dtype).to(device)
    denoised = latents
    for i, t in enumerate(timesteps):
        # 3. f(x_t, t), with the guidance the model was trained for
        t_batch = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
        if use_cfg:
            both = network(torch.cat([latents, latents]), torch.cat([t_batch, t_batch]), prompt_embeds)
            uncond, cond = both.chunk(2)
            model_output = uncond + guidance_scale * (cond - uncond)
        else:
            model_output = network(latents, t_batch, prompt_embeds, guidance=w if embeds_w else None)
        a_t = alphas_cumprod[t].to(device, torch.float32)
        denoised = lcm_consistency_output(model_output, latents, t, a_t, prediction_type, timestep_scaling)
        # 4. Re-noise to the next level (Algorithm 3); none after the last step
        if i + 1 < len(timesteps):
            a_next = alphas_cumprod[timesteps[i + 1]].to(device, torch.float32)
            noise = torch.randn(latents.shape, generator=generator, dtype=denoised.dtype).to(device)
            latents = a_next**0.5 * denoised + (1 - a_next) ** 0.5 * noise
    return denoised


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) from latents, as the pipelines' VAE decode and postprocess do."""
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["decode_latents", "guidance_scale_embedding", "lcm_sample_latents"]
