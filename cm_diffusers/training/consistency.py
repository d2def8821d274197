"""The consistency-model parts of `training/train_consistency.py`: what each mode expands into, the teacher, the
student, the losses, the sampling schedules of the saved pipeline, validation grids and the final save."""

import copy
import logging
import math
import os

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import FrozenDict

from ..files import save_image_atomic
from ..forward_ad import check_forward_ad, make_jvp_safe
from ..images import image_grid
from ..losses import Curriculum, DenoiserLoss, build_loss, make_distance
from ..model_index import TRIGFLOW_PIPELINE_FILE
from ..modes import MODES
from ..parameterization import karras_sigmas, trigflow_t
from ..pipeline_consistency import ConsistencyPipeline
from ..scheduling_consistency import ConsistencyScheduler
from ..trigflow_pipeline import TrigFlowSCMScheduler
from .checkpoints import save_pretrained_atomic
from .runtime import default_unet_config

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Teacher, student, losses


def load_teacher_for(args, accelerator, weight_dtype):
    """The teacher (or None) and the noise range the run uses: the flags' range clipped to the teacher's own. Resolves
    sct/scd's --time_input auto, which depends on the teacher."""
    if args.teacher_model_name_or_path is None:
        if is_trigflow(args):
            args.time_input = resolve_time_input(args, None)
        return None, args.sigma_min, args.sigma_max
    from ..teachers import load_teacher

    with accelerator.main_process_first():
        teacher = load_teacher(args.teacher_model_name_or_path, weight_dtype, accelerator.device)
    teacher.unet.requires_grad_(False).eval()
    # the teacher knows nothing outside its own noise range
    sigma_min, sigma_max = max(args.sigma_min, float(teacher.sigma_min)), min(args.sigma_max, float(teacher.sigma_max))
    logger.info(f"Teacher {args.teacher_model_name_or_path} ({teacher.kind}): sigma in [{sigma_min}, {sigma_max}]")
    if is_trigflow(args):
        args.time_input = resolve_time_input(args, teacher)
        logger.info(f"TrigFlow time input: {args.time_input}")
    return teacher, sigma_min, sigma_max


def is_trigflow(args) -> bool:
    return MODES[args.mode].loss == "trigflow"


def resolve_time_input(args, teacher) -> str:
    """--time_input of sct/scd; auto: the EDM teacher's own time input when the student starts from its weights (then
    the student's f is exactly the teacher's D at the first step), else the paper's c_noise(t) = t (times 1000)."""
    if args.time_input != "auto":
        return args.time_input
    starts_from_teacher = teacher is not None and not (args.no_teacher_init or args.unet_config)
    return (teacher_time_input(teacher) if starts_from_teacher else None) or "t"


def teacher_time_input(teacher):
    """The TrigFlow name of an EDM teacher's time input (250 ln sigma or 0.25 ln sigma), else None."""
    if teacher is None or teacher.kind != "edm":
        return None
    c_noise = float(teacher.scheduler.precondition_noise(torch.tensor(math.e))) * teacher.c_noise_scale  # ln sigma = 1
    for name, value in (("log_sigma", 250.0), ("edm_log_sigma", 0.25)):
        if math.isclose(c_noise, value, rel_tol=1e-5):
            return name
    return None


def consistency_model_weights(name_or_path: str, sigma_data: float) -> tuple:
    """The UNet config and weights of a consistency model to continue training (safetensors only; a diffusion model
    is refused with the flag to use instead)."""
    try:
        pipeline = ConsistencyPipeline.from_pretrained(name_or_path)
    except ValueError as error:
        raise ValueError(f"--student_model_name_or_path: {error} (a diffusion model starts the student through "
                         "--teacher_model_name_or_path)") from None  # fmt: skip
    if pipeline.is_trigflow:
        raise ValueError(f"--student_model_name_or_path {name_or_path} is a continuous-time (TrigFlow) model: its "
                         "network means F of f = cos(t) x_t - sin(t) sigma_d F, not the scalings of this mode's "
                         "consistency function. Continue it by resuming its run (--resume_from_checkpoint).")
    trained_with = float(pipeline.scheduler.config.sigma_data)
    if not math.isclose(trained_with, sigma_data):
        raise ValueError(
            f"--student_model_name_or_path {name_or_path} was trained with sigma_data {trained_with}, this run uses "
            f"{sigma_data}: its weights mean something else under other scalings; pass --sigma_data {trained_with}."
        )
    start = float(pipeline.scheduler.config.sigma_max)
    logger.info(f"--student_model_name_or_path {name_or_path} samples from sigma {start}; this run's pipeline starts "
                "at the top of its trained range unless --sampling_sigma_max (ect) says otherwise.")
    return dict(pipeline.unet.config), pipeline.unet.state_dict()


