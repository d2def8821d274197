"""Evaluation runs as a library: load a consistency model and its teacher, turn each sampler configuration into a
`generate(n, generator)` function, measure FID/KID and time per image, and return one record per configuration.

`cm-diffusers evaluate`, `cm-diffusers benchmark` and `benchmarks/quality.py` are thin wrappers over these functions.
"""

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..images import save_image_grid
from .metrics import InceptionFeatureExtractor, fid_from_features, kid, to_uint8_images
from .reference import DEFAULT_CACHE_DIR, ReferenceStatistics, reference_statistics

DEFAULT_STEPS = "1,2,4"
DEFAULT_TEACHER_SAMPLERS = "heun,euler,ddim"
DEFAULT_TEACHER_NFE = "1,2,4,10,18,35,100"


@dataclass
class EvalSettings:
    """The protocol every configuration of a run shares."""

    num_samples: int = 1000
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    kid_subsets: Optional[int] = None  # default: 100 on GPU (StyleGAN's protocol), 10 on CPU (~1 s each)
    output_dir: Optional[str] = None  # where sample grids go (none when None)

    @property
    def num_kid_subsets(self) -> int:
        return self.kid_subsets or (100 if torch.device(self.device).type == "cuda" else 10)


# ----------------------------------------------------------------------------------------------------------------
# Models


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



# ----------------------------------------------------------------------------------------------------------------
# Generators: generate(n, generator) -> n images in [0, 1]


def consistency_generator(pipe, num_steps: int | None = None, sigmas=None):
    """generate(n, generator) -> n images in [0, 1] from `num_steps` consistency steps or explicit `sigmas`."""

    def generate(batch_size, generator):
        return pipe(batch_size=batch_size, num_inference_steps=num_steps, sigmas=sigmas, output_type="pt",
                    generator=generator).images

    return generate


def teacher_generator(teacher, sampler: str, nfe: int, device, clip_denoised=None):
    """generate(n, generator) -> n images in [0, 1] from the teacher with `sampler` at `nfe` evaluations."""
    from ..teacher_sampling import sample_teacher

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
    from ..teacher_sampling import TEACHER_SAMPLERS, nfe_for_steps, steps_for_nfe

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



