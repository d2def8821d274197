"""The latent-space parts of `training/train_consistency.py` (`--mode lcd`, latent consistency distillation).

The same functions as `cm_diffusers.training.consistency` (teacher, student, losses, the saved pipeline's scheduler
and schedules, validation grids, the final save), for a Stable-Diffusion-shaped text-to-image teacher: the loop,
checkpoints, data order, EMA/target and logs are the script's own. Images are encoded by the frozen VAE and prompts
by the frozen text encoder inside the loss, so a batch is what every mode reads: pixels (and here captions).
"""

import argparse
import copy
import hashlib
import logging
import math
import os
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import FrozenDict

from ..argtypes import non_negative_float, positive_float, positive_int
from ..files import save_image_atomic
from ..images import image_grid
from ..losses import build_loss, make_distance
from .checkpoints import save_pretrained_atomic
from .consistency import (
    build_curriculum,  # noqa: F401 (the same N and mu as cd: a fixed grid, a target EMA rate)
    write_validation_grids,
)

logger = logging.getLogger(__name__)

LCM_SAMPLING_STEPS = (1, 2, 4)  # the saved grids: LCM's 1-, 2- and 4-step samples
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lcd_args(parser: argparse.ArgumentParser):
    """The flags of --mode lcd (the grid size is --num_scales, the target EMA rate --target_ema_decay)."""
    from ..latent.distill import LCM_LORA_TARGET_MODULES

    group = parser.add_argument_group("latent consistency distillation (--mode lcd)")
    group.add_argument("--lcd_student", type=str, default="lcm", choices=["lcm", "lora"],
                       help="lcm: the full UNet plus a guidance-scale embedding (saved as a "
                       "LatentConsistencyModelPipeline); lora: LoRA adapters on the teacher's UNet (LCM-LoRA, saved "
                       "in diffusers' LoRA format for pipe.load_lora_weights).")
    group.add_argument("--w_min", type=non_negative_float, default=3.0,
                       help="Smallest guidance scale w of the teacher's target, in LCM's convention "
                       "cond + w (cond - uncond) (diffusers' guidance_scale = w + 1).")
    group.add_argument("--w_max", type=non_negative_float, default=15.0, help="Largest w (see --w_min).")
    group.add_argument("--timestep_scaling", type=positive_float, default=10.0,
                       help="LCM's boundary scalings use the time 10 t (LCMScheduler's timestep_scaling).")
    group.add_argument("--time_cond_proj_dim", type=positive_int, default=256,
                       help="lcm: size of the w-embedding added to the UNet's time embedding.")
    group.add_argument("--lora_rank", type=positive_int, default=64, help="lora: rank of the adapters.")
    group.add_argument("--lora_alpha", type=positive_float, default=None, help="lora: alpha (default: the rank).")
    group.add_argument("--lora_target_modules", type=str, default=",".join(LCM_LORA_TARGET_MODULES),
                       help="lora: comma-separated names of the adapted layers (default: LCM-LoRA's).")
    group.add_argument("--cache_latents", action="store_true",
                       help="Keep each training image's VAE posterior in memory (2 x its latent size) and skip the "
                       "encoder after the first epoch; the training draws the same numbers either way.")
    group.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                       help="Prompts of the sample grids (default: the empty prompt).")
    group.add_argument("--validation_guidance_scale", type=non_negative_float, default=None,
                       help="guidance_scale of the sample grids (default: lcm 1 + (w_min + w_max) / 2, lora 1).")
    return group


