#!/usr/bin/env python
"""Consistency distillation (CD, sCD) and consistency training (CT, iCT, ECT, sCT) of a UNet2DModel with Accelerate.

One loop for every mode and one loss path per kind (`cm_diffusers.losses.ConsistencyLoss` for the discrete modes,
`TrigFlowConsistencyLoss` for the continuous-time ones); a mode only changes where the target comes from, how noise
levels or times are drawn, the curriculum, the weighting and the default distance:

    --mode cd   distill a diffusion teacher: one Heun/Euler PF-ODE step of the teacher (Song et al. 2023)
    --mode ct   train from data alone: x_hat_{n+1} = x + sigma_{n+1} z, curriculum N(k) and target EMA mu(k)
    --mode ict  improved CT (Song & Dhariwal 2023): pseudo-Huber, 1/(sigma_n - sigma_{n+1}) weights, lognormal
                noise levels, doubling curriculum, no EMA target, dropout
    --mode ect  easy consistency tuning (Geng et al. 2024): start from a diffusion model's UNet, continuous sigma and
                a gap sigma - r that shrinks stage by stage; the cheapest route to good 2-step samples
    --mode sct  continuous-time CT (Lu & Song 2024) in TrigFlow: the JVP of the network along the data tangent
                cos(t) z - sin(t) x0, normalised and warmed-up tangent, learned adaptive weighting
    --mode scd  continuous-time CD: the same loss with the teacher's PF-ODE tangent (any EDM or DDPM teacher)
    --mode lcd  latent consistency distillation (LCM / LCM-LoRA) of a Stable-Diffusion-shaped text-to-image teacher:
                the teacher's guided DDIM step in its VAE latent space; saves an LCM pipeline or LoRA weights

Every mode is one record of `cm_diffusers.modes.MODES` (its estimator, levels or times, weighting, curriculum, flag
defaults, card text); `--help` lists them from there.

Examples (one GPU; several with `--multi_gpu --num_processes N`, which on a machine without CUDA forms a gloo group
of CPU processes):

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
run continues exactly where it stopped. The pieces this script shares with train_diffusion.py (data order, optimizer
and schedule, EMA/target, checkpoints, logging, flags) live in `cm_diffusers.training`.
"""