# ----------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class GeneratorEvaluation:
    """Metrics of one generator: FID, KID (mean and std over subsets), timing, and a few images for a grid."""

    fid: float
    kid: float
    kid_std: float
    num_samples: int
    seconds: float
    ms_per_image: float
    images_per_second: float
    preview: torch.Tensor


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate_batches(
    generate: Callable[[int, torch.Generator], torch.Tensor],
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
    desc: str = "generating",
) -> Iterator[tuple]:
    """Yields (images, seconds) per batch from `generate(n, generator) -> images in [0, 1]`, with one seeded CPU
    generator for the whole run so results depend only on `seed` and `batch_size`."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}.")
    generator = torch.Generator("cpu").manual_seed(seed)
    sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    for size in tqdm(sizes, desc=desc, disable=not progress, leave=False):
        _synchronize(device)
        start = time.perf_counter()
        images = generate(size, generator)
        _synchronize(device)
        yield images, time.perf_counter() - start


def evaluate_generator(
    generate: Callable[[int, torch.Generator], torch.Tensor],
    reference: ReferenceStatistics,
    extractor: InceptionFeatureExtractor,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
    desc: str = "generating",
    num_preview: int = 64,
    kid_subsets: int = 100,
) -> GeneratorEvaluation:
    """FID and KID of `num_samples` images from `generate` against `reference`, and the generation time.

    Time per image excludes feature extraction; it is measured over the batches after the first (which pays for
    warm-up), or over the only batch when there is one.
    """
    features, seconds, counts, preview = [], [], [], []
    for images, elapsed in generate_batches(generate, num_samples, batch_size, seed, device, progress, desc):
        images = to_uint8_images(images.cpu())
        features.append(extractor(images))
        seconds.append(elapsed)
        counts.append(len(images))
        if sum(len(p) for p in preview) < num_preview:
            preview.append(images[: num_preview - sum(len(p) for p in preview)])
    features = np.concatenate(features)
    timed = slice(1, None) if len(seconds) > 1 else slice(None)
    per_image = sum(seconds[timed]) / sum(counts[timed])
    kid_mean, kid_std = kid(features, reference.features, num_subsets=kid_subsets, device=extractor.device)
    return GeneratorEvaluation(
        fid=fid_from_features(features, reference.mu, reference.sigma),
        kid=kid_mean,
        kid_std=kid_std,
        num_samples=len(features),
        seconds=float(sum(seconds)),
        ms_per_image=1000 * per_image,
        images_per_second=1 / per_image,
        preview=torch.cat(preview),
    )




def setup_reference(reference: str, resolution=None, num_samples: int = 10000, cache_dir=None, inception_path=None,
                    device="cpu", progress: bool = True):
    """The feature extractor and the (cached) statistics of the reference images."""
    extractor = InceptionFeatureExtractor(inception_path, device=device)
    stats = reference_statistics(reference, extractor, num_samples=num_samples, resolution=resolution,
                                 cache_dir=cache_dir or DEFAULT_CACHE_DIR, progress=progress)
    return extractor, stats


def evaluate_configuration(generate, label, reference, extractor, settings: EvalSettings, **fields) -> dict:
    """Runs one configuration, saves its sample grid (when `settings.output_dir`), returns its JSON record."""
    result = evaluate_generator(generate, reference, extractor, settings.num_samples, settings.batch_size,
                                settings.seed, settings.device, progress=settings.progress, desc=label,
                                kid_subsets=settings.num_kid_subsets)
    if settings.output_dir:
        save_image_grid(result.preview, os.path.join(settings.output_dir, "samples", f"{label}.png"))
    record = dict(fields, fid=result.fid, kid=result.kid, kid_std=result.kid_std, ms_per_image=result.ms_per_image,
                  images_per_second=result.images_per_second, num_samples=result.num_samples,
                  seconds=result.seconds)
    print(f"{label:>28}: FID {result.fid:8.2f}  KID {result.kid:.4f}  {result.ms_per_image:8.2f} ms/image")
    return record


def evaluate_consistency_model(pipe, steps: Sequence[int], reference, extractor, settings: EvalSettings,
                               name: str = "consistency model", sigma_schedules: Sequence = ()) -> list:
    """Records of the consistency model at each step count, then at each explicit sigma schedule."""
    tag = "".join(c if c.isalnum() else "-" for c in name)
    for sigmas in sigma_schedules:
        pipe.sampling_sigmas(sigmas=sigmas)  # validate all before spending time
    records = [
        evaluate_configuration(consistency_generator(pipe, k), f"{tag}-{k}step", reference, extractor, settings,
                               model=name, sampler="consistency", steps=k, nfe=k)
        for k in steps
    ]
    for sigmas in sigma_schedules:
        label = f"{tag}-sigmas-" + "-".join(f"{s:g}" for s in sigmas)
        records.append(evaluate_configuration(consistency_generator(pipe, sigmas=sigmas), label, reference,
                                              extractor, settings, model=name, sampler="consistency",
                                              steps=len(sigmas), nfe=len(sigmas), sigmas=list(sigmas)))
    return records


def evaluate_teacher(teacher, samplers: Sequence[str], nfes: Sequence[int], reference, extractor,
                     settings: EvalSettings, name: str = "teacher", clip_denoised: str = "auto") -> list:
    """Records of the teacher for each sampler at each NFE budget (`clip_denoised`: auto, yes or no)."""
    from ..teacher_sampling import steps_for_nfe, teacher_clips_denoised

    clip = teacher_clips_denoised(teacher) if clip_denoised == "auto" else clip_denoised == "yes"
    return [
        evaluate_configuration(teacher_generator(teacher, sampler, nfe, settings.device, clip),
                               f"teacher-{sampler}-nfe{nfe}", reference, extractor, settings, model=name,
                               sampler=sampler, steps=steps_for_nfe(sampler, nfe), nfe=nfe, clip_denoised=clip)
        for sampler, nfe in teacher_configurations(samplers, nfes, teacher.kind)
    ]
