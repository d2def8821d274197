"""Where should one-step sampling start? FID, KID and pixel statistics of consistency models sampled in one step from
several noise levels.

ECT draws its training levels from a lognormal that rarely reaches sigma_max (ln sigma ~ N(-0.4, 2) on [0.002, 80]:
1.2% of the levels lie between 40 and 80), so a one-step sample from sigma_max evaluates the network where it is least
trained. For each model and each start sigma this measures, with the README's protocol at a smaller sample count:

- FID and KID of `--num_samples` one-step samples (seed 0, against the cached 10,000-image train statistics);
- the pixel Wasserstein-1 distance to 256 real test images of 32 one-step samples at seeds 0-3 (the statistic and
  the sample size of the shipped-model test, tests/test_pretrained.py), and the fraction of near-black pixels.

A model whose scheduler starts below the highest start asked for (e.g. the shipped `fashion-mnist-ct`, sigma_max 40)
is sampled with its scheduler's range opened up to it (`ConsistencyScheduler.from_config(..., sigma_max=...)`).

    python benchmarks/sampling_start.py --model ct=fashion-mnist-ct --model cd=fashion-mnist-cd --starts 80,40,20 \
        --num_samples 500 --output benchmarks/results/sampling_start.json
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler  # noqa: E402
from cm_diffusers.evaluation import (  # noqa: E402
    EvalSettings,
    consistency_generator,
    evaluate_configuration,
    pixel_wasserstein1,
    read_fashion_mnist,
    setup_reference,
)

PIXEL_TEST_IMAGES, PIXEL_TEST_SEEDS, DARK = 32, 4, 0.02


def load_opened(path: str, start: float) -> ConsistencyPipeline:
    """The pipeline, its scheduler's range extended to `start` when the folder starts lower."""
    pipe = ConsistencyPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if pipe.scheduler.config.sigma_max < start:
        pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config, sigma_max=start)
    return pipe


def pixel_statistics(pipe, start: float, real: np.ndarray) -> dict:
    distances, dark = [], []
    for seed in range(PIXEL_TEST_SEEDS):
        images = pipe(batch_size=PIXEL_TEST_IMAGES, sigmas=[start], output_type="np",
                      generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
        distances.append(pixel_wasserstein1(images, real))
        dark.append(float((images < DARK).mean()))
    return {"pixel_w1_per_seed": distances, "pixel_w1_mean": float(np.mean(distances)),
            "dark_fraction": float(np.mean(dark))}  # fmt: skip


def plot(report: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in report["models"].items():
        starts = [row["start"] for row in rows]
        left.plot(starts, [row["fid"] for row in rows], "-o", label=label)
        right.plot(starts, [row["pixel_w1_mean"] for row in rows], "-o", label=label)
    right.axhline(report["pixel_test_bound"], color="grey", ls="--", lw=1, label="shipped-model test bound")
    for ax, name in ((left, f"FID ({report['num_samples']} samples)"), (right, "pixel W1 (mean of seeds 0-3)")):
        ax.set_xscale("log")
        ax.set_xlabel("one-step start sigma")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("One-step samples from several starting noise levels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                        help="A consistency pipeline folder or shipped name; repeat.")
    parser.add_argument("--starts", default="80,40,20", help="Comma-separated start levels.")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--cache_dir", default=".fid_cache", help="Cached reference statistics.")
    parser.add_argument("--output", default="benchmarks/results/sampling_start.json")
    args = parser.parse_args(argv)
    starts = sorted((float(s) for s in args.starts.split(",")), reverse=True)

    models = [(label, path) for label, _, path in (spec.partition("=") for spec in args.model)]
    resolution = load_opened(models[0][1], starts[0]).unet.config.sample_size  # the statistics' cache key has it
    extractor, reference = setup_reference("fashion-mnist-train", resolution=resolution, num_samples=10000,
                                           cache_dir=args.cache_dir)  # fmt: skip
    settings = EvalSettings(num_samples=args.num_samples, batch_size=args.batch_size, seed=0, progress=False)
    real = read_fashion_mnist("test")[:256].astype(np.float32) / 255
    report = {"num_samples": args.num_samples, "seed": 0, "reference": "10,000 Fashion-MNIST train images",
              "pixel_test": f"{PIXEL_TEST_IMAGES} images per seed, seeds 0-{PIXEL_TEST_SEEDS - 1}, "
                            "against 256 real test images",
              "pixel_test_bound": 0.05, "dark_threshold": DARK,
              "real_dark_fraction": float((real < DARK).mean()), "models": {}}  # fmt: skip
    for label, path in models:
        pipe = load_opened(path, starts[0])
        rows = []
        for start in starts:
            record = evaluate_configuration(consistency_generator(pipe, sigmas=[start]), f"{label}-from-{start:g}",
                                            reference, extractor, settings, model=label, start=start)  # fmt: skip
            record.update(pixel_statistics(pipe, start, real))
            print(f"{label} from {start:g}: pixel W1 {record['pixel_w1_mean']:.4f}, "
                  f"dark {record['dark_fraction']:.3f}", flush=True)  # fmt: skip
            rows.append(record)
        report["models"][label] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.splitext(args.output)[0] + ".png")
    print(f"Wrote {args.output} and its plot")


if __name__ == "__main__":
    main()
