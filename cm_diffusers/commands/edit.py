"""`cm-diffusers edit TASK`: zero-shot editing of PNG images with a consistency model (Algorithm 4)."""

import os

import numpy as np
import torch

from ..argtypes import int_at_least, non_negative_int, number_list, positive_float, positive_int
from ..edit_tasks import EDIT_TASKS
from ..files import check_image_path, save_image_atomic
from ..images import image_grid
from .generate import DTYPES


def register(subparsers):
    parser = subparsers.add_parser("edit", help="Zero-shot editing: inpaint, colorize, super-resolve, stroke, "
                                                "denoise, interpolate.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, spec in EDIT_TASKS.items():
        task_parser = tasks.add_parser(task, help=spec.help, description=spec.help)
        _add_common_arguments(task_parser, task)
        if spec.image:
            task_parser.add_argument("--image", required=True, help="Input PNG (or any image PIL reads).")
        if spec.mask:
            task_parser.add_argument("--mask", required=True,
                                     help="Mask PNG of the image's size: white = regenerate, black = keep.")
        if "scale_factor" in spec.fields:
            task_parser.add_argument("--scale_factor", type=int_at_least(2), required="scale_factor" in spec.required,
                                     help="Integer upsampling factor; it must divide the model's height and width.")
        if "sigma" in spec.fields:
            task_parser.add_argument("--sigma", type=positive_float, required="sigma" in spec.required,
                                     help="Noise std of the image in the model's [-1, 1] space, e.g. 0.5.")
        if "add_noise" in spec.fields:
            task_parser.add_argument("--add_noise", action="store_true",
                                     help="Add noise of std --sigma to a clean --image first (a demo round trip).")
        if "num_frames" in spec.fields:
            task_parser.add_argument("--num_frames", type=int_at_least(2), default=8,
                                     help="Frames from noise a to noise b.")
            task_parser.add_argument("--seed_b", type=int, default=None,
                                     help="Seed of the second noise (default: --seed + 1).")
        task_parser.set_defaults(func=run)


def _add_common_arguments(parser, task):
    parser.add_argument("--model", default=None,
                        help="Pipeline folder, Hub repo id, or shipped short name (default: fashion-mnist-cd).")
    parser.add_argument("--output", default=f"{task}.png",
                        help="Output PNG; several results (--num_samples, interpolation frames) form a grid.")
    if task not in ("denoise", "stroke"):
        parser.add_argument("--steps", type=positive_int, default=None,
                            help=f"Number of network evaluations (default {1 if task == 'interpolate' else 10}).")
    if task != "denoise":
        parser.add_argument("--timesteps", type=number_list(int, "--timesteps", low=0), default=None,
                            help="Comma-separated descending grid indices, e.g. 22,0 (instead of --steps).")
        parser.add_argument("--sigmas", type=number_list(float, "--sigmas"), default=None,
                            help="Comma-separated descending noise levels (instead of --steps)"
                                 + ("; default: the paper's 5.38,2.24 scaled by sigma_max / 80." if task == "stroke"
                                    else "."))
    parser.add_argument("--num_samples", type=positive_int, default=1,
                        help="Independent results per input (rows of interpolations for interpolate).")
    parser.add_argument("--class_label", type=non_negative_int, default=None,
                        help="Class label for class-conditional models.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed gives the same result.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Weights and compute dtype.")


def _load_image(path: str, mode: str):
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such image: {path}")
    with Image.open(path) as image:
        return image.convert(mode)


def run(args) -> int:
    from ..pipeline_consistency import ConsistencyPipeline
    from ..shipped_models import DEFAULT_MODEL

    task = args.task
    schedule = {}
    if task != "denoise":
        given = [name for name in ("steps", "timesteps", "sigmas") if getattr(args, name, None) is not None]
        if len(given) > 1:
            raise ValueError(f"Pass at most one of --steps, --timesteps and --sigmas, got {given}.")
        schedule = {"num_inference_steps": getattr(args, "steps", None), "timesteps": args.timesteps,
                    "sigmas": args.sigmas}
    check_image_path(args.output, "--output")  # before the model loads: a bad path must not cost the work
    for flag in ("image", "mask"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"No such image: {path} (--{flag}).")

    pipe = ConsistencyPipeline.from_pretrained(args.model or DEFAULT_MODEL, dtype=DTYPES[args.dtype])
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    channels = pipe.unet.config.in_channels
    model_mode = {1: "L", 3: "RGB"}.get(channels)
    if model_mode is None and task != "interpolate":
        raise ValueError(f"The edit command reads PNGs for 1- or 3-channel models; this model has {channels}.")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    common = {"generator": generator, "output_type": "np", "class_labels": args.class_label}

    if task == "interpolate":
        shape = (args.num_samples, *pipe.sample_shape(1)[1:])
        seed_b = args.seed + 1 if args.seed_b is None else args.seed_b
        latents_a = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
        latents_b = torch.randn(shape, generator=torch.Generator().manual_seed(seed_b))
        frames = pipe.interpolate(latents_a, latents_b, num_frames=args.num_frames, **schedule, **common).images
        # frame-major (all samples of frame 0 first) -> one grid row per sample
        images = frames.reshape(args.num_frames, args.num_samples, *frames.shape[1:]).swapaxes(0, 1)
        return _save(images.reshape(-1, *frames.shape[1:]), args.output, nrow=args.num_frames)

    spec = EDIT_TASKS[task]
    image = _load_image(args.image, "RGB" if task == "colorize" and channels == 3 else model_mode)
    options = {name: getattr(args, name) for name in ("scale_factor", "sigma", "add_noise") if name in spec.fields}
    if spec.mask:
        options["mask_image"] = _load_image(args.mask, "L")
    method = getattr(pipe, spec.method)
    result = method([image] * args.num_samples, **options, **schedule, **common).images
    return _save(result, args.output)


def _save(images: np.ndarray, path: str, nrow=None) -> int:
    from PIL import Image

    if len(images) == 1:
        image = (images[0] * 255).round().astype(np.uint8)
        save_image_atomic(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), path)
    else:
        save_image_atomic(image_grid(images, nrow=nrow, padding=2), path)
    print(f"Saved {len(images)} image(s) to {path}")
    return 0