import argparse
import copy
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `training` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_diffusers.argtypes import (  # noqa: E402
    finite_float,
    float_at_least,
    float_in,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from cm_diffusers.modes import MODES  # noqa: E402
from cm_diffusers.networks import unet_forward  # noqa: E402
from cm_diffusers.training import consistency as pixel_parts  # noqa: E402
from cm_diffusers.training import latent as latent_parts  # noqa: E402
from cm_diffusers.training.args import add_optimization_args, add_output_args, record_command_line  # noqa: E402
from cm_diffusers.training.checkpoints import raise_if_not_finite  # noqa: E402
from cm_diffusers.training.consistency import build_curriculum, loss_modules  # noqa: E402
from cm_diffusers.training.loop import (  # noqa: E402
    StepBatches,
    StepLog,
    backward_and_step,
    build_lr_schedule,
    build_optimizer,
    checkpoint,
    finish_run,
    is_due,
    make_ema,
    prepare_and_resume,
    raise_if_diverged,
    setup_logging,
    update_target,
)
from cm_diffusers.training.runtime import check_model_source, make_accelerator, run_script  # noqa: E402
from training.data import add_data_args, build_dataset, num_classes  # noqa: E402

# What builds a mode's teacher, student, losses and saved model, by its record's `space`: pixel-space consistency
# models (a ConsistencyPipeline) or latent text-to-image ones (lcd: an LCM pipeline or LCM-LoRA weights).
PARTS = {"pixel": pixel_parts, "latent": latent_parts}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", type=str, required=True, choices=list(MODES),
                        help="; ".join(f"{name}: {mode.help}" for name, mode in MODES.items()) + ".")
    parser.add_argument("--output_dir", type=str, required=True, help="Where the pipeline and checkpoints go.")

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
        "--student_model_name_or_path",
        type=str,
        default=None,
        help="A consistency model (pipeline folder, Hub repo id or shipped name) whose weights and architecture "
        "start the student, to continue or fine-tune it (e.g. more CD steps from the same teacher with a new "
        "learning-rate schedule). Default: the teacher's weights.",
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
        "--num_scales", type=int_at_least(2), default=None,
        help="cd: grid size N (18 CIFAR, 40 ImageNet-64); lcd: DDIM timesteps of the skipping-step grid (50).",
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
    group.add_argument("--p_mean", type=finite_float, default=None,
                       help="ict/ect/sct/scd: mean of ln sigma (-1.1; sct/scd -1.0).")
    group.add_argument("--p_std", type=positive_float, default=None,
                       help="ict/ect/sct/scd: std of ln sigma (2.0; sct/scd 1.4).")
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
    group.add_argument(
        "--sampling_sigma_max",
        type=positive_float,
        default=None,
        help="ect: the level the saved pipeline's samples start from (its scheduler's sigma_max; default the top "
        "of the trained range, --sigma_max within the teacher's). ECT's lognormal levels rarely reach that top: "
        "measure 1-step FID from a lower start with `cm-diffusers evaluate --sigmas`, then set it here.",
    )

    group = parser.add_argument_group("continuous time (sct, scd)")
    group.add_argument("--time_input", type=str, default=None, choices=["auto", "t", "log_sigma", "edm_log_sigma"],
                       help="The network's time input c_noise(t): t (1000 t, the sCM paper's choice), log_sigma (250 "
                       "ln sigma, the consistency models' and our EDM teacher's) or edm_log_sigma (0.25 ln sigma, "
                       "diffusers' EDM). auto: the EDM teacher's when the student starts from its weights (exact "
                       "start), else t.")
    group.add_argument("--tangent_warmup_steps", type=non_negative_int, default=None,
                       help="H: the tangent's second term is scaled by r = min(1, step / H) (1000).")
    group.add_argument("--tangent_norm_c", type=non_negative_float, default=None,
                       help="Tangent normalisation g / (||g|| + c) (0.1; 0: none).")
    group.add_argument("--adaptive_weighting", action=argparse.BooleanOptionalAction, default=None,
                       help="Learn the log-variance weighting w(t) (default on); saved in checkpoints, not in the "
                       "pipeline.")
    group.add_argument("--prior_weighting", action="store_true",
                       help="Weight the loss by 1 / (sigma_d tan t) (the paper's prior weighting; unstable at small "
                       "scale).")

    add_optimization_args(parser, learning_rate=None, optimizers=("radam", "adamw"),
                          learning_rate_help="Peak learning rate (cd/ct 4e-4, ict/ect 1e-4).")
    parser.add_argument("--ema_decay", type=float_in(0, 1, high_open=True), default=0.9999,
                        help="Evaluation EMA (0: save the online weights; lcd: 0 unless given).")
    add_output_args(parser)
    add_data_args(parser)
    latent_parts.add_lcd_args(parser)
    args = record_command_line(parser.parse_args(argv), argv)
    mode = MODES[args.mode]
    for name, value in mode.defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.p_mean = -1.1 if args.p_mean is None else args.p_mean  # ict/ect and the denoiser warm-up
    args.p_std = 2.0 if args.p_std is None else args.p_std
    if mode.loss == "trigflow":
        for flag, given in (("--denoiser_warmup_steps", args.denoiser_warmup_steps),
                            ("--student_model_name_or_path", args.student_model_name_or_path)):
            if given:
                parser.error(f"{flag} is not available in --mode {args.mode} (TrigFlow parameterization).")
        if args.loss_type != "l2":
            parser.error(f"--mode {args.mode} trains with squared L2 on F (sCM); drop --loss_type {args.loss_type}.")
    if mode.space == "latent":
        latent_parts.check_lcd_args(parser, args)
    if mode.teacher in ("distill", "init") and args.teacher_model_name_or_path is None:
        parser.error(f"--mode {args.mode} starts from a diffusion model: pass --teacher_model_name_or_path.")
    if args.teacher_model_name_or_path is not None:
        try:  # now, not after minutes of data loading
            check_model_source(args.teacher_model_name_or_path, "--teacher_model_name_or_path")
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    if args.student_model_name_or_path is not None:
        if args.no_teacher_init or args.unet_config:
            parser.error("--student_model_name_or_path fixes the student's weights and architecture: drop "
                         "--no_teacher_init and --unet_config.")
        try:
            check_model_source(args.student_model_name_or_path, "--student_model_name_or_path")
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    if not args.sigma_min < args.sigma_max:
        parser.error(f"--sigma_min ({args.sigma_min}) must be below --sigma_max ({args.sigma_max}).")
    # the flags a mode reads are set (by its defaults or the command line); the others are None
    if args.s0 is not None and args.s1 is not None and not 1 <= args.s0 <= args.s1:
        parser.error("The curriculum needs 1 <= --s0 <= --s1.")
    if args.mu0 is not None and not 0 < args.mu0 < 1:
        parser.error("--mu0 must lie in (0, 1).")
    if not 0 <= args.denoiser_warmup_steps < args.max_train_steps:
        parser.error("--denoiser_warmup_steps must lie in [0, --max_train_steps): the consistency loss needs steps.")
    if args.denoiser_warmup_target is None:
        args.denoiser_warmup_target = "teacher" if mode.teacher == "distill" else "data"
    if args.denoiser_warmup_target == "teacher" and args.teacher_model_name_or_path is None:
        parser.error("--denoiser_warmup_target teacher needs --teacher_model_name_or_path.")
    if not args.sigma_min < args.sigma_mid < args.sigma_max:
        parser.error("--sigma_mid must lie between --sigma_min and --sigma_max.")
    if args.sampling_sigma_max is not None:
        if mode.sampling != "sigmas":
            parser.error(f"--sampling_sigma_max is for modes trained on continuous levels (ect); {args.mode} models "
                         "sample on their training grid, which starts at --sigma_max.")
        if not args.sigma_mid < args.sampling_sigma_max <= args.sigma_max:
            parser.error(f"--sampling_sigma_max ({args.sampling_sigma_max}) must lie in (--sigma_mid, --sigma_max] "
                         f"= ({args.sigma_mid}, {args.sigma_max}].")
    return args


