"""`cm-diffusers generate`: sample a PNG grid (and optionally single images) from a consistency model.

Every flag and the output paths are checked before the model is loaded; images are written through a temporary file
and an atomic rename, so two processes writing the same path leave one complete image, never a mix.
"""

import os

import numpy as np
import torch

from ..argtypes import number_list, positive_int
from ..files import check_folder_path, check_image_path, save_image_atomic
from ..images import image_grid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(subparsers):
    parser = subparsers.add_parser("generate", help="Generate images with a consistency model (1 step by default).")
    parser.add_argument("--model", default=None,
                        help="Pipeline folder, Hub repo id, or shipped short name (default: fashion-mnist-cd).")
    parser.add_argument("--num_images", type=positive_int, default=16, help="Number of images to generate.")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="Images per network call.")
    parser.add_argument("--steps", type=positive_int, default=None, help="Number of consistency steps (default 1).")
    parser.add_argument("--timesteps", type=number_list(int, "--timesteps", low=0), default=None,
                        help="Comma-separated descending grid indices, e.g. 22,0 (instead of --steps).")
    parser.add_argument("--ts", type=number_list(int, "--ts", low=0), default=None,
                        help="OpenAI's ascending grid indices, e.g. 0,22,39 (the same schedule as --timesteps 22,0).")
    parser.add_argument("--sigmas", type=number_list(float, "--sigmas"), default=None,
                        help="Comma-separated descending noise levels (instead of --steps).")
    parser.add_argument("--class_labels", type=number_list(int, "--class_labels", low=0), default=None,
                        help="Comma-separated labels (one, or one per image) for class-conditional models.")
    parser.add_argument("--prompt", action="append", default=None,
                        help="Text-to-image latent models (an LCM folder, or a teacher with --lora): the prompt; "
                        "repeat the flag for one prompt per image.")
    parser.add_argument("--lora", default=None,
                        help="LCM-LoRA weights (folder or Hub repo id) for --model, sampled with LCMScheduler.")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="With --prompt: diffusers' guidance scale (default 8.5 for an LCM, 1 for an LCM-LoRA).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed gives the same images.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Weights and compute dtype.")
    parser.add_argument("--output", default="samples.png",
                        help="Path of the grid; its extension picks the format (.png, .jpg, .webp, ...).")
    parser.add_argument("--save_images_dir", default=None, help="Also write each image as a PNG into this folder.")
    parser.add_argument("--nrow", type=positive_int, default=None, help="Images per grid row (default: square-ish).")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline_consistency import ConsistencyPipeline
    from ..shipped_models import DEFAULT_MODEL

    schedule_args = [args.steps, args.timesteps, args.ts, args.sigmas]
    if sum(value is not None for value in schedule_args) > 1:
        raise ValueError("Pass at most one of --steps, --timesteps, --ts and --sigmas.")
    labels = args.class_labels
    if labels is not None and len(labels) not in (1, args.num_images):
        raise ValueError(f"--class_labels needs 1 or {args.num_images} values, got {len(labels)}.")
    check_image_path(args.output, "--output")  # before any work: a bad path must not cost a whole generation
    if args.save_images_dir:
        check_folder_path(args.save_images_dir, "--save_images_dir")
    if args.prompt is not None or args.lora is not None:
        return run_text_to_image(args)
    model = args.model or DEFAULT_MODEL
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if looks_like_path and not os.path.isdir(os.path.expanduser(model)):
        raise FileNotFoundError(f"--model {model!r}: no such folder. Pass a pipeline folder, a Hub repo id (org/name) "
                                "or a shipped model name (fashion-mnist-cd).")

    pipe = ConsistencyPipeline.from_pretrained(os.path.expanduser(model), dtype=DTYPES[args.dtype]).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    timesteps = args.timesteps
    if args.ts is not None:
        from ..parameterization import openai_ts_to_timesteps

        timesteps = openai_ts_to_timesteps(args.ts, pipe.scheduler.config.num_train_timesteps)

    from tqdm.auto import tqdm

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = []
    with tqdm(total=args.num_images, desc="generate", unit="img") as progress:
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            batch_labels = None if labels is None else (labels * count if len(labels) == 1 else
                                                        labels[start:start + count])
            latents = torch.randn(pipe.sample_shape(count), generator=generator)
            out = pipe(batch_size=count, class_labels=batch_labels, latents=latents, generator=generator,
                       num_inference_steps=args.steps or 1, timesteps=timesteps,
                       sigmas=args.sigmas, output_type="np")
            images.append(out.images)
            progress.update(count)
    images = np.concatenate(images)

    save_image_atomic(image_grid(images, args.nrow, padding=2), args.output)
    if args.save_images_dir:
        for i, pil in enumerate(pipe.numpy_to_pil(images)):
            save_image_atomic(pil, os.path.join(args.save_images_dir, f"{i:05d}.png"))
    print(f"Wrote {len(images)} images from {model} to {args.output}")
    return 0


def run_text_to_image(args) -> int:
    """`generate --prompt` on a latent text-to-image model (cm_diffusers.latent.text_to_image, plain diffusers)."""
    from ..latent.text_to_image import DEFAULT_STEPS, check_prompts, generate, load_text_to_image

    if args.prompt is None or args.model is None:
        raise ValueError("A text-to-image model needs --model (an LCM folder, or the teacher of --lora) and --prompt.")
    if args.timesteps is not None or args.ts is not None or args.sigmas is not None or args.class_labels is not None:
        raise ValueError("--prompt samples with LCMScheduler: use --steps (1-8), not --timesteps/--ts/--sigmas or "
                         "--class_labels.")  # fmt: skip
    prompts = check_prompts(args.prompt, args.num_images)
    pipe = load_text_to_image(os.path.expanduser(args.model), args.lora, DTYPES[args.dtype], args.device)
    images = generate(pipe, prompts, args.steps or DEFAULT_STEPS, args.guidance_scale, args.seed, args.batch_size)
    save_image_atomic(image_grid(images, args.nrow, padding=2), args.output)
    if args.save_images_dir:
        for i, pil in enumerate(pipe.numpy_to_pil(images)):
            save_image_atomic(pil, os.path.join(args.save_images_dir, f"{i:05d}.png"))
    print(f"Wrote {len(images)} images from {args.model}{' + ' + args.lora if args.lora else ''} to {args.output}")
    return 0
