"""Evaluation reports: results.json (what `card --eval_results` and `benchmark` read), results.md, and the
FID-vs-NFE and FID-vs-time plots."""

import json
import os
import platform

import torch

from ..files import atomic_output, write_text_atomic


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


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_metadata(settings, extractor, reference) -> dict:
    """The protocol of a run (an `EvalSettings`), the machine, the reference and the feature extractor."""
    return {
        "num_samples": settings.num_samples, "batch_size": settings.batch_size, "seed": settings.seed,
        "device": str(settings.device),
        "device_name": (torch.cuda.get_device_name(settings.device) if str(settings.device).startswith("cuda")
                        else cpu_name()),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "reference": {"source": reference.source, "count": reference.count}, "feature_extractor": extractor.identity,
        "kid_subsets": settings.num_kid_subsets,
        "ms_per_image": "generation only (no feature extraction), batches after the first (warm-up) when several",
    }
