#!/usr/bin/env python
"""Throughput of one latent-consistency-distillation step (`train_consistency.py --mode lcd`) against its floor.

The step is timed inside the real script (its logged per-step wall time) on a Fashion-MNIST-sized latent teacher
(the architecture of training/recipes/fashion-mnist-ldm.sh, random weights) and captioned 32x32 images. The floor is
the network work an LCD step cannot avoid, measured in the same process on the same shapes and modules: the VAE
encode of the batch, the teacher's guided forward (conditional and unconditional as one batch of 2B), the student's
forward + backward and the target's forward (lcm: a separate target UNet; lora: the student itself, and the teacher
is the same UNet with its adapters off). Prompts are class names, whose embeddings the step caches, so the text
encoder is left out of both sides. Target: step <= 1.15 x floor.

    python benchmarks/train_throughput_lcd.py --student lora      # or --student lcm

Writes benchmarks/results/train_throughput_lcd_<student>_<device>.json with the load average beside the figures;
the floor is measured before and after the run (compare the two medians before trusting a ratio on a shared machine).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cm_diffusers.latent import (  # noqa: E402
    AdaptersDisabled,
    LatentUNet,
    add_lcm_lora,
    build_lcm_student,
    encode_images,
    encode_prompt,
    load_latent_teacher,
    lora_config,
)
from cm_diffusers.latent.tokenizer import build_clip_tokenizer  # noqa: E402
from cm_diffusers.training.latent_diffusion import build_latent_diffusion_model, pipeline_of  # noqa: E402

CLASSES = ["a t-shirt/top", "a trouser", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker",
           "a bag", "a ankle boot"]  # fmt: skip
MODEL = SimpleNamespace(vae_channels="16,32", unet_channels="32,64", latent_channels=4, text_hidden_size=64,
                        text_layers=2, unet_layers_per_block=1)  # the fashion-mnist-ldm.sh recipe's  # fmt: skip


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", choices=["lcm", "lora"], default="lora")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--warmup_steps", type=int, default=3, help="Steps left out of the timing.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps.")
    parser.add_argument("--floor_repeats", type=int, default=10, help="Repetitions of the floor measurement.")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1: steadier when shared).")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmarks", "results"))
    return parser.parse_args()


def make_teacher_and_data(tmp, batch_size):
    """The recipe's teacher architecture (random weights) as a StableDiffusionPipeline folder; captioned images."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(os.path.join(tmp, "tokenizer"), 20)
    model = build_latent_diffusion_model(MODEL, 32, 1, tokenizer)
    teacher_dir, data_dir = os.path.join(tmp, "teacher"), os.path.join(tmp, "data")
    pipeline_of(model.vae, model.unet, model.text_encoder, tokenizer).save_pretrained(teacher_dir)
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    with open(os.path.join(data_dir, "metadata.jsonl"), "w") as f:
        for i in range(max(4 * batch_size, 256)):
            Image.fromarray((rng.uniform(0, 255, (32, 32))).astype(np.uint8)).save(os.path.join(data_dir, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": CLASSES[i % len(CLASSES)]}) + "\n")
    return teacher_dir, data_dir


def measure_floor(teacher, student_unet, lora, pixels, captions, repeats):
    """Seconds of VAE encode + guided teacher forward (2B) + student fwd/bwd + target fwd, `repeats` times."""
    embeds = encode_prompt(teacher.tokenizer, teacher.text_encoder, captions)
    uncond = encode_prompt(teacher.tokenizer, teacher.text_encoder, [""]).expand_as(embeds)
    network = AdaptersDisabled(student_unet) if lora else LatentUNet(teacher.unet)
    student = LatentUNet(student_unet)
    target = student if lora else LatentUNet(build_lcm_student(student_unet).requires_grad_(False))
    guidance = torch.full((len(captions),), 3.0)
    t = torch.full((len(captions),), 499)
    student_unet.train()
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        latents = encode_images(teacher.vae, pixels)
        with torch.no_grad():
            network(torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([embeds, uncond]))
            target(latents, t, embeds, guidance=guidance)
        student(latents, t, embeds, guidance=guidance).square().mean().backward()
        times.append(time.perf_counter() - start)
        student_unet.zero_grad(set_to_none=True)
    return times[2:]


def main():
    args = parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, data_dir = make_teacher_and_data(tmp, args.batch_size)
        teacher = load_latent_teacher(teacher_dir)
        lora = args.student == "lora"
        if lora:
            student_unet = add_lcm_lora(teacher.unet, lora_config(args.lora_rank))
        else:
            student_unet = build_lcm_student(teacher.unet, 64)
        pixels = torch.rand(args.batch_size, 1, 32, 32) * 2 - 1
        captions = [CLASSES[i % len(CLASSES)] for i in range(args.batch_size)]
        floor_before = measure_floor(teacher, student_unet, lora, pixels, captions, args.floor_repeats)

        run_dir = os.path.join(tmp, "run")
        flags = ["--mode", "lcd", "--lcd_student", args.student, "--teacher_model_name_or_path", teacher_dir,
                 "--train_data_dir", data_dir, "--output_dir", run_dir, "--train_batch_size", args.batch_size,
                 "--max_train_steps", args.warmup_steps + args.steps, "--lora_rank", args.lora_rank,
                 "--time_cond_proj_dim", 64, "--num_validation_images", 2, "--ema_decay", 0, "--optimizer", "adamw"]
        script = os.path.join(REPO, "training", "train_consistency.py")
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, script, *map(str, flags)], check=True, env=env)
        with open(os.path.join(run_dir, "logs", "train_log.jsonl")) as f:
            timed = [entry["step_time"] for entry in map(json.loads, f) if "step_time" in entry][args.warmup_steps:]
        floor_after = measure_floor(teacher, student_unet, lora, pixels, captions, args.floor_repeats)

    floors = floor_before + floor_after
    result = {
        "benchmark": "train_throughput_lcd", "student": args.student, "device": platform.processor() or "CPU",
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "resolution": 32,
        "lcd_step_seconds": statistics.median(timed), "floor_seconds": statistics.median(floors),
        "ratio": statistics.median(timed) / statistics.median(floors), "target_ratio": 1.15,
        "floor_seconds_median_before_after": [statistics.median(floor_before), statistics.median(floor_after)],
        "load_average": os.getloadavg(), "step_times": timed, "floor_times": floors,
    }  # fmt: skip
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"train_throughput_lcd_{args.student}_cpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_times", "floor_times")}, indent=2))


if __name__ == "__main__":
    main()