def build_student(args, teacher, dataset_classes, resolution: int, channels: int) -> UNet2DModel:
    """The online network: the consistency model of --student_model_name_or_path (architecture and weights), else
    --unet_config, the teacher's architecture or `default_unet_config`, started from the teacher's weights when the
    architectures match."""
    weights = None
    if args.student_model_name_or_path:
        config, weights = consistency_model_weights(args.student_model_name_or_path, args.sigma_data)
    elif args.unet_config:
        config = dict(UNet2DModel.load_config(args.unet_config))
    elif teacher is not None:
        config = dict(teacher.unet.config)
    else:
        config = default_unet_config(resolution, channels, dataset_classes if args.class_conditional else None)
    config["dropout"] = args.dropout
    unet = UNet2DModel.from_config(config)
    # Only an EDM teacher trained with the consistency time input t = 250 ln sigma (--edm_time_input consistency, or
    # OpenAI's c_noise_scale 1000) has exactly the student's scalings; a diffusers EDM model takes c_noise = ln(sigma)
    # / 4 and a DDPM eps-model x / sqrt(1 + sigma^2) at t in [0, 1000) and predicts noise. Their convolution and
    # attention features still transfer (--denoiser_warmup_steps re-learns the rest; --no_teacher_init to compare).
    if weights is not None:
        unet.load_state_dict(weights)
        logger.info(f"Student initialised from the consistency model {args.student_model_name_or_path}.")
    elif teacher is not None and not args.no_teacher_init:
        try:
            unet.load_state_dict(teacher.unet.state_dict())
            logger.info("Student initialised from the teacher's UNet.")
            if is_trigflow(args):
                trigflow_from_teacher(unet, teacher, args.time_input)
        except RuntimeError:
            logger.warning("The student's architecture differs from the teacher's: random initialisation.")
    size = unet.config.sample_size
    if unet.config.in_channels != channels or (size if isinstance(size, int) else tuple(size)[0]) != resolution:
        raise ValueError(
            f"The UNet takes {unet.config.in_channels} channel(s) at sample_size {size}, the data has "
            f"{channels} at {resolution}x{resolution}: pass --resolution/--channels or --unet_config."
        )
    if unet.config.num_class_embeds is not None and dataset_classes is None:
        raise ValueError("The UNet is class-conditional but the training data has no labels (--label_column).")
    if args.class_conditional and dataset_classes is None:
        raise ValueError("--class_conditional needs a dataset with class labels (see --label_column).")
    if args.class_conditional and unet.config.num_class_embeds is None:
        raise ValueError(
            "--class_conditional was given, but the student's architecture (from the teacher or --unet_config) is "
            "unconditional: drop the flag, or pass a --unet_config with num_class_embeds."
        )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if is_trigflow(args):  # torch.func.jvp through the student: attention and time embedding that support it
        replaced = make_jvp_safe(unet)
        if replaced:
            logger.info(f"Attention processors {replaced} replaced by JVPAttnProcessor: fused attention kernels have "
                        "no forward-mode AD. The time embedding runs in float32.")
        check_forward_ad(unet, (1, channels, resolution, resolution))
    return unet.train()


def trigflow_from_teacher(unet, teacher, time_input: str):
    """An EDM network F_edm is the TrigFlow network F = -F_edm (v-prediction: +F_edm) at the same time input: negating
    the last convolution makes the student's f exactly the teacher's D when the time inputs match."""
    if teacher.kind != "edm":
        logger.warning(f"The student starts from a {teacher.kind} teacher's weights: its output means something else "
                       "in TrigFlow; the features transfer, the head is relearnt.")
        return
    if teacher.prediction_type == "epsilon":
        with torch.no_grad():
            unet.conv_out.weight.neg_()
            unet.conv_out.bias.neg_()
    exact = teacher_time_input(teacher) == time_input
    logger.info("Student = TrigFlow form of the teacher (F = -F_edm)" + (", exactly (same time input)." if exact else
                f"; time input {time_input} differs from the teacher's, so only the features transfer."))


def build_curriculum(args) -> Curriculum:
    """N(k), mu(k), the ECT stage and sCM's tangent warm-up as functions of the step after the denoiser warm-up."""
    flags = dict(num_scales=args.num_scales, target_ema=args.target_ema_decay, s0=args.s0, s1=args.s1, mu0=args.mu0,
                 num_stages=args.ect_num_stages, tangent_warmup_steps=args.tangent_warmup_steps)  # fmt: skip
    flags = {name: value for name, value in flags.items() if value is not None}  # the mode's own flags
    return Curriculum(args.mode, args.max_train_steps - args.denoiser_warmup_steps, **flags)


