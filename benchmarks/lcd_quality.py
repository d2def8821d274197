#!/usr/bin/env python
"""Quality of latent consistency distillation on Fashion-MNIST: FID (the README's protocol) and prompt adherence of
the text-to-image teacher (guided DDIM) and its LCM-LoRA / LCM students (1, 2, 4 steps), on class-balanced prompts.

Prompt adherence is the accuracy of a small Fashion-MNIST classifier (trained here once, cached next to the FID
statistics, its test accuracy reported) on the generated images against the class their prompt names. Images are
generated at the models' 32x32 and resized to Fashion-MNIST's 28x28 before both measurements.

    python benchmarks/lcd_quality.py --teacher fashion-mnist-ldm --lora fashion-mnist-lcm-lora --teacher_steps 25 \
        --num_samples 2000 --reference fashion-mnist-train --reference_num_samples 10000

Writes benchmarks/results/lcd_quality.json and one sample grid per configuration under benchmarks/results/lcd/.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cm_diffusers.data import FASHION_MNIST_CLASSES, read_fashion_mnist, read_fashion_mnist_labels  # noqa: E402
from cm_diffusers.evaluation import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    InceptionFeatureExtractor,
    extract_features,
    fid_from_features,
    reference_statistics,
)
from cm_diffusers.files import save_image_atomic  # noqa: E402
from cm_diffusers.images import image_grid  # noqa: E402
from cm_diffusers.latent.text_to_image import generate, load_text_to_image  # noqa: E402

PROMPTS = [f"a {name.lower()}" for name in FASHION_MNIST_CLASSES]  # the recipes' --caption_template "a {}"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="The StableDiffusionPipeline folder (the LCD teacher).")
    parser.add_argument("--lora", default=None, help="An LCM-LoRA folder for the teacher.")
    parser.add_argument("--lcm", default=None, help="A LatentConsistencyModelPipeline folder.")
    parser.add_argument("--teacher_steps", type=int, nargs="+", default=[25, 50], help="DDIM steps of the teacher.")
    parser.add_argument("--teacher_guidance_scale", type=float, default=4.0)
    parser.add_argument("--student_steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lora_guidance_scale", type=float, default=1.0)
    parser.add_argument("--lcm_guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_samples", type=int, default=2000, help="Generated images per configuration.")
    parser.add_argument("--reference", default="fashion-mnist-train")
    parser.add_argument("--reference_num_samples", type=int, default=10000)
    parser.add_argument("--skip_fid", action="store_true", help="Prompt adherence only (no Inception features).")
    parser.add_argument("--classifier_epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "lcd_quality.json"))
    return parser.parse_args()


class Classifier(torch.nn.Module):
    """A small CNN for 28x28 Fashion-MNIST (about 90% test accuracy after 2 epochs)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = torch.nn.Linear(64 * 7 * 7, 128), torch.nn.Linear(128, 10)

    def forward(self, x):  # x: float (N, 1, 28, 28) in [0, 1]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def classifier(cache_dir: str, epochs: int, seed: int):
    """The cached classifier and its test accuracy, trained on the 60k training images when not cached."""
    from safetensors.torch import load_file, save_file

    model, path = Classifier(), os.path.join(cache_dir, f"fashion-mnist-classifier-e{epochs}-s{seed}.safetensors")
    test_x = torch.from_numpy(np.array(read_fashion_mnist("t10k"))).float()[:, None] / 255
    test_y = torch.from_numpy(read_fashion_mnist_labels("t10k").astype(np.int64))
    if os.path.isfile(path):
        model.load_state_dict(load_file(path))
    else:
        torch.manual_seed(seed)
        x = torch.from_numpy(np.array(read_fashion_mnist("train"))).float()[:, None] / 255
        y = torch.from_numpy(read_fashion_mnist_labels("train").astype(np.int64))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(128):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        os.makedirs(cache_dir, exist_ok=True)
        save_file(model.state_dict(), path)
    model.eval()
    return model, accuracy(model, test_x, test_y)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(batch).argmax(1) for batch in images.split(500)])
    return float((predictions == labels).float().mean())


def to_fashion_mnist(images: np.ndarray) -> np.ndarray:
    """Generated (N, 32, 32, C) floats in [0, 1] -> (N, 1, 28, 28) uint8 grayscale, as the data's own size."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().mean(1, keepdim=True)
    x = F.interpolate(x, size=28, mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    labels = np.arange(args.num_samples) % len(PROMPTS)  # class-balanced
    prompts = [PROMPTS[label] for label in labels]
    model, test_accuracy = classifier(args.cache_dir, args.classifier_epochs, args.seed)
    extractor = reference = None
    if not args.skip_fid:
        extractor = InceptionFeatureExtractor()
        # at Fashion-MNIST's 28x28, as the generated images are measured (and as `cm-diffusers evaluate` caches it)
        reference = reference_statistics(args.reference, extractor, args.reference_num_samples, resolution=28,
                                         cache_dir=args.cache_dir)  # fmt: skip

    configurations = [("teacher", args.teacher, None, steps, args.teacher_guidance_scale) for steps in
                      args.teacher_steps]  # fmt: skip
    if args.lora:
        configurations += [("lcm-lora", args.teacher, args.lora, steps, args.lora_guidance_scale)
                           for steps in args.student_steps]  # fmt: skip
    if args.lcm:
        configurations += [("lcm", args.lcm, None, s, args.lcm_guidance_scale) for s in args.student_steps]
    rows = []
    for name, model_path, lora, steps, guidance_scale in configurations:
        if name == "teacher":
            from diffusers import DiffusionPipeline

            from cm_diffusers.shipped_models import resolve_pretrained

            pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(model_path))  # a folder or a shipped name
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = load_text_to_image(model_path, lora)
        start = time.perf_counter()
        images = generate(pipe, prompts, steps, guidance_scale, args.seed, args.batch_size)
        seconds = time.perf_counter() - start
        small = to_fashion_mnist(images)
        fid = None if args.skip_fid else fid_from_features(
            extract_features(small, extractor, desc=f"{name} {steps}"), reference.mu, reference.sigma)
        adherence = accuracy(model, torch.from_numpy(small).float() / 255, torch.from_numpy(labels))
        rows.append(dict(model=name, steps=steps, guidance_scale=guidance_scale, fid=fid, prompt_accuracy=adherence,
                         seconds_per_image=seconds / len(prompts)))  # fmt: skip
        print(json.dumps(rows[-1]))
        grid = os.path.join(os.path.dirname(args.output), "lcd", f"{name}-{steps}step.png")
        os.makedirs(os.path.dirname(grid), exist_ok=True)
        save_image_atomic(image_grid(torch.from_numpy(small[:50]), nrow=10), grid)
    result = dict(benchmark="lcd_quality", num_samples=args.num_samples, reference=args.reference,
                  reference_num_samples=args.reference_num_samples, classifier_test_accuracy=test_accuracy,
                  prompts=PROMPTS, load_average=os.getloadavg(), rows=rows)  # fmt: skip
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