def check_lcd_args(parser, args):
    """Defaults by student (target EMA 0.95 for lcm as LCM's script, none for LCM-LoRA; no evaluation EMA unless
    --ema_decay is given) and refusals of pixel-only flags; called by parse_args for --mode lcd only."""
    if not args.w_min <= args.w_max:
        parser.error(f"--w_min ({args.w_min}) must not exceed --w_max ({args.w_max}).")
    if args.target_ema_decay is None:
        args.target_ema_decay = 0.95 if args.lcd_student == "lcm" else 0.0
    if not any(flag.split("=")[0] == "--ema_decay" for flag in args.command_line.split()):
        args.ema_decay = 0.0  # LCM's scripts save the online weights (the target EMA is --target_ema_decay)
    if args.caption_column is None and args.caption_template is None:
        args.caption_column = "text"
    if args.validation_guidance_scale is None:
        args.validation_guidance_scale = 1 + (args.w_min + args.w_max) / 2 if args.lcd_student == "lcm" else 1.0
    if args.push_to_hub and args.lcd_student == "lora":
        parser.error("--push_to_hub uploads pipeline folders; push an LCM-LoRA folder with `huggingface-cli upload`.")
    for flag in ("unet_config", "student_model_name_or_path", "class_conditional", "denoiser_warmup_steps",
                 "no_teacher_init", "sampling_sigma_max"):  # fmt: skip
        if getattr(args, flag):
            parser.error(f"--{flag} is a pixel-space option; --mode lcd takes its student from the teacher's UNet.")


# ----------------------------------------------------------------------------------------------------------------
# Teacher, student, losses


def load_teacher_for(args, accelerator, weight_dtype):
    """The latent teacher (no sigma range: LCD's levels are the teacher's DDPM timesteps). Sets --resolution and
    --channels to what its VAE and UNet take, when not given."""
    from ..latent import load_latent_teacher

    with accelerator.main_process_first():
        teacher = load_latent_teacher(args.teacher_model_name_or_path, dtype=weight_dtype).to(accelerator.device)
    sample_size = teacher.unet.config.sample_size
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    args.resolution = args.resolution or sample_size * teacher.vae_scale_factor
    args.channels = args.channels or teacher.vae.config.in_channels
    logger.info(f"Teacher {args.teacher_model_name_or_path}: {teacher.num_train_timesteps} timesteps, "
                f"{teacher.prediction_type} prediction, images {args.resolution}x{args.resolution}")  # fmt: skip
    return teacher, None, None


@dataclass
class LatentOutputParts:
    """What a saved LCD model holds besides the student: the teacher's parts and diffusers' `LCMScheduler`."""

    teacher: object
    scheduler: object


def pipeline_scheduler(args, curriculum, sigma_min, sigma_max, teacher=None) -> tuple:
    """LCMScheduler on the teacher's schedule and the grid's size; the saved grids' 1-, 2- and 4-step schedules."""
    from ..latent import lcm_scheduler

    scheduler = lcm_scheduler(teacher.scheduler_config, args.num_scales, args.timestep_scaling)
    schedules = {f"{steps}step": {"num_inference_steps": steps} for steps in LCM_SAMPLING_STEPS
                 if steps <= args.num_scales}  # fmt: skip
    return LatentOutputParts(teacher, scheduler), schedules


