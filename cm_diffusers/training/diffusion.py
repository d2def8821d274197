"""The diffusion-model parts of `training/train_diffusion.py`: the UNet and its noise schedule, one loss per model
type, validation sampling and the saved pipeline folder."""

import json
import os

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..images import save_image_grid
from ..parameterization import append_dims, edm_loss_weight
from .checkpoints import save_pretrained_atomic
from .runtime import default_unet_config

# ----------------------------------------------------------------------------------------------------------------
# Model and noise schedule


def build_unet(args, resolution: int, channels: int, num_class_embeds) -> UNet2DModel:
    if args.unet_config is None:
        return UNet2DModel(**default_unet_config(resolution, channels, num_class_embeds))
    with open(args.unet_config) as f:
        config = json.load(f)
    unet = UNet2DModel.from_config(config)
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise ValueError(f"--unet_config has {unet.config.in_channels} channels but the data has {channels}.")
    if unet.config.sample_size not in (None, resolution):
        raise ValueError(f"--unet_config has sample_size {unet.config.sample_size} but the data is {resolution} px.")
    if num_class_embeds is not None and unet.config.num_class_embeds != num_class_embeds:
        raise ValueError(f"--class_conditional needs num_class_embeds={num_class_embeds} in --unet_config.")
    return unet


def build_noise_scheduler(args):
    if args.model_type == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=args.ddpm_num_steps,
            beta_schedule=args.ddpm_beta_schedule,
            prediction_type=args.prediction_type,
        )
    if args.edm_time_input == "consistency":
        from ..teachers import ConsistencyTimeEDMEulerScheduler

        return ConsistencyTimeEDMEulerScheduler(
            sigma_min=args.sigma_min, sigma_max=args.sigma_max, sigma_data=args.sigma_data, c_noise_scale=1000.0
        )
    return EDMEulerScheduler(sigma_min=args.sigma_min, sigma_max=args.sigma_max, sigma_data=args.sigma_data)


# ----------------------------------------------------------------------------------------------------------------
# Losses: one function per model type, same signature


def ddpm_loss(model, noise_scheduler, clean, class_labels, generator):
    """DDPM: x_t = sqrt(a_t) x + sqrt(1 - a_t) eps at a uniform timestep; MSE against eps or v."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=clean.device
    )
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    model_output = model(noisy, timesteps, class_labels=class_labels).sample
    return F.mse_loss(model_output.float(), target.float())


def edm_loss(model, noise_scheduler, clean, class_labels, generator, p_mean=-1.2, p_std=1.2):
    """EDM (Karras et al. 2022, eq. 8, table 1): ln sigma ~ N(P_mean, P_std^2), weight (sigma^2+sd^2)/(sigma sd)^2."""
    sigma_data = noise_scheduler.config.sigma_data
    log_sigma = p_mean + p_std * torch.randn(clean.shape[0], generator=generator, device=clean.device)
    sigma = log_sigma.exp()
    noise = torch.randn(clean.shape, generator=generator, device=clean.device)
    sigma_b = append_dims(sigma, clean.ndim)
    noisy = clean + sigma_b * noise
    model_output = model(
        noise_scheduler.precondition_inputs(noisy, sigma_b),
        noise_scheduler.precondition_noise(sigma),
        class_labels=class_labels,
    ).sample
    denoised = noise_scheduler.precondition_outputs(noisy, model_output.float(), sigma_b)
    weight = edm_loss_weight(sigma_b, sigma_data)
    return (weight * (denoised - clean) ** 2).mean()


def loss_for(args):
    """loss(model, noise_scheduler, clean, class_labels, generator) of --model_type."""
    if args.model_type == "ddpm":
        return ddpm_loss

    def loss(model, noise_scheduler, clean, class_labels, generator):
        return edm_loss(model, noise_scheduler, clean, class_labels, generator, args.p_mean, args.p_std)

    return loss


# ----------------------------------------------------------------------------------------------------------------
# Sampling, saving


@torch.no_grad()
def sample_images(unet, scheduler, num_images, num_inference_steps, generator, class_labels=None):
    """The standard diffusers sampling loop; works for DDIMScheduler and EDMEulerScheduler alike."""
    scheduler.set_timesteps(num_inference_steps)
    config = unet.config
    shape = (num_images, config.in_channels, config.sample_size, config.sample_size)
    sample = randn_tensor(shape, generator=generator, device=unet.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        model_output = unet(model_input, t.to(unet.device), class_labels=class_labels).sample
        sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
    return sample.clamp(-1, 1)


def validate(accelerator, unet, noise_scheduler, args, global_step, class_count):
    """A grid of DDIM (DDPM) or EDM-Euler samples from the evaluation weights `unet`, saved as PNG and logged."""
    if args.model_type == "ddpm":
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    else:
        scheduler = type(noise_scheduler).from_config(noise_scheduler.config)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    class_labels = None
    if class_count is not None:
        class_labels = torch.arange(args.num_validation_images, device=accelerator.device) % class_count
    images = sample_images(
        unet, scheduler, args.num_validation_images, args.validation_inference_steps, generator, class_labels
    )
    path = os.path.join(args.output_dir, "samples", f"step-{global_step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid = save_image_grid((images.float().cpu() + 1) / 2, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", torch.from_numpy(_hwc(grid)), global_step, dataformats="HWC")
    return path


def _hwc(image):
    import numpy as np

    array = np.array(image)  # a writable copy
    return array[..., None] if array.ndim == 2 else array


def save_pipeline(unet, noise_scheduler, output_dir: str, model_type: str):
    """Writes the diffusers folder through a temporary sibling, each component renamed into place when complete (the
    index last); a failed write (a full disk) leaves the previous pipeline intact and says what was needed."""
    edm_teacher = type(noise_scheduler).__name__ == "ConsistencyTimeEDMEulerScheduler"
    components = ("unet", "scheduler")
    if model_type == "ddpm":
        components += ("model_index.json",)
    elif edm_teacher:
        from ..teachers import EDM_TEACHER_PIPELINE_FILE

        components += (EDM_TEACHER_PIPELINE_FILE, "model_index.json")
    needed = sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters())
    save_pretrained_atomic(lambda folder: write_pipeline_files(unet, noise_scheduler, folder, model_type), output_dir,
                           components, needed_bytes=needed)


def write_pipeline_files(unet, noise_scheduler, folder: str, model_type: str):
    """Writes the pipeline's files into `folder`: a DDPMPipeline, or an EDM model's unet/ and scheduler/."""
    if model_type == "ddpm":
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(folder)
        return
    # diffusers has no unconditional EDM pipeline class to name in a model_index.json: the folder holds the two
    # components (like OpenAI's converted EDM teachers), read by cm_diffusers.load_teacher or by
    # UNet2DModel / EDMEulerScheduler.from_pretrained(folder, subfolder=...).
    unet.save_pretrained(os.path.join(folder, "unet"))
    noise_scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    if type(noise_scheduler).__name__ == "ConsistencyTimeEDMEulerScheduler":
        # diffusers' EDMEulerScheduler would feed this network 0.25 ln sigma: ship the pipeline code that samples it
        # correctly, which plain DiffusionPipeline.from_pretrained runs only with trust_remote_code=True.
        from ..teachers import write_edm_teacher_pipeline_files

        write_edm_teacher_pipeline_files(folder)
