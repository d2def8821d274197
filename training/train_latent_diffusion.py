#!/usr/bin/env python
"""Train a small text-to-image latent diffusion model (a Stable-Diffusion-shaped teacher for `--mode lcd`).

Two stages in one run and one loop: the first --vae_steps steps train the AutoencoderKL (reconstruction + a small
KL), the rest train a UNet2DConditionModel in its frozen latent space together with a small CLIP text encoder whose
byte-level tokenizer the project writes itself (no downloads), with prompts dropped 10% of the time for
classifier-free guidance. The result is a StableDiffusionPipeline folder with SD's noise schedule and DDIM sampler.

The run shares the training core with the other scripts (step-indexed data order, optimizer and schedule, EMA,
atomic checkpoints, exact resume, logs: `cm_diffusers.training`). Prompts come from --caption_column or, for labelled
data, from class names through --caption_template.

Images must be a multiple of 8 pixels (diffusers' Stable Diffusion pipelines check it): Fashion-MNIST trains at
--resolution 32. Example (Fashion-MNIST with class-name prompts, CPU):
    python training/train_latent_diffusion.py --dataset_name fashion_mnist --caption_template "a {}" \
        --resolution 32 --output_dir fashion-mnist-ldm --train_batch_size 64 --vae_steps 1500 --max_train_steps 6000
"""

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from cm_diffusers.argtypes import float_in, non_negative_float, non_negative_int, positive_int  # noqa: E402
from cm_diffusers.latent.tokenizer import build_clip_tokenizer  # noqa: E402
from cm_diffusers.training.args import BETA, add_optimization_args, add_output_args, record_command_line  # noqa: E402
from cm_diffusers.training.checkpoints import raise_if_not_finite  # noqa: E402
from cm_diffusers.training.latent_diffusion import (  # noqa: E402
    build_latent_diffusion_model,
    build_noise_scheduler,
    diffusion_loss,
    latent_scaling_factor,
    pipeline_of,
    save_pipeline,
    vae_loss,
    validate,
)
from cm_diffusers.training.loop import (  # noqa: E402
    StepBatches,
    StepLog,
    backward_and_step,
    build_lr_schedule,
    build_optimizer,
    checkpoint,
    evaluation_copy,
    finish_run,
    is_due,
    make_ema,
    prepare_and_resume,
    setup_logging,
    step_generator,
)
from cm_diffusers.training.runtime import make_accelerator, run_script  # noqa: E402
from training.data import add_data_args, build_dataset  # noqa: E402

logger = logging.getLogger("train_latent_diffusion")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=str, required=True, help="Pipeline folder; checkpoints go inside.")
    model = parser.add_argument_group("model")
    model.add_argument("--vae_channels", type=str, default="16,32", help="VAE block widths (each extra halves).")
    model.add_argument("--latent_channels", type=positive_int, default=4, help="Channels of the latent space.")
    model.add_argument("--unet_channels", type=str, default="32,64", help="UNet block widths.")
    model.add_argument("--unet_layers_per_block", type=positive_int, default=1, help="UNet layers per block.")
    model.add_argument("--text_hidden_size", type=positive_int, default=64, help="Text encoder width.")
    model.add_argument("--text_layers", type=positive_int, default=2, help="Text encoder layers.")
    model.add_argument("--max_prompt_length", type=positive_int, default=20, help="Tokens per prompt (bytes + 2).")
    model.add_argument("--vae_steps", type=non_negative_int, default=1500, help="Steps of stage 1 (the VAE).")
    model.add_argument("--kl_weight", type=non_negative_float, default=1e-4, help="Stage 1: KL weight per value.")
    model.add_argument("--caption_dropout", type=float_in(0, 1), default=0.1, help="Stage 2: share of empty prompts.")
    add_data_args(parser)
    add_optimization_args(parser, learning_rate=2e-4, adam_weight_decay=1e-6, lr_scheduler="constant_with_warmup",
                          lr_warmup_steps=200, learning_rate_help="Peak learning rate (AdamW).")  # fmt: skip
    parser.add_argument("--ema_max_decay", type=BETA, default=0.999, help="EMA of the UNet (with warm-up).")
    add_output_args(parser, checkpointing_steps=250, checkpoints_total_limit=2, validation_steps=1000,
                    report_to="none", allow_never=False)  # fmt: skip
    group = parser.add_argument_group("validation and saves")
    group.add_argument("--save_model_steps", type=positive_int, default=1000, help="Write the pipeline every N steps.")
    group.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                       help="Prompts of the grids (default: every class prompt, or the first captions).")
    group.add_argument("--validation_inference_steps", type=positive_int, default=25, help="DDIM steps of the grids.")
    group.add_argument("--validation_guidance_scale", type=non_negative_float, default=4.0, help="Their guidance.")
    args = record_command_line(parser.parse_args(argv), argv)
    if args.caption_column is None and args.caption_template is None:
        parser.error("Pass --caption_column (a text column) or --caption_template (prompts from class names).")
    if args.resolution is not None and args.resolution % 8:
        parser.error(f"--resolution {args.resolution} is not a multiple of 8, which diffusers' SD pipelines require.")
    if not args.vae_steps < args.max_train_steps:
        parser.error("--vae_steps must be below --max_train_steps: the diffusion model needs steps too.")
    return args