def build_student(args, teacher, dataset_classes, resolution: int, channels: int):
    """lcm: the teacher's UNet plus a zero-initialised w-embedding; lora: LoRA adapters on the teacher's UNet, whose
    adapters-off self is then the teacher (`teacher.network`)."""
    from ..latent import AdaptersDisabled, add_lcm_lora, build_lcm_student, lora_config

    if channels != teacher.vae.config.in_channels or resolution % teacher.vae_scale_factor:
        raise ValueError(
            f"The teacher's VAE takes {teacher.vae.config.in_channels}-channel images of a size divisible by "
            f"{teacher.vae_scale_factor}; the data is {channels} x {resolution}x{resolution}: pass --channels and "
            "--resolution to match."
        )
    if args.lcd_student == "lcm":
        unet = build_lcm_student(teacher.unet, args.time_cond_proj_dim).float()
    else:
        targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
        unet = add_lcm_lora(teacher.unet, lora_config(args.lora_rank, args.lora_alpha, targets))
        teacher.network = AdaptersDisabled(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    logger.info(f"Student ({args.lcd_student}): {trainable / 1e6:.2f}M trainable parameters")
    return unet.train()


class LatentDistillationLoss:
    """LCD's loss on a batch of pixels and captions: VAE latents and text embeddings from the frozen teacher, then
    `latent.lcd_loss` (w drawn per sample) on the project's `ConsistencyLoss`. Same call as every mode's loss.

    The frozen text encoder's embedding of a caption is fixed, so it is computed once (alone, so that it does not
    depend on which batch met the caption first: a resumed run gets the same numbers). With `cache_latents`, the
    VAE posterior (mean, std) of each image is kept too, keyed by its pixels, and only the draw
    z = mean + std * noise is made per step: the same random numbers as an encode, without the encoder's cost.
    """

    def __init__(self, loss, teacher, w_min: float, w_max: float, cache_latents: bool = False,
                 cache_size: int = 4096):  # fmt: skip
        self.loss, self.teacher, self.w_min, self.w_max = loss, teacher, w_min, w_max
        self.embeddings, self.cache_size = {}, cache_size
        self.uncond_embeds = self.embed([""])
        self.posteriors = {} if cache_latents else None

    def embed(self, captions) -> torch.Tensor:
        from ..latent import encode_prompt

        for caption in dict.fromkeys(captions):
            if caption not in self.embeddings:
                if len(self.embeddings) >= self.cache_size:
                    self.embeddings.clear()
                self.embeddings[caption] = encode_prompt(self.teacher.tokenizer, self.teacher.text_encoder,
                                                         [caption])[0]  # fmt: skip
        return torch.stack([self.embeddings[caption] for caption in captions])

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        from ..latent import encode_images

        vae = self.teacher.vae
        if self.posteriors is None:
            return encode_images(vae, pixels)
        keys = [hashlib.sha1(image.detach().cpu().numpy().tobytes()).hexdigest() for image in pixels]
        with torch.no_grad():
            for key, image in zip(keys, pixels):
                if key not in self.posteriors:  # encoded alone: the cache holds the same numbers on every resume
                    posterior = vae.encode(image[None].to(vae.dtype)).latent_dist
                    self.posteriors[key] = (posterior.mean[0], posterior.std[0])
        mean = torch.stack([self.posteriors[key][0] for key in keys])
        std = torch.stack([self.posteriors[key][1] for key in keys])
        z = mean + std * torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)  # DiagonalGaussian's draw
        return z.float() * vae.config.scaling_factor

    def __call__(self, student, target, sample, levels, class_labels=None, captions=None):
        from ..latent import lcd_loss

        if captions is None:
            raise ValueError("--mode lcd trains on captioned images: pass --caption_column or --caption_template.")
        return lcd_loss(self.loss, student, target, self.latents(sample), self.embed(captions), self.uncond_embeds,
                        self.w_min, self.w_max)  # fmt: skip


def build_losses(args, teacher, sigma_min, sigma_max, device) -> tuple:
    """LCD's loss (no denoiser warm-up)."""
    loss = build_loss("lcd", make_distance(args.loss_type, args.huber_c, device), teacher=teacher,
                      num_train_timesteps=teacher.num_train_timesteps, num_ddim_timesteps=args.num_scales,
                      timestep_scaling=args.timestep_scaling)  # fmt: skip
    return LatentDistillationLoss(loss, teacher, args.w_min, args.w_max, args.cache_latents), None


# ----------------------------------------------------------------------------------------------------------------
# Sampling, validation, the saved model and its card


def _evaluation_unet(unet, ema):
    unet = copy.deepcopy(unet).float()
    if ema is not None:
        ema.copy_to(unet.parameters())
    # a path of this machine (the teacher's folder) must not reach the saved config or the Hub
    unet._internal_dict = FrozenDict({key: value for key, value in unet.config.items() if key != "_name_or_path"})
    return unet.eval()


