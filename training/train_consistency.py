#!/usr/bin/env python
"""Consistency distillation (CD) and consistency training (CT, iCT, ECT) of a UNet2DModel with Accelerate.

One loop and one loss path for every mode (`cm_diffusers.losses.ConsistencyLoss`); a mode only changes where the
next trajectory point comes from, how noise levels are drawn, the curriculum, the weighting and the default distance:

    --mode cd   distill a diffusion teacher: one Heun/Euler PF-ODE step of the teacher (Song et al. 2023)
    --mode ct   train from data alone: x_hat_{n+1} = x + sigma_{n+1} z, curriculum N(k) and target EMA mu(k)
    --mode ict  improved CT (Song & Dhariwal 2023): pseudo-Huber, 1/(sigma_n - sigma_{n+1}) weights, lognormal
                noise levels, doubling curriculum, no EMA target, dropout
    --mode ect  easy consistency tuning (Geng et al. 2024): start from a diffusion model's UNet, continuous sigma and
                a gap sigma - r that shrinks stage by stage; the cheapest route to good 2-step samples

Examples (one GPU, several with `--multi_gpu --num_processes N`; on CPU both forms run over gloo):

    accelerate launch training/train_consistency.py --mode cd --teacher_model_name_or_path ddpm-fashion-mnist \
        --dataset_name fashion_mnist --output_dir cd-fashion-mnist --train_batch_size 64 --max_train_steps 20000
    accelerate launch training/train_consistency.py --mode ict --dataset_name fashion_mnist --dropout 0.3 \
        --output_dir ict-fashion-mnist --max_train_steps 100000
    accelerate launch training/train_consistency.py --mode ect --teacher_model_name_or_path ddpm-fashion-mnist \
        --dataset_name fashion_mnist --output_dir ect-fashion-mnist --max_train_steps 10000

`--denoiser_warmup_steps W` makes the first W steps a denoiser regression (onto the teacher's D in cd, onto the data
otherwise) that gives a student started from a DDPM eps-model the consistency scalings before the consistency loss.

The output folder is a `ConsistencyPipeline` (EMA weights, safetensors) with a model card and sample grids; the
curriculum N(k), mu(k) and the data order are pure functions of the global step, so every rank agrees and a resumed
run continues exactly where it stopped.
"""

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time

import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make the repository's `training` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler  # noqa: E402
from cm_diffusers.losses import Curriculum, DenoiserLoss, build_loss, make_distance  # noqa: E402
from cm_diffusers.networks import unet_forward  # noqa: E402
from cm_diffusers.parameterization import karras_sigmas  # noqa: E402
from cm_diffusers.safety import (  # noqa: E402
    finite_float,
    float_at_least,
    float_in,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    redact_command,
    save_image_atomic,
)
from cm_diffusers.training_utils import (  # noqa: E402
    apply_optimizer_flags,
    check_model_source,
    default_unet_config,
    find_checkpoint,
    load_checkpoint,
    make_accelerator,
    public_config,
    raise_if_not_finite,
    raise_if_weights_not_finite,
    run_script,
    save_checkpoint,
    save_pretrained_atomic,
    truncate_log,
)
from training.data import add_data_args, build_dataset, num_classes  # noqa: E402

logger = logging.getLogger(__name__)

MODES = ("cd", "ct", "ict", "ect")

