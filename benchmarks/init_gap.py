"""Where consistency distillation starts: the gap between a student initialised from a teacher's weights and the
teacher's denoiser, across sigma, before and after the denoiser warm-up.

For each teacher, the student is the teacher's UNet under the consistency parameterization (what
`training/train_consistency.py` builds when the architectures match), f(x, sigma) = c_skip x + c_out F(c_in x,
250 ln sigma). At each sigma of a Karras grid, on real Fashion-MNIST test images x0 and x = x0 + sigma z:

    gap(sigma) = ||f(x, sigma) - D(x, sigma)|| / ||D(x, sigma)||   (norms over all images and pixels)

then the same after W steps of `DenoiserLoss` regression onto D (`--denoiser_warmup_steps W`, the same loss, lr and
batch as the recipes). Writes JSON (and a PNG with --plot).

    python benchmarks/init_gap.py --teacher edm-consistency-time=runs/fashion-mnist-edm \
        --teacher ddpm=fashion-mnist-ddpm --warmup_steps 0,200 --output benchmarks/results/init_gap.json --plot
"""

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_diffusers.evaluation import read_fashion_mnist  # noqa: E402
from cm_diffusers.losses import DenoiserLoss, teacher_denoised  # noqa: E402
from cm_diffusers.networks import unet_forward  # noqa: E402
from cm_diffusers.parameterization import SIGMA_MAX, SIGMA_MIN, consistency_function, karras_sigmas  # noqa: E402
from cm_diffusers.teacher_sampling import teacher_clips_denoised  # noqa: E402
from cm_diffusers.teachers import load_teacher  # noqa: E402


@torch.no_grad()
def gaps(student, teacher, x0, sigmas, sigma_min, clip_denoised, seed=0):
    """gap(sigma) for each sigma, on the same noise for every model."""
    out = []
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    for sigma in sigmas:
        x = x0 + float(sigma) * noise
        sigma_b = torch.full((x0.shape[0],), float(sigma))
        denoised = teacher_denoised(teacher, x, sigma_b, clip_denoised=clip_denoised)
        f = consistency_function(unet_forward(student), x, sigma_b, sigma_min)
        out.append(((f - denoised).norm() / denoised.norm()).item())
    return out


def time_input(teacher) -> str:
    if teacher.kind != "edm":
        return "DDPM t in [0, 1000)"
    scale = float(teacher.scheduler_config.get("c_noise_scale", 1.0))
    return "250 ln sigma" if scale == 1000 else f"{0.25 * scale:g} ln sigma"


def warm_up(student, teacher, images, steps, batch_size, lr, sigma_min, sigma_max, clip_denoised, seed=0):
    """`steps` of the recipes' denoiser warm-up (AdamW, constant lr after 100 linear warm-up steps, no EMA)."""
    loss_fn = DenoiserLoss(teacher, clip_denoised=clip_denoised, sigma_min=sigma_min, sigma_max=sigma_max)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        batch = images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]
        loss, _ = loss_fn(unet_forward(student), None, batch, None)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
    student.eval()
    return loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="append", default=[], help="label=folder-or-name; repeat.")
    parser.add_argument("--merge", nargs="+", default=None, help="Combine the rows of JSON files of this script.")
    parser.add_argument("--warmup_steps", type=str, default="0,200", help="Comma-separated warm-up lengths.")
    parser.add_argument("--num_images", type=int, default=128, help="Test images the gap is measured on.")
    parser.add_argument("--num_sigmas", type=int, default=12, help="Karras grid points from 0.002 to 80.")
    parser.add_argument("--batch_size", type=int, default=32, help="Warm-up batch (the recipes' CD batch).")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="Warm-up lr (the recipes').")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--output", type=str, default="benchmarks/results/init_gap.json")
    parser.add_argument("--plot", action="store_true", help="Also write the PNG next to the JSON.")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    if args.merge:
        reports = [json.load(open(path)) for path in args.merge]
        report = {"protocol": reports[0]["protocol"], "rows": [row for r in reports for row in r["rows"]]}
        write(report, args.output, args.plot)
        return
    if not args.teacher:
        parser.error("--teacher or --merge is required.")

    test = torch.from_numpy(read_fashion_mnist("test").copy()).float().div(127.5).sub(1).unsqueeze(1)
    train = torch.from_numpy(read_fashion_mnist("train").copy()).float().div(127.5).sub(1).unsqueeze(1)
    x0 = test[: args.num_images]
    warmups = sorted({int(w) for w in args.warmup_steps.split(",")})
    report = {
        "protocol": {
            "gap": "||f(x, sigma) - D(x, sigma)|| / ||D(x, sigma)|| over all images and pixels, x = x0 + sigma z",
            "images": f"the first {args.num_images} Fashion-MNIST test images, one noise draw shared by all rows",
            "warmup": f"DenoiserLoss onto D, batch {args.batch_size}, AdamW lr {args.learning_rate} (100-step ramp)",
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": args.num_threads,
        },
        "rows": [],
    }
    for spec in args.teacher:
        label, _, path = spec.rpartition("=")  # labels may contain "=", folder names rarely do
        teacher = load_teacher(path)
        clip = teacher_clips_denoised(teacher)
        # the student's noise range is the teacher's, within [0.002, 80] (as train_consistency.py sets it)
        sigma_min, sigma_max = max(SIGMA_MIN, teacher.sigma_min), min(SIGMA_MAX, teacher.sigma_max)
        sigmas = np.sort(karras_sigmas(args.num_sigmas, sigma_min, sigma_max))
        student = copy.deepcopy(teacher.unet).float().requires_grad_(True).eval()
        done, start = 0, time.time()
        for steps in warmups:
            loss = warm_up(student, teacher, train, steps - done, args.batch_size, args.learning_rate, sigma_min,
                           sigma_max, clip)  # fmt: skip
            done = steps
            row = {
                "teacher": label,
                "path": path,
                "kind": teacher.kind,
                "time_input": time_input(teacher),
                "warmup_steps": steps,
                "sigmas": [float(s) for s in sigmas],
                "gap": gaps(student, teacher, x0, sigmas, sigma_min, clip),
                "seconds": round(time.time() - start, 1),
            }
            if steps:
                row["last_warmup_loss"] = loss
            with torch.no_grad():
                at_min = torch.full((x0.shape[0],), sigma_min)
                identity = consistency_function(unet_forward(student), x0, at_min, sigma_min)
            row["max_abs_f_minus_x_at_sigma_min"] = (identity - x0).abs().max().item()
            report["rows"].append(row)
            print(label, steps, " ".join(f"{s:.3g}:{g:.3g}" for s, g in zip(sigmas, row["gap"])), flush=True)
    write(report, args.output, args.plot)


def write(report: dict, output: str, plot: bool):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row in report["rows"]:
            ax.plot(row["sigmas"], row["gap"], marker="o", label=f"{row['teacher']}, warm-up {row['warmup_steps']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel("||f - D|| / ||D||")
        ax.set_title("Student at the start of CD vs the teacher's denoiser")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.splitext(output)[0] + ".png", dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