@torch.no_grad()
def sample_grids(unet, parts: LatentOutputParts, schedules: dict, prompts, guidance_scale: float, num_images: int,
                 seed: int) -> dict:  # fmt: skip
    """{name: (PIL grid, images NHWC numpy)}: `num_images` images cycling through `prompts`, fixed seed per grid."""
    from ..latent import decode_latents, encode_prompt, lcm_sample_latents

    teacher = parts.teacher
    prompts = [prompts[i % len(prompts)] for i in range(num_images)]
    prompt_embeds = encode_prompt(teacher.tokenizer, teacher.text_encoder, prompts)
    negative = encode_prompt(teacher.tokenizer, teacher.text_encoder, [""] * num_images)
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    shape = (num_images, unet.config.in_channels, size, size)
    rows = int(math.sqrt(num_images))
    grids = {}
    for name, schedule in schedules.items():
        latents = lcm_sample_latents(
            unet, prompt_embeds, teacher.alphas_cumprod, schedule["num_inference_steps"], guidance_scale, shape,
            torch.Generator().manual_seed(seed), negative, teacher.prediction_type,
            parts.scheduler.config.original_inference_steps, parts.scheduler.config.timestep_scaling,
        )  # fmt: skip
        images = decode_latents(teacher.vae, latents).permute(0, 2, 3, 1).cpu().numpy()
        grids[name] = (image_grid(images[: rows * (num_images // rows)], nrow=num_images // rows), images)
    return grids


def log_validation(accelerator, unet, ema, parts, schedules, args, global_step):
    """Samples 1-, 2- and 4-step grids of the validation prompts with the evaluation weights; saves PNGs."""
    evaluation = _evaluation_unet(unet, ema)
    grids = sample_grids(evaluation, parts, schedules, args.validation_prompts or [""],
                         args.validation_guidance_scale, args.num_validation_images, args.seed)  # fmt: skip
    write_validation_grids(accelerator, args, grids, global_step)


def save_pipeline(args, unet, ema, parts, schedules, final_levels, global_step, accelerator, sigma_range):
    """lcm: a LatentConsistencyModelPipeline folder; lora: diffusers-format LoRA weights; sample grids and a card."""
    from ..hub import push_to_hub
    from ..latent import save_lcm_lora
    from ..latent.card import lcd_model_card

    evaluation = _evaluation_unet(unet, ema)
    grids = sample_grids(evaluation, parts, schedules, args.validation_prompts or [""],
                         args.validation_guidance_scale, args.num_validation_images, args.seed)  # fmt: skip
    if args.lcd_student == "lcm":
        from diffusers import LatentConsistencyModelPipeline

        teacher = parts.teacher
        pipeline = LatentConsistencyModelPipeline(
            vae=copy.deepcopy(teacher.vae).float(), text_encoder=copy.deepcopy(teacher.text_encoder).float(),
            tokenizer=teacher.tokenizer, unet=evaluation, scheduler=parts.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        weight_bytes = sum(p.numel() * p.element_size() for p in pipeline.unet.parameters())
        save_pretrained_atomic(pipeline.save_pretrained, args.output_dir, PIPELINE_COMPONENTS, weight_bytes)
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        save_lcm_lora(args.output_dir, evaluation, evaluation.peft_config["default"])
    for name, (grid, _) in grids.items():
        save_image_atomic(grid, os.path.join(args.output_dir, f"samples_{name}.png"))

    from .consistency import describe_loss, mode_settings

    settings = mode_settings(args, None, None, final_levels)
    for name in ("sigma_min", "sigma_max", "sigma_data", "dropout"):  # pixel-space settings LCD does not use
        settings.pop(name, None)
    if args.lcd_student == "lora":
        settings.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                        lora_target_modules=args.lora_target_modules)  # fmt: skip
    else:
        settings.update(time_cond_proj_dim=args.time_cond_proj_dim)
    lcd_model_card(
        args.output_dir, student=args.lcd_student, base_model=args.teacher_model_name_or_path,
        dataset=args.dataset_name or args.train_data_dir, train_steps=global_step, loss=describe_loss(args),
        training_command="accelerate launch training/train_consistency.py " + args.command_line,
        guidance_scale=args.validation_guidance_scale, sample_grid=f"samples_{list(grids)[-1]}.png",
        settings=settings, prompt=(args.validation_prompts or ["a photo"])[0],
    )  # fmt: skip
    logger.info(f"Saved the {'LCM pipeline' if args.lcd_student == 'lcm' else 'LCM-LoRA'} to {args.output_dir}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        url = push_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        logger.info(f"Pushed to {url}")