def teacher_clip_denoised(choice: str, teacher) -> bool:
    """--teacher_clip_denoised: yes/no, or auto = whatever the teacher's own sampler does (DDPM `clip_sample`)."""
    if choice == "auto":
        from ..teacher_sampling import teacher_clips_denoised

        return teacher is not None and teacher_clips_denoised(teacher)
    return choice == "yes"


def build_losses(args, teacher, sigma_min: float, sigma_max: float, device) -> tuple:
    """The consistency loss of the mode and the denoiser warm-up's loss (None without a warm-up), sharing their
    noise levels and scalings."""
    noise_levels = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=args.sigma_data, p_mean=args.p_mean,
                        p_std=args.p_std)  # fmt: skip
    clip_denoised = teacher_clip_denoised(args.teacher_clip_denoised, teacher)
    distilled = teacher if MODES[args.mode].teacher == "distill" else None  # else only its weights were used
    loss_fn = build_loss(args.mode, make_distance(args.loss_type, args.huber_c, device), teacher=distilled,
                         ode_solver=args.ode_solver,
                         teacher_clip_denoised=clip_denoised, rho=args.rho, q=args.ect_q, k=args.ect_k, b=args.ect_b,
                         time_input=args.time_input, adaptive_weighting=args.adaptive_weighting,
                         prior_weighting=args.prior_weighting, tangent_norm_c=args.tangent_norm_c,
                         **noise_levels)  # fmt: skip
    warmup_loss_fn = None
    if args.denoiser_warmup_steps:
        warmup_teacher = teacher if args.denoiser_warmup_target == "teacher" else None
        warmup_loss_fn = DenoiserLoss(warmup_teacher, clip_denoised=clip_denoised, **noise_levels)
    return loss_fn, warmup_loss_fn


def loss_modules(loss_fn) -> list:
    """The trained parts of a loss (sCM's log-variance head): optimised with the student, saved in checkpoints."""
    head = getattr(loss_fn, "log_variance", None)
    return [head] if head is not None else []


# ----------------------------------------------------------------------------------------------------------------
# Sampling, validation, the saved pipeline and its card


def pipeline_scheduler(args, curriculum: Curriculum, sigma_min: float, sigma_max: float, teacher=None) -> tuple:
    """The scheduler of the saved pipeline (the grid of the final step; ect trains on continuous levels and gets the
    default 40-point grid, sampled by sigmas, starting at --sampling_sigma_max if given) and the 1-/2-step schedules
    it is sampled with."""
    if is_trigflow(args):  # 1 step from t_max = arctan(sigma_max / sigma_d), 2 steps through t(--sigma_mid)
        scheduler = TrigFlowSCMScheduler(sigma_data=args.sigma_data, sigma_min=sigma_min, sigma_max=sigma_max,
                                         time_input=args.time_input,
                                         intermediate_timesteps=float(trigflow_t(args.sigma_mid, args.sigma_data)))
        return scheduler, {"1step": {"num_inference_steps": 1}, "2step": {"num_inference_steps": 2}}
    grid = MODES[args.mode].sampling == "grid"
    num_train_timesteps = curriculum(curriculum.total_steps).num_scales if grid else 40
    if not grid and args.sampling_sigma_max is not None:
        start = args.sampling_sigma_max  # within the trained range, which the teacher may narrow
        if not sigma_min < start <= sigma_max:
            raise ValueError(f"--sampling_sigma_max ({start}) lies outside the noise range trained, [{sigma_min}, "
                             f"{sigma_max}] (the flags' range within the teacher's): pass a value in ({sigma_min}, "
                             f"{sigma_max}].")
        sigma_max = start
    scheduler = ConsistencyScheduler(num_train_timesteps=num_train_timesteps, sigma_min=sigma_min, sigma_max=sigma_max,
                                     sigma_data=args.sigma_data, rho=args.rho)  # fmt: skip
    return scheduler, sampling_schedules(args, num_train_timesteps, sigma_min, sigma_max)


def sampling_schedules(args, num_train_timesteps: int, sigma_min: float, sigma_max: float) -> dict:
    """The 1-step and 2-step schedules the model is sampled with: grid `timesteps`, or `sigmas` for ECT."""
    if MODES[args.mode].sampling == "sigmas":  # trained on continuous levels, not a grid
        return {"1step": {"sigmas": [sigma_max]}, "2step": {"sigmas": [sigma_max, args.sigma_mid]}}
    grid = karras_sigmas(num_train_timesteps, sigma_min, sigma_max, args.rho)
    mid = int(abs(grid[1:-1] - args.sigma_mid).argmin()) + 1 if num_train_timesteps > 2 else 0
    two_step = [mid, 0] if mid > 0 else [0]
    return {"1step": {"num_inference_steps": 1}, "2step": {"timesteps": two_step}}


