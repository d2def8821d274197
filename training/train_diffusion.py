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
latest` continues exactly where the last one stopped (same data order, same noise, same weights).

Example (Fashion-MNIST, 28x28, CPU):
    python training/train_diffusion.py --dataset_name fashion_mnist --output_dir teacher-fmnist \
        --train_batch_size 64 --max_train_steps 6000 --use_ema --checkpointing_steps 500
"""

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, UNet2DModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from cm_diffusers.parameterization import append_dims, edm_loss_weight  # noqa: E402
from cm_diffusers.safety import (  # noqa: E402
    WRITE_ERRORS,
    finite_float,
    float_in,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    write_error,
)
from cm_diffusers.training_utils import (  # noqa: E402
    apply_optimizer_flags,
    default_unet_config,
    find_checkpoint,
    load_checkpoint,
    make_accelerator,
    public_config,
    raise_if_not_finite,
    raise_if_weights_not_finite,
    run_script,
    save_checkpoint,
)
from training.data import add_data_args, build_dataset, num_classes  # noqa: E402

logger = logging.getLogger("train_diffusion")
BETA = float_in(0, 1, high_open=True)  # Adam's betas and EMA decays: [0, 1)


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

    train = parser.add_argument_group("training")
    train.add_argument("--train_batch_size", type=positive_int, default=64, help="Batch size per process.")
    train.add_argument("--max_train_steps", type=positive_int, default=10000, help="Number of optimizer steps.")
    train.add_argument("--learning_rate", type=positive_float, default=2e-4, help="Peak learning rate (AdamW).")
    train.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        choices=["cosine", "linear", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after the warmup.",
    )
    train.add_argument("--lr_warmup_steps", type=non_negative_int, default=500, help="Linear warmup steps.")
    train.add_argument("--adam_beta1", type=BETA, default=0.95, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=BETA, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=non_negative_float, default=1e-6, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon.")
    train.add_argument(
        "--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping norm (0 disables it)."
    )
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-batches per step.")
    train.add_argument(
        "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="Autocast precision."
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of the weights, the data order and the noise.")
    train.add_argument(
        "--dataloader_num_workers", type=non_negative_int, default=0, help="Data loading worker processes."
    )

    ema = parser.add_argument_group("EMA (diffusers EMAModel with warmup, as in train_unconditional.py)")
    ema.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; saved pipelines use it.")
    ema.add_argument("--ema_max_decay", type=BETA, default=0.9999, help="Upper bound of the EMA decay.")
    ema.add_argument(
        "--ema_inv_gamma", type=positive_float, default=1.0, help="EMA warmup: decay = 1 - (1 + t/inv_gamma)^-p."
    )
    ema.add_argument("--ema_power", type=positive_float, default=0.75, help="EMA warmup power p.")

    out = parser.add_argument_group("checkpoints and outputs")
    out.add_argument(
        "--checkpointing_steps", type=positive_int, default=500, help="Save the full training state every N."
    )
    out.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=3, help="Keep at most this many checkpoints."
    )
    out.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="`latest` or a checkpoint-N folder to resume from."
    )
    out.add_argument(
        "--save_model_steps",
        type=positive_int,
        default=1000,
        help="Write the pipeline folder (EMA weights) every N steps.",
    )
    out.add_argument(
        "--validation_steps", type=positive_int, default=1000, help="Save a grid of samples every N steps."
    )
    out.add_argument("--num_validation_images", type=positive_int, default=16, help="Images in the validation grid.")
    out.add_argument(
        "--validation_inference_steps", type=positive_int, default=50, help="DDIM / EDM-Euler sampling steps."
    )
    out.add_argument(
        "--report_to", type=str, default="tensorboard", choices=["tensorboard", "none"], help="Where to log."
    )
    out.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to output_dir.")

    args = parser.parse_args(argv)
    if args.model_type == "edm" and args.prediction_type != "epsilon":
        parser.error("--model_type edm trains EDM's preconditioned network; leave --prediction_type epsilon.")
    if not args.sigma_min < args.sigma_max:
        parser.error(f"--sigma_min ({args.sigma_min}) must be below --sigma_max ({args.sigma_max}).")
    return args


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
        from cm_diffusers.teachers import ConsistencyTimeEDMEulerScheduler

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


def step_generator(seed: int, global_step: int, process_index: int, device) -> torch.Generator:
    """The noise and timesteps of one step come from (seed, step, rank) alone, so a resumed run draws the same."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + global_step * 4_099 + process_index)
    return generator


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


def save_image_grid(images: torch.Tensor, path: str):
    """(B, C, H, W) in [-1, 1] -> one PNG, rows of ceil(sqrt(B)) images."""
    images = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    batch, channels, height, width = images.shape
    cols = math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / cols)
    grid = torch.zeros(channels, rows * height, cols * width, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    return grid


def inference_unet(accelerator, model, ema):
    """A float32 copy of the weights to sample and save: the EMA weights when there are some."""
    unet = copy.deepcopy(accelerator.unwrap_model(model)).float()  # a copy draws no random numbers, unlike a new UNet
    if ema is not None:
        ema.copy_to(unet.parameters())
    return unet.eval()


def save_pipeline(unet, noise_scheduler, output_dir: str, model_type: str):
    """Writes the diffusers folder through a temporary sibling; each component is renamed into place when complete.
    A failed write (a full disk) removes the sibling, leaves the previous pipeline intact and says what was needed."""
    tmp_dir = os.path.join(output_dir, ".tmp-pipeline")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        components = write_pipeline_files(unet, noise_scheduler, tmp_dir, model_type)
    except WRITE_ERRORS as error:
        needed = sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters())
        failure = write_error(output_dir, needed, error, "the pipeline")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise failure from error
    for name in components:
        src, dst = os.path.join(tmp_dir, name), os.path.join(output_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst + ".old", ignore_errors=True)
            os.rename(dst, dst + ".old")
        os.replace(src, dst)
        shutil.rmtree(dst + ".old", ignore_errors=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def write_pipeline_files(unet, noise_scheduler, tmp_dir: str, model_type: str) -> tuple:
    """Writes the pipeline's files into `tmp_dir`; returns its components in the order they go into place."""
    if model_type == "ddpm":
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(tmp_dir)
        components = ("unet", "scheduler", "model_index.json")  # the index last: it marks a complete pipeline
    else:
        # diffusers has no unconditional EDM pipeline class to name in a model_index.json: the folder holds the two
        # components (like OpenAI's converted EDM teachers), read by cm_diffusers.load_teacher or by
        # UNet2DModel / EDMEulerScheduler.from_pretrained(folder, subfolder=...).
        unet.save_pretrained(os.path.join(tmp_dir, "unet"))
        noise_scheduler.save_pretrained(os.path.join(tmp_dir, "scheduler"))
        components = ("unet", "scheduler")
        if type(noise_scheduler).__name__ == "ConsistencyTimeEDMEulerScheduler":
            # diffusers' EDMEulerScheduler would feed this network 0.25 ln sigma: ship the pipeline code that samples
            # it correctly, which plain DiffusionPipeline.from_pretrained runs only with trust_remote_code=True.
            from cm_diffusers.teachers import EDM_TEACHER_PIPELINE_FILE, write_edm_teacher_pipeline_files

            write_edm_teacher_pipeline_files(tmp_dir)
            components = ("unet", "scheduler", EDM_TEACHER_PIPELINE_FILE, "model_index.json")
    return components


def optimizer_settings(args) -> dict:
    """The flags a checkpoint records and a resumed run applies (see `apply_optimizer_flags`)."""
    names = ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "lr_scheduler",
             "lr_warmup_steps")  # fmt: skip
    return {name: getattr(args, name) for name in names}


# ----------------------------------------------------------------------------------------------------------------


def main(args):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_dir=os.path.join(args.output_dir, args.logging_dir),
    )
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages
    torch.manual_seed(args.seed)  # weights and the data order (the seedable sampler reads torch.initial_seed())
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Data
    dataset = build_dataset(args)
    resolution, channels = dataset[0]["pixel_values"].shape[-1], dataset[0]["pixel_values"].shape[0]
    class_count = num_classes(dataset) if args.class_conditional else None
    if args.class_conditional and class_count is None:
        raise ValueError("--class_conditional needs a dataset with class labels (see --label_column).")
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),  # not the global RNG, which checkpoints restore
        drop_last=True,  # constant batch shapes; every rank runs the same number of steps
        num_workers=args.dataloader_num_workers,
    )
    if len(train_dataloader) == 0:
        raise ValueError(f"{len(dataset)} images do not fill one batch of --train_batch_size {args.train_batch_size}.")

    # Model, noise schedule, EMA
    model = build_unet(args, resolution, channels, class_count)
    noise_scheduler = build_noise_scheduler(args)
    ema = None
    if args.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    logger.info(f"UNet2DModel with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # Optimizer and learning-rate schedule (Accelerate steps the schedule once per process per optimizer step)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("train_diffusion", config=public_config(args))  # secrets left out

    # Resume: the step fixes the epoch and how many batches of it were already used
    global_step = 0
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        global_step = load_checkpoint(accelerator, checkpoint)
        # the command line's learning rate and Adam settings win over the checkpoint's
        apply_optimizer_flags(checkpoint, optimizer, lr_scheduler, optimizer_settings(args))
    steps_per_epoch = len(train_dataloader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError("--gradient_accumulation_steps is larger than the number of batches per epoch.")
    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(dataset)} images, {args.max_train_steps} steps of {total_batch} images, {num_epochs} epochs, "
        f"starting at step {global_step}"
    )
    loss_fn = ddpm_loss if args.model_type == "ddpm" else edm_loss
    loss_kwargs = {} if args.model_type == "ddpm" else {"p_mean": args.p_mean, "p_std": args.p_std}
    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        disable=not accelerator.is_local_main_process,
        desc="steps",
        unit="step",
    )
    session_start, session_steps = time.perf_counter(), 0

    # The loop
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        model.train()
        train_dataloader.set_epoch(epoch)  # the shuffle order depends on (seed, epoch) only
        batches = train_dataloader
        if epoch == first_epoch and batches_to_skip > 0:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        for micro_step, batch in enumerate(batches):
            clean = batch["pixel_values"]
            class_labels = batch["class_labels"] if args.class_conditional else None
            accumulation = args.gradient_accumulation_steps
            micro_index = global_step * accumulation + micro_step % accumulation
            generator = step_generator(args.seed, micro_index, accelerator.process_index, clean.device)

            with accelerator.accumulate(model):
                loss = loss_fn(model, noise_scheduler, clean, class_labels, generator, **loss_kwargs)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            # One optimizer step done
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            mean_loss = accelerator.reduce(loss.detach(), "mean")  # the same value on every rank: all stop together
            raise_if_not_finite(mean_loss, global_step, args.output_dir)
            logs = {"loss": mean_loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            session_steps += 1
            images_per_second = total_batch * session_steps / (time.perf_counter() - session_start)
            progress.update(1)
            progress.set_postfix(
                {"loss": f"{logs['loss']:.4f}", "lr": f"{logs['lr']:.2e}", "images/s": f"{images_per_second:.1f}"}
            )
            accelerator.log(logs, step=global_step)

            done = global_step >= args.max_train_steps
            if global_step % args.checkpointing_steps == 0 or done:
                # weights of 1e30 are finite yet give NaN next step: the check includes the loss of the new weights
                states = [("optimizer state", optimizer.state_dict())]
                states += [("EMA weights", ema.shadow_params)] if ema is not None else []
                again = step_generator(args.seed, micro_index, accelerator.process_index, clean.device)
                probe = lambda: loss_fn(model, noise_scheduler, clean, class_labels, again, **loss_kwargs)  # noqa: E731
                raise_if_weights_not_finite(accelerator, global_step, args.output_dir, [model], states, probe)
                save_checkpoint(
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit, optimizer_settings(args)
                )
            if accelerator.is_main_process and (global_step % args.validation_steps == 0 or done):
                validate(accelerator, model, ema, noise_scheduler, args, global_step, class_count)
            if accelerator.is_main_process and (global_step % args.save_model_steps == 0 or done):
                unet = inference_unet(accelerator, model, ema)
                save_pipeline(unet, noise_scheduler, args.output_dir, args.model_type)
                logger.info(f"Saved the pipeline (step {global_step}) to {args.output_dir}")
            if done:
                break

    progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def validate(accelerator, model, ema, noise_scheduler, args, global_step, class_count):
    """A grid of DDIM (DDPM) or EDM-Euler samples from the EMA weights, saved as PNG and logged."""
    unet = inference_unet(accelerator, model, ema)
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
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    path = os.path.join(args.output_dir, "samples", f"step-{global_step:07d}.png")
    grid = save_image_grid(images, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", grid.numpy(), global_step, dataformats="CHW")
    logger.info(f"Saved validation samples to {path}")


if __name__ == "__main__":
    run_script(main, parse_args(), "train_diffusion.py")
