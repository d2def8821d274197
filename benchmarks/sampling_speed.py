"""Sampling overhead of ConsistencyPipeline against its floor and against diffusers' ConsistencyModelPipeline.

For each UNet (a CIFAR-size UNet2DModel and a small one), batch size and NFE, one run measures, interleaved:
  floor     NFE x UNet forward on the same inputs (the least any sampler can cost),
  ours      ConsistencyPipeline(...)(output_type="pt"),
  diffusers ConsistencyModelPipeline(...)(output_type="pt"),
and reports the median times and the ratios ours/floor, diffusers/floor. Targets: ours <= 1.03 x floor and never
slower than diffusers. Machines are shared and noisy, so read the ratios, not the absolute times. `--unets shipped`
measures the shipped Fashion-MNIST model (1 channel, 28x28), which diffusers' pipeline cannot run (it hard-codes 3
channels): its diffusers columns are null. `--dtype float16` casts the UNet and the noise.

    python benchmarks/sampling_speed.py [--device cuda] [--dtype float16] [--repeats 15] [--quick]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler  # noqa: E402

UNETS = {
    # The architecture of google/ddpm-cifar10-32 (35.7M parameters).
    "cifar32": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # About the size of the shipped Fashion-MNIST models, at 32x32 RGB so that diffusers' pipeline can run it.
    "small32": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}
SHIPPED = "fashion-mnist-cd"  # `--unets shipped`: the UNet of this shipped model
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_unet(name):
    """A UNet of UNETS (seeded random weights) or, for `shipped`, the shipped model's."""
    if name == "shipped":
        return ConsistencyPipeline.from_pretrained(SHIPPED).unet
    torch.manual_seed(0)
    return UNet2DModel(**UNETS[name])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_case(unet, batch_size, nfe, device, repeats):
    ours = ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler())
    # diffusers' pipeline hard-codes 3 channels: a 1-channel UNet runs without it
    theirs = ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler())
    with_diffusers = unet.config.in_channels == 3
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    size = unet.config.sample_size
    latents = torch.randn(batch_size, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
    ours.scheduler.set_timesteps(num_inference_steps=nfe, device=device)
    floor_inputs = [(latents * 0.01, t) for t in ours.scheduler.timesteps]

    def floor():
        for x, t in floor_inputs:
            unet(x, t, return_dict=False)

    def run_ours():
        ours(batch_size=batch_size, latents=latents, num_inference_steps=nfe, output_type="pt")

    def run_theirs():
        theirs(batch_size=batch_size, latents=latents, num_inference_steps=nfe, output_type="pt")

    fns = {"floor": floor, "ours": run_ours}
    if with_diffusers:
        fns["diffusers"] = run_theirs
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved, so drifts of a shared machine hit all three alike
            for name, fn in fns.items():
                times[name].append(measure(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    theirs_s = median.get("diffusers")
    return {
        "batch_size": batch_size, "nfe": nfe,
        "floor_ms": 1e3 * median["floor"], "ours_ms": 1e3 * median["ours"],
        "diffusers_ms": None if theirs_s is None else 1e3 * theirs_s,
        "ours_over_floor": median["ours"] / median["floor"],
        "diffusers_over_floor": None if theirs_s is None else theirs_s / median["floor"],
        "ours_over_diffusers": None if theirs_s is None else median["ours"] / theirs_s,
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['unet']}\nb{r['batch_size']} nfe{r['nfe']}" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 3.5))
    ax.bar([x - 0.2 for x in xs], [r["ours_over_floor"] for r in results], 0.4, label="ConsistencyPipeline (ours)")
    ax.bar([x + 0.2 for x in xs], [r["diffusers_over_floor"] or 0 for r in results], 0.4,
           label="diffusers ConsistencyModelPipeline")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.03, color="g", lw=0.8, ls="--", label="target 1.03 x floor")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("time / floor (NFE x UNet forward)")
    ax.set_ylim(0.9, max(1.3, max(max(r["ours_over_floor"], r["diffusers_over_floor"] or 0) for r in results) + 0.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Dtype of the UNet and noise.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed repeats per case (median reported).")
    parser.add_argument("--unets", default="small32,cifar32",
                        help="Comma-separated UNets from: " + ", ".join([*UNETS, "shipped"]))
    parser.add_argument("--batch_sizes", default="1,16", help="Comma-separated batch sizes.")
    parser.add_argument("--nfes", default="1,2", help="Comma-separated numbers of network evaluations.")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="Where sampling_speed.json and sampling_speed.png are written.")
    parser.add_argument("--quick", action="store_true", help="Few repeats, small UNet only (a smoke run).")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.unets = 3, "small32"
    unknown = set(args.unets.split(",")) - {*UNETS, "shipped"}
    if unknown:
        parser.error(f"Unknown --unets {sorted(unknown)}; choose from {', '.join([*UNETS, 'shipped'])}.")
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    results = []
    for name in args.unets.split(","):
        unet = load_unet(name).to(device).eval()
        if args.dtype != "float32":
            unet = unet.to(DTYPES[args.dtype])
        params = sum(p.numel() for p in unet.parameters())
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            for nfe in [int(n) for n in args.nfes.split(",")]:
                row = {"unet": name, "params_m": params / 1e6, **bench_case(unet, batch_size, nfe, device,
                                                                            args.repeats)}
                results.append(row)
                theirs = "diffusers n/a (1 channel)"
                if row["diffusers_over_floor"] is not None:
                    theirs = (f"diffusers {row['diffusers_over_floor']:.3f}x  "
                              f"ours/diffusers {row['ours_over_diffusers']:.3f}")
                print(f"{name:8s} b={batch_size:<3d} nfe={nfe}  floor {row['floor_ms']:9.2f} ms  "
                      f"ours {row['ours_over_floor']:.3f}x  {theirs}", flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "repeats": args.repeats, "dtype": args.dtype,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with open(os.path.join(args.output_dir, "sampling_speed.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    plot(results, os.path.join(args.output_dir, "sampling_speed.png"))
    print(f"Saved {args.output_dir}/sampling_speed.json and sampling_speed.png")


if __name__ == "__main__":
    main()