# What `--mode` expands into; any flag given explicitly wins. Paper values are for CIFAR-10 (Song et al. 2023 for
# cd/ct, Song & Dhariwal 2023 for ict, Geng et al. 2024 for ect); pseudo-Huber replaces LPIPS, whose backbone
# weights cannot be downloaded here (iCT shows pseudo-Huber matches it).
MODE_DEFAULTS = {
    "cd": dict(num_scales=18, target_ema_decay=0.0, learning_rate=4e-4, loss_type="pseudo_huber", dropout=0.0),
    "ct": dict(s0=2, s1=150, mu0=0.9, learning_rate=4e-4, loss_type="pseudo_huber", dropout=0.0),
    "ict": dict(s0=10, s1=1280, learning_rate=1e-4, loss_type="pseudo_huber", dropout=0.3),
    "ect": dict(learning_rate=1e-4, loss_type="pseudo_huber", dropout=0.2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", type=str, required=True, choices=MODES, help="cd, ct, ict or ect (see above).")
    parser.add_argument("--output_dir", type=str, required=True, help="Where the pipeline and checkpoints go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights, noise, dropout and data order.")

    group = parser.add_argument_group("model")
    group.add_argument(
        "--teacher_model_name_or_path",
        type=str,
        default=None,
        help="Diffusion checkpoint (folder or Hub repo id; DDPM/DDIM eps/v/x0 or EDM): the teacher of cd and the "
        "initialisation of cd and ect.",
    )
    group.add_argument(
        "--unet_config",
        type=str,
        default=None,
        help="UNet2DModel config (JSON file or folder) of the student; default: the teacher's, else one sized for "
        "the data.",
    )
    group.add_argument(
        "--no_teacher_init",
        action="store_true",
        help="Start the student from random weights even when its architecture matches the teacher's.",
    )
    group.add_argument("--class_conditional", action="store_true", help="ct/ict: condition on the data's labels.")
    group.add_argument(
        "--dropout",
        type=float_in(0, 1, high_open=True),
        default=None,
        help="Dropout of the student (cd 0, ict 0.3, ect 0.2).",
    )
    group.add_argument(
        "--sigma_min", type=positive_float, default=0.002, help="epsilon (within the teacher's range in cd)."
    )
    group.add_argument("--sigma_max", type=positive_float, default=80.0, help="Largest noise level (ditto).")
    group.add_argument("--sigma_data", type=positive_float, default=0.5, help="sigma_data of the boundary scalings.")
    group.add_argument("--rho", type=positive_float, default=7.0, help="Exponent of the Karras grid.")
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")

    group = parser.add_argument_group("loss and schedule")
    group.add_argument(
        "--num_scales", type=int_at_least(2), default=None, help="cd: grid size N (18 CIFAR, 40 ImageNet-64)."
    )
    group.add_argument("--ode_solver", type=str, default="heun", choices=["heun", "euler"], help="cd teacher step.")
    group.add_argument(
        "--teacher_clip_denoised",
        type=str,
        default="auto",
        choices=["auto", "yes", "no"],
        help="cd: clamp the teacher's D(x, sigma) to [-1, 1] in its ODE step (auto: as the teacher's own scheduler "
        "does, i.e. DDPM's clip_sample).",
    )
    group.add_argument(
        "--loss_type", type=str, default=None, choices=["l2", "l1", "pseudo_huber", "lpips"], help="Distance d."
    )
    group.add_argument(
        "--huber_c", type=positive_float, default=None, help="Pseudo-Huber c (default 0.00054 sqrt(d))."
    )
    group.add_argument(
        "--denoiser_warmup_steps",
        type=non_negative_int,
        default=0,
        help="Spend the first W of --max_train_steps regressing f(x + sigma z, sigma) onto a denoiser before the "
        "consistency loss (curricula start after them): makes a student started from a DDPM eps-teacher a "
        "denoiser with the consistency scalings. Target: see --denoiser_warmup_target.",
    )
    group.add_argument(
        "--denoiser_warmup_target",
        type=str,
        default=None,
        choices=["teacher", "data"],
        help="teacher: the teacher's D(x, sigma) (default in cd); data: the clean image, i.e. denoising score "
        "matching without any teacher output (default in ct/ict/ect).",
    )
    group.add_argument(
        "--target_ema_decay",
        type=float_in(0, 1, high_open=True),
        default=None,
        help="cd: target EMA rate mu (0: stop-grad of online).",
    )
    group.add_argument("--s0", type=positive_int, default=None, help="ct/ict curriculum: initial N (ct 2, ict 10).")
    group.add_argument("--s1", type=positive_int, default=None, help="ct/ict curriculum: final N (ct 150, ict 1280).")
    group.add_argument(
        "--mu0", type=float_in(0, 1, high_open=True), default=None, help="ct: target EMA rate at N = s0 (0.9)."
    )
    group.add_argument("--p_mean", type=finite_float, default=-1.1, help="ict/ect: mean of ln sigma.")
    group.add_argument("--p_std", type=positive_float, default=2.0, help="ict/ect: std of ln sigma.")
    group.add_argument(
        "--ect_q",
        type=float_at_least(1, strict=True),
        default=2.0,
        help="ect: the gap sigma - r shrinks by q per stage.",
    )
    group.add_argument(
        "--ect_k", type=non_negative_float, default=8.0, help="ect: adj(sigma) = 1 + k sigmoid(-b sigma)."
    )
    group.add_argument("--ect_b", type=non_negative_float, default=1.0, help="ect: see --ect_k.")
    group.add_argument(
        "--ect_num_stages", type=positive_int, default=8, help="ect: equal stages over --max_train_steps."
    )
    group.add_argument(
        "--sigma_mid", type=positive_float, default=0.821, help="Middle level of 2-step samples (iCT CIFAR)."
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=positive_int, default=64, help="Batch size per process.")
    group.add_argument(
        "--max_train_steps", type=positive_int, default=10000, help="Optimizer steps K (sets curricula)."
    )
    group.add_argument("--learning_rate", type=positive_float, default=None, help="cd/ct 4e-4, ict/ect 1e-4.")
    group.add_argument("--optimizer", type=str, default="radam", choices=["radam", "adamw"], help="RAdam (paper).")
    group.add_argument("--adam_beta1", type=float_in(0, 1, high_open=True), default=0.9)
    group.add_argument("--adam_beta2", type=float_in(0, 1, high_open=True), default=0.999)
    group.add_argument("--adam_weight_decay", type=non_negative_float, default=0.0)
    group.add_argument("--adam_epsilon", type=positive_float, default=1e-8)
    group.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", help="diffusers get_scheduler.")
    group.add_argument("--lr_warmup_steps", type=non_negative_int, default=0, help="Linear warm-up steps.")
    group.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping (0: none).")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    group.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    group.add_argument(
        "--ema_decay",
        type=float_in(0, 1, high_open=True),
        default=0.9999,
        help="Evaluation EMA (0: save online weights).",
    )
    group.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)

    group = parser.add_argument_group("logging, checkpoints, hub")
    group.add_argument("--report_to", type=str, default="none", choices=["none", "tensorboard"])
    group.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    group.add_argument("--log_every_rank", action="store_true", help="Every rank logs its schedule and loss.")
    group.add_argument(
        "--validation_steps", type=non_negative_int, default=0, help="1-/2-step sample grids every N steps."
    )
    group.add_argument("--num_validation_images", type=positive_int, default=16)
    group.add_argument(
        "--checkpointing_steps", type=non_negative_int, default=0, help="Save a resumable state every N steps."
    )
    group.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="`latest` or a checkpoint path; keep --max_train_steps unchanged, the curricula depend on it.",
    )
    group.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline (no checkpoints or logs).")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: output folder name).")
    group.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="A Hub write token for --push_to_hub. Prefer the HF_TOKEN environment variable (or `hf auth login`); "
        "either way the token is never written into the model card, the logs or anything pushed.",
    )
    group.add_argument("--hub_private_repo", action="store_true")

    add_data_args(parser)
    args = parser.parse_args(argv)
    # for the card and the logs: secret values (--hub_token, any --*key*/--*password*) are never recorded
    args.command_line = shlex.join(redact_command(sys.argv[1:] if argv is None else argv, keep_paths=True))
    for name, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.mode in ("cd", "ect") and args.teacher_model_name_or_path is None:
        parser.error(f"--mode {args.mode} starts from a diffusion model: pass --teacher_model_name_or_path.")
    if args.teacher_model_name_or_path is not None:
        try:  # now, not after minutes of data loading
            check_model_source(args.teacher_model_name_or_path, "--teacher_model_name_or_path")
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    if not args.sigma_min < args.sigma_max:
        parser.error(f"--sigma_min ({args.sigma_min}) must be below --sigma_max ({args.sigma_max}).")
    if args.mode == "cd" and args.num_scales < 2:
        parser.error("--num_scales must be at least 2.")
    if args.mode == "cd" and not 0 <= args.target_ema_decay < 1:
        parser.error("--target_ema_decay must lie in [0, 1).")
    if args.mode in ("ct", "ict") and not 1 <= args.s0 <= args.s1:
        parser.error("The curriculum needs 1 <= --s0 <= --s1.")
    if args.mode == "ct" and not 0 < args.mu0 < 1:
        parser.error("--mu0 must lie in (0, 1).")
    if not 0 <= args.denoiser_warmup_steps < args.max_train_steps:
        parser.error("--denoiser_warmup_steps must lie in [0, --max_train_steps): the consistency loss needs steps.")
    if args.denoiser_warmup_target is None:
        args.denoiser_warmup_target = "teacher" if args.mode == "cd" else "data"
    if args.denoiser_warmup_target == "teacher" and args.teacher_model_name_or_path is None:
        parser.error("--denoiser_warmup_target teacher needs --teacher_model_name_or_path.")
    if not args.sigma_min < args.sigma_mid < args.sigma_max:
        parser.error("--sigma_mid must lie between --sigma_min and --sigma_max.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_student(args, teacher, resolution: int, channels: int, n_classes) -> UNet2DModel:
    """The online network: --unet_config, else the teacher's architecture, else `default_unet_config`."""
    if args.unet_config:
        config = dict(UNet2DModel.load_config(args.unet_config))
    elif teacher is not None:
        config = dict(teacher.unet.config)
    else:
        config = default_unet_config(resolution, channels, n_classes if args.class_conditional else None)
    config["dropout"] = args.dropout
    unet = UNet2DModel.from_config(config)
    # Start from the teacher when the architectures match. Only an EDM teacher trained with OpenAI's time input
    # t = 250 ln sigma (c_noise_scale 1000) has exactly the student's scalings; a diffusers EDM model takes
    # c_noise = ln(sigma) / 4 and a DDPM eps-model x / sqrt(1 + sigma^2) at t in [0, 1000) and predicts noise.
    # Its convolution and attention features still transfer: the first steps re-learn the time embedding and the
    # output head, which is far cheaper than learning the features from scratch (--no_teacher_init to compare).
    if teacher is not None and not args.no_teacher_init:
        try:
            unet.load_state_dict(teacher.unet.state_dict())
            logger.info("Student initialised from the teacher's UNet.")
        except RuntimeError:
            logger.warning("The student's architecture differs from the teacher's: random initialisation.")
    size = unet.config.sample_size
    if unet.config.in_channels != channels or (size if isinstance(size, int) else tuple(size)[0]) != resolution:
        raise ValueError(
            f"The UNet takes {unet.config.in_channels} channel(s) at sample_size {size}, the data has "
            f"{channels} at {resolution}x{resolution}: pass --resolution/--channels or --unet_config."
        )
    return unet


@torch.no_grad()
def update_target(target: torch.nn.Module, online: torch.nn.Module, mu: float):
    """theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, Algorithm 2/3)."""
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p_online.detach(), 1.0 - mu)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters' bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Data


