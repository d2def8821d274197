"""Train a diffusion model to serve as a consistency-distillation teacher (DDPM or EDM), with Accelerate.

The shape follows diffusers' `train_unconditional.py`: parse_args, then main in sections (data, model, EMA,
optimizer, accelerator.prepare, the loop, save). Two model types:

- `--model_type ddpm` (default): a UNet2DModel trained on DDPM's discrete timesteps to predict the noise
  (`--prediction_type epsilon`) or v (`v_prediction`); saved as a standard diffusers DDPMPipeline folder
  (model_index.json, unet/ in safetensors, scheduler/).
- `--model_type edm`: the same UNet with EDM preconditioning (Karras et al. 2022): D(x, sigma) = c_skip x +
  c_out F(c_in x, c_noise) with c_noise = 0.25 ln sigma and sigma_data = 0.5, trained on ln sigma ~ N(P_mean,
  P_std^2) with EDM's loss weight; saved with diffusers' EDMEulerScheduler config, whose precondition_* methods
  compute the scalings here and at sampling time. The folder holds unet/ and scheduler/ (diffusers has no
  unconditional EDM pipeline class), read by `cm_diffusers.load_teacher`.

The run is resumable: `--checkpointing_steps` writes complete checkpoints atomically, `--resume_from_checkpoint
latest` continues exactly where the last one stopped (same data order, same noise, same weights). The pieces this
script shares with train_consistency.py (data order, optimizer and schedule, EMA, checkpoints, logging, flags) live
in `cm_diffusers.training`; the diffusion-specific ones (losses, validation, the saved folder) in
`cm_diffusers.training.diffusion`.

Example (Fashion-MNIST, 28x28, CPU):
    python training/train_diffusion.py --dataset_name fashion_mnist --output_dir teacher-fmnist \
        --train_batch_size 64 --max_train_steps 6000 --use_ema --checkpointing_steps 500
"""

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from cm_diffusers.argtypes import (  # noqa: E402
    finite_float,
    int_at_least,
    positive_float,
    positive_int,
)
from cm_diffusers.training.args import BETA, add_optimization_args, add_output_args, record_command_line  # noqa: E402
from cm_diffusers.training.checkpoints import raise_if_not_finite  # noqa: E402
from cm_diffusers.training.diffusion import (  # noqa: E402
    build_noise_scheduler,
    build_unet,
    loss_for,
    save_pipeline,
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
from training.data import add_data_args, build_dataset, num_classes  # noqa: E402

logger = logging.getLogger("train_diffusion")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a DDPM or EDM diffusion model (a teacher for distillation).")
    parser.add_argument("--output_dir", type=str, required=True, help="Pipeline folder; checkpoints go inside.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_type", type=str, default="ddpm", choices=["ddpm", "edm"], help="Diffusion family.")
    model.add_argument(
        "--prediction_type",
        type=str,
        default="epsilon",
        choices=["epsilon", "v_prediction"],
        help="What the network predicts (DDPM); EDM always trains its preconditioned F (`epsilon` in diffusers).",
    )
    model.add_argument(
        "--ddpm_num_steps", type=int_at_least(2), default=1000, help="DDPM's number of training timesteps."
    )
    model.add_argument(
        "--ddpm_beta_schedule",
        type=str,
        default="linear",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="DDPM's beta schedule.",
    )
    model.add_argument(
        "--sigma_min", type=positive_float, default=0.002, help="EDM: smallest sigma of the sampling schedule."
    )
    model.add_argument(
        "--sigma_max", type=positive_float, default=80.0, help="EDM: largest sigma of the sampling schedule."
    )
    model.add_argument("--sigma_data", type=positive_float, default=0.5, help="EDM: standard deviation of the data.")
    model.add_argument("--p_mean", type=finite_float, default=-1.2, help="EDM training: mean of ln sigma.")
    model.add_argument(
        "--p_std", type=positive_float, default=1.2, help="EDM training: standard deviation of ln sigma."
    )
    model.add_argument(
        "--edm_time_input",
        type=str,
        default="edm",
        choices=["edm", "consistency"],
        help="EDM: the UNet's time input. `edm`: c_noise = 0.25 ln sigma (diffusers' EDMEulerScheduler). "
        "`consistency`: t = 250 ln sigma (OpenAI's convention, the time input of consistency models), so a "
        "consistency student initialised from these weights starts at the teacher's denoiser; saved with "
        "cm_diffusers' ConsistencyTimeEDMEulerScheduler config.",
    )
    model.add_argument(
        "--unet_config", type=str, default=None, help="UNet2DModel config JSON (default: a small UNet for the data)."
    )
    model.add_argument(
        "--class_conditional", action="store_true", help="Condition the UNet on the dataset's class labels."
    )

    add_data_args(parser)

    add_optimization_args(parser, learning_rate=2e-4, adam_beta1=0.95, adam_weight_decay=1e-6, lr_scheduler="cosine",
                          lr_warmup_steps=500, learning_rate_help="Peak learning rate (AdamW).")

    ema = parser.add_argument_group("EMA (diffusers EMAModel with warmup, as in train_unconditional.py)")
    ema.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; saved pipelines use it.")
    ema.add_argument("--ema_max_decay", type=BETA, default=0.9999, help="Upper bound of the EMA decay.")
    ema.add_argument(
        "--ema_inv_gamma", type=positive_float, default=1.0, help="EMA warmup: decay = 1 - (1 + t/inv_gamma)^-p."
    )
    ema.add_argument("--ema_power", type=positive_float, default=0.75, help="EMA warmup power p.")

    add_output_args(parser, checkpointing_steps=500, checkpoints_total_limit=3, validation_steps=1000,
                    report_to="tensorboard", allow_never=False)
    group = parser.add_argument_group("pipeline saves")
    group.add_argument("--save_model_steps", type=positive_int, default=1000,
                       help="Write the pipeline folder (EMA weights) every N steps, and at the end.")
    group.add_argument("--validation_inference_steps", type=positive_int, default=50,
                       help="DDIM / EDM-Euler sampling steps of the validation grids.")

    args = record_command_line(parser.parse_args(argv), argv)
    if args.model_type == "edm" and args.prediction_type != "epsilon":
        parser.error("--model_type edm trains EDM's preconditioned network; leave --prediction_type epsilon.")
    if not args.sigma_min < args.sigma_max:
        parser.error(f"--sigma_min ({args.sigma_min}) must be below --sigma_max ({args.sigma_max}).")
    return args


def main(args):
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.report_to,
                                   os.path.join(args.output_dir, args.logging_dir))
    setup_logging(accelerator)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 1. Data
    with accelerator.main_process_first():
        dataset = build_dataset(args)
    channels, resolution = dataset[0]["pixel_values"].shape[0], dataset[0]["pixel_values"].shape[-1]
    class_count = num_classes(dataset) if args.class_conditional else None
    if args.class_conditional and class_count is None:
        raise ValueError("--class_conditional needs a dataset with class labels (see --label_column).")

    # 2. Model, noise schedule, EMA, loss
    model = build_unet(args, resolution, channels, class_count).train()
    noise_scheduler = build_noise_scheduler(args)
    ema = None
    if args.use_ema:
        ema = make_ema(model, args.ema_max_decay, warmup=True, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
    loss_fn = loss_for(args)
    logger.info(f"UNet2DModel with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # 3. Optimizer and learning-rate schedule, Accelerate, resume
    optimizer = build_optimizer(model.parameters(), args)
    lr_schedule = build_lr_schedule(optimizer, args)
    model, optimizer, global_step = prepare_and_resume(accelerator, args, model, optimizer, lr_schedule, [ema])
    batches = StepBatches(dataset, args, accelerator, global_step)
    log = StepLog(accelerator, args, global_step, "train_diffusion", batches)

    # 4. The loop: load batch, noise it with this step's own generator, loss, backward, step, EMA, log, save
    while global_step < args.max_train_steps:
        step_loss = 0.0
        for micro_step in range(args.gradient_accumulation_steps):
            batch = next(batches)
            clean, class_labels = batch["pixel_values"], batch["class_labels"] if args.class_conditional else None
            micro_index = global_step * args.gradient_accumulation_steps + micro_step
            generator = step_generator(args.seed, micro_index, accelerator.process_index, clean.device)
            with accelerator.accumulate(model):
                loss = loss_fn(model, noise_scheduler, clean, class_labels, generator)
                backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
            step_loss = step_loss + loss.detach() / args.gradient_accumulation_steps
        lr_schedule.step()
        if ema is not None:
            ema.step(model.parameters())
        global_step += 1

        mean_loss = accelerator.reduce(step_loss, reduction="mean")  # the same on every rank: all stop together
        raise_if_not_finite(mean_loss, global_step, args.output_dir)
        logs = {"loss": mean_loss.item(), "lr": lr_schedule.get_last_lr()[0]}
        if ema is not None:
            logs["ema_decay"] = ema.cur_decay_value
        log(global_step, logs, local_loss=step_loss, model=model, lr=f"{logs['lr']:.2e}")

        done = global_step >= args.max_train_steps
        if is_due(args.checkpointing_steps, global_step) or done:
            again = step_generator(args.seed, micro_index, accelerator.process_index, clean.device)
            checkpoint(accelerator, args, global_step, [model], optimizer, ema,
                       probe=lambda: loss_fn(model, noise_scheduler, clean, class_labels, again))  # fmt: skip
        if accelerator.is_main_process and (is_due(args.validation_steps, global_step) or done):
            path = validate(accelerator, evaluation_copy(accelerator.unwrap_model(model), ema), noise_scheduler,
                            args, global_step, class_count)  # fmt: skip
            logger.info(f"Saved validation samples to {path}")
        if accelerator.is_main_process and (is_due(args.save_model_steps, global_step) or done):
            save_pipeline(evaluation_copy(accelerator.unwrap_model(model), ema), noise_scheduler, args.output_dir,
                          args.model_type)  # fmt: skip
            logger.info(f"Saved the pipeline (step {global_step}) to {args.output_dir}")
    finish_run(accelerator, log)
    return global_step


if __name__ == "__main__":
    run_script(main, parse_args(), "train_diffusion.py")
