#!/usr/bin/env python
"""Throughput of one consistency-distillation (or ECT) step of training/train_consistency.py against its floor.

The step is timed inside the real script (its per-step wall time, logged after the loss is synchronised), on a run
of `--mode cd` with a Heun teacher, target network, evaluation EMA, RAdam, gradient clipping and the data loader.
The floor is measured in the same process on the same batch shape and models: one student forward + backward, one
target forward and two teacher forwards (Heun), i.e. the network work a CD step cannot avoid. Also reports peak
memory (CUDA max_memory_allocated on GPU, peak RSS on CPU). Target: step <= 1.10 x floor. `--mode ect` times an ECT
step instead (its floor: one student forward + backward and one target forward; no teacher); a new mode is one entry
of MODES. `--launcher accelerate` runs the script under `accelerate launch` (with --mixed_precision), as users do.

    python benchmarks/train_throughput.py                      # CPU: the 1.1M-parameter 28x28 model, batch 64
    python benchmarks/train_throughput.py --preset cifar10     # GPU: the 35.7M-parameter ddpm-cifar10 UNet, batch 128
    python benchmarks/train_throughput.py --preset cifar10 --mode ect --mixed_precision bf16 --launcher accelerate

Writes benchmarks/results/train_throughput_<device>_<preset>.json and a PNG bar plot next to it. Both sides are
medians over repeats; the floor is measured before and after the run (both medians are recorded), because on a
shared machine other jobs can slow either side several-fold: compare the two floor medians before trusting a ratio.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cm_diffusers.parameterization import sigma_to_t  # noqa: E402
from cm_diffusers.teachers import load_teacher  # noqa: E402

PRESETS = {
    # DESIGN.md's CPU model: Fashion-MNIST size, blocks (32, 64, 64), one attention level
    "fmnist": dict(resolution=28, channels=1, batch_size=64, unet=dict(
        layers_per_block=1, block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D",
        "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))),
    # google/ddpm-cifar10-32's architecture
    "cifar10": dict(resolution=32, channels=3, batch_size=128, unet=dict(
        layers_per_block=2, block_out_channels=(128, 256, 256, 256), down_block_types=("DownBlock2D",
        "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D",
        "UpBlock2D"))),
    # the tests' tiny UNet (16x16, blocks (16, 32)): a smoke run of the benchmark itself, e.g. in CI
    "tiny": dict(resolution=16, channels=1, batch_size=8, unet=dict(
        layers_per_block=1, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)),
}  # fmt: skip

# Per mode: the run's own flags, and the teacher forwards of its floor (besides one student forward + backward and one
# target forward, which every mode has)
MODES = {
    "cd": dict(teacher_forwards=2, flags=["--target_ema_decay", 0.95, "--ode_solver", "heun"]),
    "ect": dict(teacher_forwards=0, flags=["--dropout", 0]),  # no dropout: the floor's student has none
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="fmnist (CPU), cifar10 (GPU) or tiny (a smoke run).")
    parser.add_argument("--mode", choices=sorted(MODES), default="cd", help="The train_consistency.py mode timed.")
    parser.add_argument("--launcher", choices=["python", "accelerate"], default="python",
                        help="Run the script directly or under `accelerate launch`.")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: the preset's.")
    parser.add_argument("--warmup_steps", type=int, default=5, help="Steps left out of the timing.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--floor_repeats", type=int, default=20, help="Repetitions of the floor measurement.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--num_workers", type=int, default=None, help="Data loader workers (default 2 on GPU).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1: steadier when shared).")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmarks", "results"))
    return parser.parse_args(argv)


def make_data(folder, count, resolution, channels, seed=0):
    """`count` smooth random images: the data loader does the same work as on real images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    for i in range(count):
        fx, fy, phase = rng.uniform(1, 4, size=3)
        base = 127 + 120 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        image = np.stack([base * rng.uniform(0.5, 1)] * channels, -1) if channels == 3 else base
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_floor(teacher, student, batch, repeats, device, autocast_dtype, teacher_forwards=2):
    """Seconds of 1 student fwd+bwd, 1 target fwd and `teacher_forwards` teacher fwds (CD's Heun: 2) on `batch`,
    `repeats` times."""
    sigma = torch.full((batch.shape[0],), 1.0, device=device)
    t = sigma_to_t(sigma)
    student.train()
    times = []
    for _ in range(repeats + 3):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            with torch.no_grad():
                for _ in range(teacher_forwards):
                    teacher(batch, sigma)
                student(batch, t, return_dict=False)[0]  # the target: same architecture, no gradient
            output = student(batch, t, return_dict=False)[0]
        output.float().square().mean().backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
        student.zero_grad(set_to_none=True)
    return times[3:]