def main(args):
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.report_to,
                                   os.path.join(args.output_dir, args.logging_dir))
    setup_logging(accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 1. Teacher (cd: the ODE steps; cd and ect: the initialisation), first: a bad teacher fails before data loads
    parts = PARTS[MODES[args.mode].space]
    teacher, sigma_min, sigma_max = parts.load_teacher_for(args, accelerator, weight_dtype)
    curriculum = build_curriculum(args)
    scheduler, schedules = parts.pipeline_scheduler(args, curriculum, sigma_min, sigma_max, teacher)  # checks too

    # 2. Data, then the student (identical initial weights on every rank), the target and the evaluation EMA
    with accelerator.main_process_first():  # downloads and dataset caches are written once
        dataset = build_dataset(args)
    channels, resolution = dataset[0]["pixel_values"].shape[0], dataset[0]["pixel_values"].shape[-1]
    torch.manual_seed(args.seed)
    unet = parts.build_student(args, teacher, num_classes(dataset), resolution, channels)
    torch.manual_seed(args.seed + accelerator.process_index)  # noise and dropout differ per rank
    # mu = 0 makes the target the stop-gradient of the online network itself: no copy needed
    target_unet = copy.deepcopy(unet).requires_grad_(False) if curriculum.uses_target_ema else None
    ema = make_ema(unet, args.ema_decay) if args.ema_decay > 0 else None
    loss_fn, warmup_loss_fn = parts.build_losses(args, teacher, sigma_min, sigma_max, accelerator.device)
    heads = [head.to(accelerator.device) for head in loss_modules(loss_fn)]  # sCM's learned weighting w(t)
    teacher = None  # the losses hold what they need; ect used only the weights, copied above

    # 3. Optimizer and learning-rate schedule, Accelerate, resume (heads: trained alongside, saved in checkpoints)
    optimizer = build_optimizer([*unet.parameters(), *(p for head in heads for p in head.parameters())], args)
    lr_schedule = build_lr_schedule(optimizer, args)
    unet, optimizer, global_step = prepare_and_resume(accelerator, args, unet, optimizer, lr_schedule,
                                                      registered=[target_unet, ema, *heads])
    batches = StepBatches(dataset, args, accelerator, global_step)
    raw_unet = accelerator.unwrap_model(unet)
    conditional = raw_unet.config.num_class_embeds is not None
    student = unet_forward(unet)
    target = unet_forward(target_unet if target_unet is not None else raw_unet)
    log = StepLog(accelerator, args, global_step, "train_consistency", batches)
    trained = torch.nn.ModuleList([raw_unet, *heads]) if heads else raw_unet  # what every rank must hold alike

    # 4. The loop: load batch, sample levels, loss, backward, step, update target/EMA, log, checkpoint
    while global_step < args.max_train_steps:
        # N(k), mu(k), ECT stage: from the global step, the same on every rank; the denoiser warm-up comes first
        warming_up = global_step < args.denoiser_warmup_steps
        levels = curriculum(max(global_step - args.denoiser_warmup_steps, 0))
        step_loss_fn = warmup_loss_fn if warming_up else loss_fn
        step_loss = 0.0
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            sample, class_labels = batch["pixel_values"], batch.get("class_labels") if conditional else None
            text = {"captions": batch["captions"]} if "captions" in batch else {}  # text-to-image data (lcd)
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    loss, stats = step_loss_fn(student, target, sample, levels, class_labels, **text)
                backward_and_step(accelerator, unet, optimizer, loss, args.max_grad_norm, unwrapped=heads)
            step_loss = step_loss + loss.detach() / args.gradient_accumulation_steps
        lr_schedule.step()
        if target_unet is not None:
            update_target(target_unet, raw_unet, 0.0 if warming_up else levels.target_ema)
        if ema is not None:
            ema.step(raw_unet.parameters())
        global_step += 1

        mean_loss = accelerator.reduce(step_loss, reduction="mean")
        raise_if_not_finite(mean_loss, global_step, args.output_dir)  # before any checkpoint of these weights
        # one device-to-host copy for every logged tensor (the NaN check above has synchronised already)
        logged = dict(zip(["loss", *stats], torch.stack([mean_loss, *stats.values()]).float().tolist()))
        log(global_step, {**logged, "lr": lr_schedule.get_last_lr()[0], "num_scales": levels.num_scales,
                          "target_ema": levels.target_ema, "stage": levels.stage, "denoiser_warmup": int(warming_up)},
            local_loss=step_loss, model=trained, N=levels.num_scales)  # fmt: skip
        if is_due(args.checkpointing_steps, global_step):
            checkpoint(accelerator, args, global_step, [raw_unet, target_unet, *heads], optimizer, ema,
                       probe=lambda: step_loss_fn(student, target, sample, levels, class_labels, **text)[0])
        if is_due(args.validation_steps, global_step) and accelerator.is_main_process:
            parts.log_validation(accelerator, raw_unet, ema, scheduler, schedules, args, global_step)

    # 5. Save the pipeline with the evaluation (EMA) weights, sample grids and the model card; only the main process
    raise_if_diverged(accelerator, args, global_step, [raw_unet, target_unet, *heads], optimizer, ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_levels = curriculum(max(global_step - args.denoiser_warmup_steps, 0))
        parts.save_pipeline(args, raw_unet, ema, scheduler, schedules, final_levels, global_step, accelerator,
                            (sigma_min, sigma_max))
        log.event(event="saved_pipeline", rank=accelerator.process_index)
    finish_run(accelerator, log)
    return global_step


if __name__ == "__main__":
    run_script(main, parse_args(), "train_consistency.py")
