"""An EDM diffusion model whose UNet takes the consistency models' time input, as a self-contained diffusers pipeline.

This file is copied, unchanged, into teacher folders saved with `--edm_time_input consistency`
(`training/train_diffusion.py`), so that plain diffusers samples them correctly:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(batch_size=16, num_inference_steps=40).images

It depends on torch and diffusers only. The network was trained with t = c_noise_scale * 0.25 ln sigma (1000: OpenAI's
convention, t = 250 ln sigma, the time input of consistency models), where diffusers' EDMEulerScheduler feeds 0.25 ln
sigma; the scheduler below differs from it in that one line, so the standard diffusers loop (`scale_model_input`, the
UNet at `scheduler.timesteps`, `step`) is correct with it and wrong with a plain EDMEulerScheduler.
"""

from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor


class ConsistencyTimeEDMEulerScheduler(EDMEulerScheduler):
    """diffusers' EDMEulerScheduler for networks whose time input is c_noise = c_noise_scale * 0.25 ln sigma."""

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
        c_noise_scale: float = 1000.0,
    ):
        # The parent computes its timesteps with precondition_noise, so they carry the scale too.
        super().__init__(sigma_min, sigma_max, sigma_data, sigma_schedule, num_train_timesteps, prediction_type,
                         rho, final_sigmas_type)  # fmt: skip

    def precondition_noise(self, sigma):
        """c_noise = c_noise_scale * 0.25 ln sigma (EDM's c_noise times the scale)."""
        return super().precondition_noise(sigma) * self.config.c_noise_scale


class EDMTeacherPipeline(DiffusionPipeline):
    """Unconditional generation with an EDM-preconditioned UNet2DModel and the Euler sampler (Karras et al. 2022).

    Args:
        unet ([`UNet2DModel`]): the network F of D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).
        scheduler ([`ConsistencyTimeEDMEulerScheduler`]): the sampler; it computes the scalings and c_noise.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: ConsistencyTimeEDMEulerScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, list]] = None,
        num_inference_steps: int = 40,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Samples `batch_size` images with `num_inference_steps` Euler steps; returns an `ImagePipelineOutput`."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        # 1. Noise at sigma_max
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
        shape = (batch_size, config.in_channels, *size)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sample = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        sample = sample * self.scheduler.init_noise_sigma
        # 2. The standard diffusers loop
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(sample, t)
            model_output = self.unet(model_input, t, return_dict=False)[0]
            sample = self.scheduler.step(model_output, t, sample, generator=generator, return_dict=False)[0]
        # 3. To images
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=image) if return_dict else (image,)
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