def sample_grids(pipeline, schedules: dict, num_images: int, seed: int) -> dict:
    """{name: (PIL grid, images as numpy NHWC)} for each schedule, with fixed noise."""
    grids = {}
    rows = int(math.sqrt(num_images))
    columns = num_images // rows
    for name, schedule in schedules.items():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn(pipeline.sample_shape(num_images), generator=generator).to(pipeline.device)
        images = pipeline(batch_size=num_images, latents=latents, generator=generator, output_type="np", **schedule)
        grids[name] = (image_grid(images.images[: rows * columns], nrow=columns), images.images)
    return grids


def write_validation_grids(accelerator, args, grids: dict, global_step: int):
    """Writes {name: (grid, images)} as `samples/step_NNNNNNN_name.png` (and to TensorBoard when it reports)."""
    folder = os.path.join(args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    for name, (grid, images) in grids.items():
        save_image_atomic(grid, os.path.join(folder, f"step_{global_step:07d}_{name}.png"))
        if args.report_to == "tensorboard":
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_images(f"samples_{name}", images, global_step, dataformats="NHWC")


def log_validation(accelerator, unet, ema, scheduler, schedules, args, global_step):
    """Samples 1- and 2-step grids with the evaluation weights; saves PNGs and logs them to TensorBoard."""
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    unet.eval()
    pipeline = ConsistencyPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    write_validation_grids(accelerator, args, sample_grids(pipeline, schedules, args.num_validation_images, args.seed),
                           global_step)
    unet.train()
    if ema is not None:
        ema.restore(unet.parameters())


def describe_loss(args) -> str:
    weighting = MODES[args.mode].weighting_text
    if is_trigflow(args):
        return weighting
    distance = args.loss_type + (f" (c={args.huber_c})" if args.huber_c is not None else "")
    return f"{distance}, weighting {weighting}"


def mode_settings(args, sigma_min, sigma_max, final_levels) -> dict:
    """The settings a model card lists under its training details (sigma_min/sigma_max: the trained range)."""
    settings = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=args.sigma_data, dropout=args.dropout,
                    learning_rate=args.learning_rate, optimizer=args.optimizer, batch_size=args.train_batch_size,
                    ema_decay=args.ema_decay)  # fmt: skip
    if args.sampling_sigma_max is not None:
        settings.update(sampling_sigma_max=args.sampling_sigma_max)
    if args.student_model_name_or_path:
        settings.update(student_initialised_from=args.student_model_name_or_path)
    if args.denoiser_warmup_steps:
        settings.update(denoiser_warmup_steps=args.denoiser_warmup_steps,
                        denoiser_warmup_target=args.denoiser_warmup_target)  # fmt: skip
    settings.update(MODES[args.mode].card_settings(args, final_levels))
    return settings


def save_pipeline(args, unet, ema, scheduler, schedules, final_levels, global_step, accelerator, sigma_range):
    """Writes the ConsistencyPipeline folder, 1-/2-step sample grids and the model card (with the trained
    `sigma_range`); pushes it if asked."""
    from ..hub import push_to_hub, save_model_card

    unet = copy.deepcopy(unet).float()
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    # A student built from the teacher's folder records that folder as `_name_or_path`: a path of this machine,
    # which the saved config (and a Hub upload) must not carry.
    unet._internal_dict = FrozenDict({key: value for key, value in unet.config.items() if key != "_name_or_path"})
    pipeline = ConsistencyPipeline(unet=unet, scheduler=scheduler)
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters())
    code = (TRIGFLOW_PIPELINE_FILE,) if is_trigflow(args) else ()  # the pipeline file plain diffusers runs
    components = ("unet", "scheduler", *code, "model_index.json")
    save_pretrained_atomic(pipeline.save_pretrained, args.output_dir, components, weight_bytes)  # all or nothing
    pipeline.set_progress_bar_config(disable=True)
    for name, (grid, _) in sample_grids(pipeline, schedules, args.num_validation_images, args.seed).items():
        save_image_atomic(grid, os.path.join(args.output_dir, f"samples_{name}.png"))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    save_model_card(
        args.output_dir, mode=args.mode, base_model=args.teacher_model_name_or_path,
        dataset=args.dataset_name or args.train_data_dir,
        training_command="accelerate launch training/train_consistency.py " + args.command_line,
        hardware=f"{accelerator.num_processes} x {device}", train_steps=global_step, loss=describe_loss(args),
        sampling=schedules["2step"], sample_grid="samples_2step.png",
        extra=mode_settings(args, *sigma_range, final_levels),
    )
    logger.info(f"Saved the pipeline to {args.output_dir}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        url = push_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        logger.info(f"Pushed to {url}")