def main():
    args = parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("cifar10" if device.type == "cuda" else "fmnist")
    preset = PRESETS[preset_name]
    batch_size = args.batch_size or preset["batch_size"]
    num_workers = args.num_workers if args.num_workers is not None else (2 if device.type == "cuda" else 0)
    resolution, channels = preset["resolution"], preset["channels"]
    mode = MODES[args.mode]

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, teacher_dir, run_dir = (os.path.join(tmp, name) for name in ("data", "teacher", "run"))
        os.makedirs(data_dir)
        make_data(data_dir, max(4 * batch_size, 256), resolution, channels)
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, **preset["unet"])
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(teacher_dir)
        num_params = sum(p.numel() for p in unet.parameters())

        # 1. The floor, same process, same shapes and precision; measured before and after the run, so that a
        # change of machine load during the run biases neither side
        autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
        teacher = load_teacher(teacher_dir, torch_dtype=autocast_dtype or torch.float32, device=device)
        student = UNet2DModel.from_pretrained(os.path.join(teacher_dir, "unet")).to(device)
        batch = torch.randn(batch_size, channels, resolution, resolution, device=device)
        floor_before = measure_floor(teacher, student, batch, args.floor_repeats, device, autocast_dtype,
                                     mode["teacher_forwards"])

        # 2. The real script: cd (Heun teacher, target EMA 0.95) or ect, evaluation EMA, RAdam, clipping
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        flags = ["--mode", args.mode, "--teacher_model_name_or_path", teacher_dir, "--train_data_dir", data_dir,
                 "--output_dir", run_dir, "--max_train_steps", args.warmup_steps + args.steps,
                 "--train_batch_size", batch_size, "--ema_decay", 0.9999,
                 "--mixed_precision", args.mixed_precision, "--dataloader_num_workers", num_workers,
                 "--num_validation_images", 4, *mode["flags"]]  # fmt: skip
        # the script itself, as a user runs it (benchmarks import no script), on the same number of threads
        script = os.path.join(REPO, "training", "train_consistency.py")
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
        launcher = [sys.executable]
        if args.launcher == "accelerate":
            launcher += ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                         "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
        subprocess.run([*launcher, script, *map(str, flags)], check=True, env=env)
        with open(os.path.join(run_dir, "logs", "train_log.jsonl")) as f:
            log = [entry for entry in map(json.loads, f) if "step_time" in entry]
        step_times, data_times = [entry["step_time"] for entry in log], [entry["data_time"] for entry in log]
        timed = step_times[args.warmup_steps :]
        peak_train = log[-1].get("cuda_max_memory_mib") if device.type == "cuda" else None  # the script's own

        floor_after = measure_floor(teacher, student, batch, args.floor_repeats, device, autocast_dtype,
                                    mode["teacher_forwards"])
        floors = floor_before + floor_after

    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the training process; Linux: KiB
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    result = {
        "benchmark": "train_throughput",
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "preset": preset_name,
        "mode": args.mode,
        "launcher": args.launcher,
        "unet_parameters": num_params,
        "batch_size": batch_size,
        "resolution": resolution,
        "channels": channels,
        "mixed_precision": args.mixed_precision,
        "dataloader_num_workers": num_workers,
        "timed_steps": len(timed),
        f"{args.mode}_step_seconds": statistics.median(timed),
        "step_seconds": statistics.median(timed),
        "floor_seconds": statistics.median(floors),
        "ratio": statistics.median(timed) / statistics.median(floors),
        "floor_seconds_median_before_after": [statistics.median(floor_before), statistics.median(floor_after)],
        "target_ratio": 1.10,
        "data_loading_seconds": statistics.median(data_times[args.warmup_steps :]),
        "images_per_second": batch_size / statistics.median(timed),
        "peak_cuda_memory_mib": peak_train,
        "peak_rss_mib": peak_rss_mib,
        "step_times": step_times,
        "floor_times": floors,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    suffix = "" if args.mode == "cd" else f"_{args.mode}"
    stem = os.path.join(args.output_dir, f"train_throughput_{device.type}_{preset_name}{suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, stem + ".png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_times", "floor_times")}, indent=2))
    print(f"{args.mode.upper()} step {result['step_seconds'] * 1e3:.1f} ms vs floor "
          f"{result['floor_seconds'] * 1e3:.1f} ms (medians): ratio {result['ratio']:.3f} (target <= 1.10)")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = ["floor\n(networks only)", f"{result['mode'].upper()} step\n(train_consistency.py)"]
    medians = [result["floor_seconds"] * 1e3, result["step_seconds"] * 1e3]
    ax.bar(labels, medians, color=["#999999", "#3b75af"])
    ax.axhline(medians[0] * result["target_ratio"], color="#c44e52", linestyle="--", label="1.10 x floor")
    ax.set_ylabel("ms per step")
    ax.set_title(f"{result['preset']}, batch {result['batch_size']}, {result['device']}: ratio {result['ratio']:.2f} "
                 "(medians)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