def main(args):
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.report_to,
                                   os.path.join(args.output_dir, args.logging_dir))
    setup_logging(accelerator)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    os.makedirs(args.output_dir, exist_ok=True)

    # 1. Data with prompts, the project's own tokenizer
    with accelerator.main_process_first():
        dataset = build_dataset(args)
    channels, resolution = dataset[0]["pixel_values"].shape[0], dataset[0]["pixel_values"].shape[-1]
    tokenizer = build_clip_tokenizer(os.path.join(args.output_dir, ".tokenizer"), args.max_prompt_length)
    first_captions = (dataset[i]["captions"] for i in range(min(len(dataset), 500)))
    prompts = args.validation_prompts or list(dict.fromkeys(first_captions))[:10]

    # 2. Model (VAE + UNet + text encoder), noise schedule, EMA of the UNet
    model = build_latent_diffusion_model(args, resolution, channels, tokenizer).train()
    noise_scheduler = build_noise_scheduler()
    ema = make_ema(model.unet, args.ema_max_decay, warmup=True)
    for name, part in (("VAE", model.vae), ("UNet", model.unet), ("text encoder", model.text_encoder)):
        logger.info(f"{name}: {sum(p.numel() for p in part.parameters()) / 1e6:.2f}M parameters")
    scale_batch = torch.stack([dataset[i]["pixel_values"] for i in range(min(len(dataset), 256))])

    # 3. Optimizer and learning-rate schedule, Accelerate, resume
    optimizer = build_optimizer(model.parameters(), args)
    lr_schedule = build_lr_schedule(optimizer, args)
    model, optimizer, global_step = prepare_and_resume(accelerator, args, model, optimizer, lr_schedule, [ema])
    raw = accelerator.unwrap_model(model)
    batches = StepBatches(dataset, args, accelerator, global_step)
    log = StepLog(accelerator, args, global_step, "train_latent_diffusion", batches)

    # 4. The loop: stage 1 trains the VAE, stage 2 the latent diffusion model in the frozen VAE's space
    vae_frozen = False
    while global_step < args.max_train_steps:
        stage = 1 if global_step < args.vae_steps else 2
        if stage == 2 and not vae_frozen:
            # entering stage 2 (or resuming in it): freeze the VAE and fix the latents' scale from its weights alone
            raw.vae.requires_grad_(False).eval()
            raw.vae.register_to_config(scaling_factor=latent_scaling_factor(raw.vae, scale_batch.to(raw.vae.device)))
            vae_frozen = True
            logger.info(f"Stage 2 from step {global_step}: latent scaling factor {raw.vae.config.scaling_factor:.4f}")
        step_loss = 0.0
        for micro_step in range(args.gradient_accumulation_steps):
            batch = next(batches)
            micro_index = global_step * args.gradient_accumulation_steps + micro_step
            generator = step_generator(args.seed, micro_index, accelerator.process_index, accelerator.device)
            with accelerator.accumulate(model):
                if stage == 1:
                    loss = vae_loss(raw, batch["pixel_values"], args.kl_weight, generator)
                else:
                    loss = diffusion_loss(raw, noise_scheduler, batch["pixel_values"], batch["captions"], tokenizer,
                                          args.caption_dropout, generator)  # fmt: skip
                backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
            step_loss = step_loss + loss.detach() / args.gradient_accumulation_steps
        lr_schedule.step()
        if stage == 2:
            ema.step(raw.unet.parameters())
        global_step += 1

        mean_loss = accelerator.reduce(step_loss, reduction="mean")
        raise_if_not_finite(mean_loss, global_step, args.output_dir)
        log(global_step, {"loss": mean_loss.item(), "stage": stage, "lr": lr_schedule.get_last_lr()[0]},
            local_loss=step_loss, model=model, stage=stage)  # fmt: skip
        done = global_step >= args.max_train_steps
        if is_due(args.checkpointing_steps, global_step) or done:
            checkpoint(accelerator, args, global_step, [model], optimizer, ema)
        if accelerator.is_main_process and stage == 2 and (is_due(args.save_model_steps, global_step) or done):
            pipeline = pipeline_of(raw.vae, evaluation_copy(raw.unet, ema), raw.text_encoder, tokenizer)
            save_pipeline(pipeline, args.output_dir)
            path = validate(pipeline, prompts, args, global_step)
            logger.info(f"Saved the pipeline (step {global_step}) to {args.output_dir}; samples {path}")
    finish_run(accelerator, log)
    return global_step


if __name__ == "__main__":
    run_script(main, parse_args(), "train_latent_diffusion.py")
