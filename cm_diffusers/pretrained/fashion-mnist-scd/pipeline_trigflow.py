"""A continuous-time consistency model (sCT / sCD, Lu & Song 2024) in TrigFlow, as a self-contained diffusers pipeline.

This file is copied, unchanged, into the folders `train_consistency.py --mode sct|scd` saves, so that plain diffusers
samples them:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(batch_size=16).images                            # 1 step from t_max = arctan(sigma_max / sigma_d)
    images = pipe(batch_size=16, num_inference_steps=2).images     # 2 steps through the intermediate time
    images = pipe(batch_size=16, timesteps=[1.5645, 1.1]).images   # explicit TrigFlow times, descending

It depends on torch and diffusers only. The loop is diffusers' SCMScheduler loop (SANA-Sprint's): x = sigma_d z at the
first time; model_output = sigma_d F(x / sigma_d, c_noise(t)); `scheduler.step` returns x0 = cos(s) x - sin(s)
model_output and x0 re-noised to the next time. `TrigFlowSCMScheduler` adds to SCMScheduler what this UNet needs: the
start sigma_max (SCMScheduler's default start is pi/2, sigma = infinity, where the network never trained), the
network's time input c_noise(t), and the intermediate time of 2-step sampling. cm_diffusers' ConsistencyPipeline
samples the same folder through its own loop and gives the same images for the same generator.
"""

import math
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SCMScheduler, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

TIME_INPUTS = ("t", "log_sigma", "edm_log_sigma")


class TrigFlowSCMScheduler(SCMScheduler):
    """
    diffusers' `SCMScheduler` (TrigFlow, `prediction_type="trigflow"`) with the settings of one trained UNet.

    Args:
        num_train_timesteps, prediction_type, sigma_data: as in `SCMScheduler`.
        sigma_min (`float`): The lowest EDM noise level sigma = sigma_d tan(t) a schedule may reach.
        sigma_max (`float`): Where sampling starts: t_max = arctan(sigma_max / sigma_d) (80 -> 1.56454).
        time_input (`str`): The network's time input c_noise(t): `"t"` (1000 t), `"log_sigma"` (250 ln sigma) or
            `"edm_log_sigma"` (0.25 ln sigma).
        intermediate_timesteps (`float`): The second time of 2-step sampling.
        clip_denoised (`bool`): Clamp each step's x0 to [-1, 1] before re-noising (SCMScheduler does not, so False).
        s_noise (`float`): Scale of the noise between steps (1: the TrigFlow marginal).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        prediction_type: str = "trigflow",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        time_input: str = "t",
        intermediate_timesteps: float = 1.1,
        clip_denoised: bool = False,
        s_noise: float = 1.0,
    ):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"Unknown time_input {time_input!r}; choose one of {', '.join(TIME_INPUTS)}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
        super().__init__(num_train_timesteps, prediction_type, sigma_data)

    @property
    def max_timesteps(self) -> float:
        """t_max = arctan(sigma_max / sigma_d): the first time of every default schedule."""
        return math.atan(self.config.sigma_max / self.config.sigma_data)

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """c_noise(t), in float32 at least (the time embedding must not run in half precision)."""
        t = t if t.dtype == torch.float64 else t.float()
        if self.config.time_input == "t":
            return 1000.0 * t
        log_sigma = torch.log(self.config.sigma_data * torch.tan(t))
        return (250.0 if self.config.time_input == "log_sigma" else 0.25) * log_sigma

    def trigflow_times(self, num_inference_steps: Optional[int] = 1, timesteps: Optional[List[float]] = None) -> list:
        """The descending TrigFlow times of a request, one per network evaluation: the given `timesteps` (within
        [arctan(sigma_min / sigma_d), t_max]), or from t_max: 1 step [t_max], 2 steps [t_max,
        intermediate_timesteps], n steps SCMScheduler's linspace(t_max, 0, n + 1) without its final 0."""
        t_max = self.max_timesteps
        if timesteps is None:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.config.num_train_timesteps:
                raise ValueError(f"`num_inference_steps` must be an integer in [1, {self.config.num_train_timesteps}]"
                                 f", got {n!r}.")  # fmt: skip
            if n == 2:
                return [t_max, float(self.config.intermediate_timesteps)]
            return torch.linspace(t_max, 0, n + 1, dtype=torch.float64)[:-1].tolist()
        times = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
        t_min = math.atan(self.config.sigma_min / self.config.sigma_data)
        if not times or any(b >= a for a, b in zip(times, times[1:])) or any(not math.isfinite(t) for t in times):
            raise ValueError(f"`timesteps` must be strictly descending TrigFlow times, got {times}.")
        if times[-1] < t_min - 1e-7 or times[0] > t_max + 1e-6:
            raise ValueError(f"`timesteps` must lie in [{t_min:.6g}, {t_max:.6g}] (sigma in [sigma_min, sigma_max] "
                             f"of this model), got {times}.")  # fmt: skip
        return times


class TrigFlowPipeline(DiffusionPipeline):
    """
    Unconditional or class-conditional generation with a TrigFlow consistency model f(x_t, t) = cos(t) x_t - sin(t)
    sigma_d F(x_t / sigma_d, c_noise(t)).

    Args:
        unet ([`UNet2DModel`]): The network F.
        scheduler ([`TrigFlowSCMScheduler`]): The sampler and the model's settings.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: TrigFlowSCMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: Optional[Union[torch.Tensor, List[int], int]] = None,
        num_inference_steps: int = 1,
        timesteps: Optional[List[float]] = None,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Samples `batch_size` images in `num_inference_steps` network evaluations (or at the TrigFlow
        `timesteps`); `latents` are standard normal noise. Returns an `ImagePipelineOutput`."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        scheduler, sigma_d = self.scheduler, self.scheduler.config.sigma_data
        # 1. Times: the request's, then 0 (SCMScheduler's custom schedule ends there)
        times = scheduler.trigflow_times(num_inference_steps if timesteps is None else None, timesteps)
        scheduler.set_timesteps(len(times), timesteps=times + [0.0], device=self.device, max_timesteps=None,
                                intermediate_timesteps=None)  # fmt: skip
        # 2. Noise x = sigma_d z at the first time, then class labels (the order cm_diffusers draws them in)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        sample = latents.to(self.device, self.unet.dtype) * sigma_d
        num_classes = self.unet.config.num_class_embeds
        if num_classes is not None and class_labels is None:
            gen_device = generator.device if generator is not None else "cpu"
            class_labels = torch.randint(0, num_classes, (batch_size,), generator=generator, device=gen_device)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).to(self.device, torch.long)
            class_labels = labels.expand(batch_size) if labels.numel() == 1 else labels
        # 3. SCMScheduler's loop
        for t in self.progress_bar(scheduler.timesteps[:-1]):
            c_noise = scheduler.time_input(t).expand(batch_size).to(self.device)
            model_output = sigma_d * self.unet(sample / sigma_d, c_noise, class_labels=class_labels).sample
            sample, denoised = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)
            if scheduler.config.clip_denoised:  # step re-noised the raw x0: put the clamped one in its place
                t_next = scheduler.timesteps[scheduler.step_index]
                sample = sample + torch.cos(t_next) * (denoised.clamp(-1, 1) - denoised)
        # 4. Images
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=image) if return_dict else (image,)
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