class StepIndexedBatches(torch.utils.data.Sampler):
    """Endless batches of indices for one rank; micro-batch i depends only on (seed, i, rank).

    Each epoch is a seeded permutation split into disjoint per-rank shards, so ranks read different data and a run
    resumed at global step k continues with micro-batch k * gradient_accumulation_steps, exactly as if never stopped.
    """

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1, start=0):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_samples // world_size // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{num_samples} training images are too few for {world_size} process(es) x batch size "
                f"{batch_size}: lower --train_batch_size or add data."
            )
        self.start = start

    def __len__(self):
        return self.batches_per_epoch

    def __iter__(self):
        index, shard_epoch, shard = self.start, None, None
        while True:
            epoch, j = divmod(index, self.batches_per_epoch)
            if epoch != shard_epoch:
                order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
                shard_epoch, shard = epoch, order[self.rank :: self.world_size]
            yield shard[j * self.batch_size : (j + 1) * self.batch_size].tolist()
            index += 1


def collate(examples):
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([example["class_labels"] for example in examples], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Sampling, validation and the model card


def sampling_schedules(args, num_train_timesteps: int, sigma_min: float, sigma_max: float) -> dict:
    """The 1-step and 2-step schedules the model is sampled with: grid `timesteps`, or `sigmas` for ECT."""
    if args.mode == "ect":  # trained on continuous levels, not a grid
        return {"1step": {"sigmas": [sigma_max]}, "2step": {"sigmas": [sigma_max, args.sigma_mid]}}
    grid = karras_sigmas(num_train_timesteps, sigma_min, sigma_max, args.rho)
    mid = int(abs(grid[1:-1] - args.sigma_mid).argmin()) + 1 if num_train_timesteps > 2 else 0
    two_step = [mid, 0] if mid > 0 else [0]
    return {"1step": {"num_inference_steps": 1}, "2step": {"timesteps": two_step}}


def sample_grids(pipeline, schedules: dict, num_images: int, seed: int) -> dict:
    """{name: (PIL grid, images as numpy NHWC)} for each schedule, with fixed noise."""
    grids = {}
    rows = int(math.sqrt(num_images))
    for name, schedule in schedules.items():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn(pipeline.sample_shape(num_images), generator=generator).to(pipeline.device)
        images = pipeline(batch_size=num_images, latents=latents, generator=generator, output_type="np", **schedule)
        images = images.images
        pil = pipeline.numpy_to_pil(images)
        grids[name] = (make_image_grid(pil[: rows * (num_images // rows)], rows, num_images // rows), images)
    return grids


def log_validation(accelerator, unet, ema, scheduler, schedules, args, global_step):
    """Samples 1- and 2-step grids with the evaluation weights; saves PNGs and logs them to TensorBoard."""
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    unet.eval()
    pipeline = ConsistencyPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    grids = sample_grids(pipeline, schedules, args.num_validation_images, args.seed)
    folder = os.path.join(args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    for name, (grid, images) in grids.items():
        save_image_atomic(grid, os.path.join(folder, f"step_{global_step:07d}_{name}.png"))
        if args.report_to == "tensorboard":
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_images(f"samples_{name}", images, global_step, dataformats="NHWC")
    unet.train()
    if ema is not None:
        ema.restore(unet.parameters())


def describe_loss(args) -> str:
    weighting = "1/(sigma_n - sigma_{n+1})" if args.mode in ("ict", "ect") else "1"
    distance = args.loss_type + (f" (c={args.huber_c})" if args.huber_c is not None else "")
    return f"{distance}, weighting {weighting}"


def mode_settings(args, sigma_min, sigma_max, final_levels) -> dict:
    settings = {
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "sigma_data": args.sigma_data,
        "dropout": args.dropout,
        "learning_rate": args.learning_rate,
        "optimizer": args.optimizer,
        "batch_size": args.train_batch_size,
        "ema_decay": args.ema_decay,
    }
    if args.denoiser_warmup_steps:
        settings.update(
            denoiser_warmup_steps=args.denoiser_warmup_steps, denoiser_warmup_target=args.denoiser_warmup_target
        )
    if args.mode == "cd":
        settings.update(num_scales=args.num_scales, ode_solver=args.ode_solver, target_ema_decay=args.target_ema_decay,
                        teacher_clip_denoised=args.teacher_clip_denoised)  # fmt: skip
    elif args.mode in ("ct", "ict"):
        settings.update(s0=args.s0, s1=args.s1, final_num_scales=final_levels.num_scales)
        settings.update(mu0=args.mu0) if args.mode == "ct" else settings.update(p_mean=args.p_mean, p_std=args.p_std)
    else:
        settings.update(
            p_mean=args.p_mean,
            p_std=args.p_std,
            q=args.ect_q,
            k=args.ect_k,
            b=args.ect_b,
            num_stages=args.ect_num_stages,
        )
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Training


def teacher_clip_denoised(choice: str, teacher) -> bool:
    """--teacher_clip_denoised: yes/no, or auto = whatever the teacher's own sampler does (DDPM `clip_sample`)."""
    if choice == "auto":
        from cm_diffusers.sampling import teacher_clips_denoised

        return teacher is not None and teacher_clips_denoised(teacher)
    return choice == "yes"


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.report_to, logging_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(args.seed + accelerator.process_index)  # noise and dropout differ per rank, weights below do not
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 1. Teacher (cd: the ODE steps; cd and ect: the initialisation), first: a bad teacher fails before data loads
    teacher = None
    sigma_min, sigma_max = args.sigma_min, args.sigma_max
    if args.teacher_model_name_or_path is not None:
        from cm_diffusers.teachers import load_teacher

        with accelerator.main_process_first():
            teacher = load_teacher(args.teacher_model_name_or_path, weight_dtype, accelerator.device)
        teacher.unet.requires_grad_(False).eval()
        # the teacher knows nothing outside its own noise range
        sigma_min, sigma_max = max(sigma_min, float(teacher.sigma_min)), min(sigma_max, float(teacher.sigma_max))
        logger.info(f"Teacher {args.teacher_model_name_or_path} ({teacher.kind}): sigma in [{sigma_min}, {sigma_max}]")

    # 2. Data, then the student, target and evaluation EMA
    with accelerator.main_process_first():  # downloads and dataset caches are written once
        dataset = build_dataset(args)
    pixel_shape = dataset[0]["pixel_values"].shape
    channels, resolution = pixel_shape[0], pixel_shape[-1]
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    unet = build_student(args, teacher, resolution, channels, num_classes(dataset))
    torch.manual_seed(args.seed + accelerator.process_index)
    if unet.config.num_class_embeds is not None and num_classes(dataset) is None:
        raise ValueError("The UNet is class-conditional but the training data has no labels (--label_column).")
    if args.class_conditional and num_classes(dataset) is None:
        raise ValueError("--class_conditional needs a dataset with class labels (see --label_column).")
    if args.class_conditional and unet.config.num_class_embeds is None:
        raise ValueError(
            "--class_conditional was given, but the student's architecture (from the teacher or --unet_config) is "
            "unconditional: drop the flag, or pass a --unet_config with num_class_embeds."
        )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    schedule_flags = dict(num_scales=args.num_scales, target_ema=args.target_ema_decay, s0=args.s0, s1=args.s1,
                          mu0=args.mu0, num_stages=args.ect_num_stages)  # fmt: skip
    schedule_flags = {name: value for name, value in schedule_flags.items() if value is not None}  # mode's own flags
    warmup_steps = args.denoiser_warmup_steps  # the curricula run over the steps after the warm-up
    curriculum = Curriculum(args.mode, args.max_train_steps - warmup_steps, **schedule_flags)
    # mu = 0 makes the target the stop-gradient of the online network itself: no copy needed
    target_unet = copy.deepcopy(unet).requires_grad_(False) if curriculum.uses_target_ema else None
    ema = None
    if args.ema_decay > 0:
        ema = EMAModel(
            unet.parameters(), decay=args.ema_decay, foreach=True, model_cls=UNet2DModel, model_config=unet.config
        )

    # noise levels and scalings shared by the consistency loss and the denoiser warm-up
    noise_levels = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=args.sigma_data, p_mean=args.p_mean,
                        p_std=args.p_std)  # fmt: skip
    clip_denoised = teacher_clip_denoised(args.teacher_clip_denoised, teacher)
    loss_fn = build_loss(
        args.mode,
        make_distance(args.loss_type, args.huber_c, accelerator.device),
        teacher=teacher if args.mode == "cd" else None,
        ode_solver=args.ode_solver,
        teacher_clip_denoised=clip_denoised,
        rho=args.rho,
        q=args.ect_q,
        k=args.ect_k,
        b=args.ect_b,
        **noise_levels,
    )
    warmup_loss_fn = None
    if warmup_steps:
        warmup_teacher = teacher if args.denoiser_warmup_target == "teacher" else None
        warmup_loss_fn = DenoiserLoss(warmup_teacher, clip_denoised=clip_denoised, **noise_levels)
    if args.mode != "cd" and args.denoiser_warmup_target != "teacher":
        teacher = None  # past this point ect needs no teacher outputs, only its weights (copied above): free it

    # 3. Optimizer and learning-rate schedule (stepped once per optimizer step, so lr(k) is the same for any number
    # of processes; accelerate's prepared schedulers step once per process)
    optimizer_cls = torch.optim.RAdam if args.optimizer == "radam" else torch.optim.AdamW
    optimizer = optimizer_cls(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        foreach=True,  # torch's default only on CUDA; faster on CPU too
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )

    # 4. Accelerate, checkpoint objects, resume
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if target_unet is not None:
        target_unet.to(accelerator.device)
    accelerator.register_for_checkpointing(lr_scheduler)
    if target_unet is not None:
        accelerator.register_for_checkpointing(target_unet)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    global_step = 0
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        global_step = load_checkpoint(accelerator, checkpoint)
        # the command line's learning rate and Adam settings win over the checkpoint's (a changed --optimizer is
        # refused): lowering the learning rate after a divergence must take effect
        apply_optimizer_flags(checkpoint, optimizer, lr_scheduler, optimizer_settings(args))
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_consistency", config=public_config(args))

    batches = StepIndexedBatches(
        len(dataset),
        args.train_batch_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
        start=global_step * args.gradient_accumulation_steps,
    )
    # own generator: the loader's worker seed must not draw from the global RNG restored from the checkpoint
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed + accelerator.process_index + global_step),
    )
    data_iter = iter(dataloader)
    raw_unet = accelerator.unwrap_model(unet)
    student = unet_forward(unet)
    target = unet_forward(target_unet if target_unet is not None else raw_unet)
    # the grid of the final step (ect trains on continuous levels: the default 40-point grid, sampled by sigmas)
    num_train_timesteps = curriculum(curriculum.total_steps).num_scales if args.mode != "ect" else 40
    scheduler = ConsistencyScheduler(
        num_train_timesteps=num_train_timesteps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_data=args.sigma_data,
        rho=args.rho,
    )
    schedules = sampling_schedules(args, scheduler.config.num_train_timesteps, sigma_min, sigma_max)
    rank_log = None
    if accelerator.is_main_process or args.log_every_rank:
        os.makedirs(logging_dir, exist_ok=True)
        suffix = f"_rank{accelerator.process_index}" if args.log_every_rank else ""
        log_path = os.path.join(logging_dir, f"train_log{suffix}.jsonl")
        truncate_log(log_path, global_step)  # steps after the checkpoint are run again: log them once
        rank_log = open(log_path, "a")

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** {args.mode}: {len(dataset)} images, total batch {total_batch}, steps {global_step} -> "
        f"{args.max_train_steps} *****"
    )
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, unit="step", disable=not accelerator.is_local_main_process
    )
    session_start, session_steps = time.perf_counter(), 0

    # 5. The loop: load batch, sample levels, loss, backward, step, update target/EMA, log, checkpoint
    while global_step < args.max_train_steps:
        step_start = time.perf_counter()
        # N(k), mu(k), ECT stage: from the global step, the same on every rank; the warm-up comes first
        warming_up = global_step < warmup_steps
        levels = curriculum(max(global_step - warmup_steps, 0))
        step_loss_fn = warmup_loss_fn if warming_up else loss_fn
        step_loss, data_time = 0.0, 0.0
        for _ in range(args.gradient_accumulation_steps):
            data_start = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - data_start
            sample = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            class_labels = batch.get("class_labels") if raw_unet.config.num_class_embeds is not None else None
            class_labels = class_labels.to(accelerator.device) if class_labels is not None else None
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    loss, stats = step_loss_fn(student, target, sample, levels, class_labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss = step_loss + loss.detach() / args.gradient_accumulation_steps

        lr_scheduler.step()
        if target_unet is not None:
            update_target(target_unet, raw_unet, 0.0 if warming_up else levels.target_ema)
        if ema is not None:
            ema.step(raw_unet.parameters())
        global_step += 1

        mean_loss = accelerator.reduce(step_loss, reduction="mean")
        raise_if_not_finite(mean_loss, global_step, args.output_dir)  # before any checkpoint of these weights
        # One device-to-host copy for every logged tensor (the NaN check above has synchronised already).
        logged = dict(zip(["loss", *stats], torch.stack([mean_loss, *stats.values()]).float().tolist()))
        logs = {
            "loss": logged.pop("loss"),
            "lr": lr_scheduler.get_last_lr()[0],
            "num_scales": levels.num_scales,
            "target_ema": levels.target_ema,
            "stage": levels.stage,
            "denoiser_warmup": int(warming_up),
            **logged,
        }
        logs["step_time"] = time.perf_counter() - step_start  # wall time of the step: .item() synchronised above
        logs["data_time"] = data_time
        session_steps += 1
        images_per_second = total_batch * session_steps / (time.perf_counter() - session_start)
        progress.update(1)
        progress.set_postfix(
            {"loss": f"{logs['loss']:.4g}", "N": levels.num_scales, "images/s": f"{images_per_second:.1f}"}
        )
        accelerator.log(logs, step=global_step)
        if rank_log is not None:
            if args.log_every_rank:  # lets a multi-process run prove that every rank holds the same weights
                logs["weights_sha256"] = weights_digest(raw_unet)
            rank_log.write(json.dumps({"step": global_step, "local_loss": step_loss.item(), **logs}) + "\n")
            rank_log.flush()

        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            # weights of 1e30 are finite yet give NaN next step: the check includes the loss of the new weights
            raise_if_diverged(accelerator, args, global_step, raw_unet, target_unet, ema, optimizer,
                              lambda: step_loss_fn(student, target, sample, levels, class_labels)[0])  # fmt: skip
            save_checkpoint(
                accelerator, args.output_dir, global_step, args.checkpoints_total_limit, optimizer_settings(args)
            )
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            log_validation(accelerator, raw_unet, ema, scheduler, schedules, args, global_step)
    progress.close()

    # 6. Save the pipeline with the evaluation (EMA) weights, sample grids and the model card; only the main process
    raise_if_diverged(accelerator, args, global_step, raw_unet, target_unet, ema, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_levels = curriculum(max(global_step - warmup_steps, 0))
        save_pipeline(args, raw_unet, ema, scheduler, schedules, final_levels, global_step, accelerator)
        if rank_log is not None:
            rank_log.write(json.dumps({"event": "saved_pipeline", "rank": accelerator.process_index}) + "\n")
    if rank_log is not None:
        rank_log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return global_step


def optimizer_settings(args) -> dict:
    """The flags a checkpoint records and a resumed run compares (see `apply_optimizer_flags`)."""
    names = ("optimizer", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
             "lr_scheduler", "lr_warmup_steps")  # fmt: skip
    return {name: getattr(args, name) for name in names}


def raise_if_diverged(accelerator, args, global_step, unet, target_unet, ema, optimizer, loss=None):
    """Stops before saving weights that are not finite, or whose `loss()` is not (a FloatingPointError naming the
    last good checkpoint)."""
    modules = [unet] + ([target_unet] if target_unet is not None else [])
    states = [("optimizer state", optimizer.state_dict())]
    if ema is not None:
        states.append(("EMA weights", ema.shadow_params))
    raise_if_weights_not_finite(accelerator, global_step, args.output_dir, modules, states, loss)


def save_pipeline(args, unet, ema, scheduler, schedules, final_levels, global_step, accelerator):
    """Writes the ConsistencyPipeline folder, 1-/2-step sample grids and the model card; pushes it if asked."""
    from cm_diffusers.hub import push_to_hub, save_model_card

    unet = copy.deepcopy(unet).float()
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    pipeline = ConsistencyPipeline(unet=unet, scheduler=scheduler)
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters())
    save_pretrained_atomic(pipeline.save_pretrained, args.output_dir, needed_bytes=weight_bytes)  # all or nothing
    pipeline.set_progress_bar_config(disable=True)
    for name, (grid, _) in sample_grids(pipeline, schedules, args.num_validation_images, args.seed).items():
        save_image_atomic(grid, os.path.join(args.output_dir, f"samples_{name}.png"))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    save_model_card(
        args.output_dir,
        mode=args.mode,
        base_model=args.teacher_model_name_or_path,
        dataset=args.dataset_name or args.train_data_dir,
        training_command="accelerate launch training/train_consistency.py " + args.command_line,
        hardware=f"{accelerator.num_processes} x {device}",
        train_steps=global_step,
        loss=describe_loss(args),
        sampling=schedules["2step"],
        sample_grid="samples_2step.png",
        extra=mode_settings(args, scheduler.config.sigma_min, scheduler.config.sigma_max, final_levels),
    )
    logger.info(f"Saved the pipeline to {args.output_dir}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        logger.info(
            f"Pushed to {push_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)}"
        )


if __name__ == "__main__":
    run_script(main, parse_args(), "train_consistency.py")
