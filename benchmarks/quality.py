"""Sample quality of consistency models against their teacher: the table and plots the README shows.

Runs `cm-diffusers evaluate`'s measurements for several consistency models (shipped short names or folders) and one
teacher sweep, all against the same cached reference statistics and the same seed, and writes results.json,
results.md (the table), fid_vs_nfe.png, fid_vs_time.png and sample grids into --output_dir.

    python benchmarks/quality.py --models fashion-mnist-cd,fashion-mnist-ct --teacher fashion-mnist-ddpm \
        --num_samples 1000 [--device cuda] [--output_dir benchmarks/results/quality]

Runs measured separately (say the teacher sweep in one process and the students in another, on different cores)
combine into one table, plot and target summary, after checking that they share the protocol:

    python benchmarks/quality.py --merge teacher/results.json students/results.json --output_dir OUT

The summary names the teacher's best sampler at each NFE ("teacher best" = its lowest FID overall) and the ratios
the shipped-model targets are stated in (consistency model FID / teacher best).

FID at a few hundred or thousand samples is biased upwards (the real test split against the train split scores
~16 at 1,000 samples): compare rows of one table, not numbers from papers computed with 50,000 samples.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cm_diffusers.evaluation import (  # noqa: E402
    DEFAULT_STEPS,
    DEFAULT_TEACHER_NFE,
    DEFAULT_TEACHER_SAMPLERS,
    EvalSettings,
    evaluate_consistency_model,
    evaluate_teacher,
    print_table,
    run_metadata,
    setup_reference,
    write_report,
)
from cm_diffusers.shipped_models import resolve_pretrained  # noqa: E402
from cm_diffusers.validation import parse_list  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="fashion-mnist-cd,fashion-mnist-ct",
                        help="Comma-separated consistency models: shipped short names or pipeline folders.")
    parser.add_argument("--teacher", default="fashion-mnist-ddpm",
                        help="The teacher folder or shipped short name; `none` skips the teacher sweep.")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="Comma-separated consistency step counts.")
    parser.add_argument("--teacher_samplers", default=DEFAULT_TEACHER_SAMPLERS, help="heun, euler and/or ddim.")
    parser.add_argument("--teacher_nfe", default=DEFAULT_TEACHER_NFE, help="Comma-separated teacher NFE budgets.")
    parser.add_argument("--teacher_clip_denoised", default="auto", choices=["auto", "yes", "no"],
                        help="Clamp the teacher's x0 predictions to [-1, 1] (auto: as its scheduler config says).")
    parser.add_argument("--num_samples", type=int, default=1000, help="Generated images per configuration.")
    parser.add_argument("--batch_size", type=int, default=100, help="Images per generation batch.")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed, the same for every configuration.")
    parser.add_argument("--reference", default="fashion-mnist-train", help="Reference images (see evaluate).")
    parser.add_argument("--reference_num_samples", type=int, default=10000, help="Reference images used.")
    parser.add_argument("--resolution", type=int, default=None, help="Reference resolution (default: the model's).")
    parser.add_argument("--kid_subsets", type=int, default=None, help="KID subsets (default 100 on GPU, 10 on CPU).")
    parser.add_argument("--cache_dir", default=None, help="Reference statistics cache (default .fid_cache).")
    parser.add_argument("--inception_path", default=None, help="The TorchScript Inception file.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--output_dir", default="benchmarks/results/quality", help="Where the results go.")
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="Combine the results.json files of earlier runs instead of measuring.")
    return parser.parse_args(argv)


# what must agree for rows of different runs to share a table
PROTOCOL_KEYS = ("num_samples", "seed", "reference", "feature_extractor")


def merge_reports(paths: list) -> dict:
    """One report from several results.json files of the same protocol; rows are labelled by their model."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    first = reports[0]
    for path, report in zip(paths[1:], reports[1:]):
        differing = [key for key in PROTOCOL_KEYS if report.get(key) != first.get(key)]
        if differing:
            raise SystemExit(f"{path} differs from {paths[0]} in {differing}: FIDs of different protocols do not "
                             "share a table; rerun with the same --num_samples, --seed and reference.")
    results = []
    for report in reports:
        for record in report["results"]:
            record = dict(record)
            if record["model"] == "consistency model" and report.get("model"):  # `cm-diffusers evaluate` labels
                record["model"] = report["model"]
            elif record["model"] == "teacher" and report.get("teacher"):
                record["model"] = f"teacher {report['teacher']}"
            results.append(record)
    merged = {key: value for key, value in first.items() if key not in ("results", "model", "models")}
    merged.update(models=sorted({r["model"] for r in results if r["sampler"] == "consistency"}), merged_from=paths,
                  results=results)
    merged["summary"] = target_summary(results)
    return merged


def target_summary(results: list) -> dict:
    """Teacher best per NFE and overall, and each consistency model's FID as a multiple of the teacher's best."""
    teacher = [r for r in results if r["sampler"] != "consistency"]
    students = [r for r in results if r["sampler"] == "consistency"]
    if not teacher:
        return {}
    best_per_nfe = {}
    for record in teacher:
        if record["nfe"] not in best_per_nfe or record["fid"] < best_per_nfe[record["nfe"]]["fid"]:
            best_per_nfe[record["nfe"]] = record
    best = min(teacher, key=lambda r: r["fid"])
    ratios = {}
    for r in students:  # an explicit schedule is named by its levels
        schedule = f" (sigmas {', '.join(f'{s:g}' for s in r['sigmas'])})" if r.get("sigmas") else ""
        ratios[f"{r['model']} {r['steps']}-step{schedule}"] = round(r["fid"] / best["fid"], 3)
    return {
        "teacher_best": {key: best[key] for key in ("sampler", "nfe", "fid")},
        "teacher_best_per_nfe": {str(nfe): {"sampler": r["sampler"], "fid": r["fid"]}
                                 for nfe, r in sorted(best_per_nfe.items())},
        "fid_over_teacher_best": ratios,
    }


def summary_markdown(summary: dict) -> str:
    if not summary:
        return ""
    best = summary["teacher_best"]
    lines = ["", f"Teacher best: {best['sampler']} at NFE {best['nfe']}, FID {best['fid']:.2f}.", "",
             "| consistency model | FID / teacher best |", "|---|---:|"]
    lines += [f"| {name} | {ratio:.2f} |" for name, ratio in summary["fid_over_teacher_best"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from cm_diffusers import ConsistencyPipeline
    from cm_diffusers.teacher_sampling import TEACHER_SAMPLERS
    from cm_diffusers.teachers import load_teacher

    args = parse_args(argv)
    if args.merge:
        os.makedirs(args.output_dir, exist_ok=True)
        report = merge_reports(args.merge)
        title = f"{report['num_samples']} samples vs {report['reference']['count']} reference images"
        paths = write_report(report, args.output_dir, title)
        with open(paths[1], "a") as f:  # results.md: the table, then the targets' ratios
            f.write(summary_markdown(report["summary"]))
        print_table(report["results"])
        print(summary_markdown(report["summary"]))
        print(f"Wrote {', '.join(os.path.relpath(p) for p in paths)}")
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    steps = parse_list(args.steps, int, "--steps", low=1)
    nfes = parse_list(args.teacher_nfe, int, "--teacher_nfe", low=1)
    samplers = [s.strip() for s in args.teacher_samplers.split(",") if s.strip()]
    if set(samplers) - set(TEACHER_SAMPLERS):
        raise SystemExit(f"--teacher_samplers: choose from {TEACHER_SAMPLERS}, got {samplers}.")
    os.makedirs(args.output_dir, exist_ok=True)

    pipes = {name: ConsistencyPipeline.from_pretrained(name).to(args.device) for name in models}
    sizes = {pipe.unet.config.sample_size for pipe in pipes.values()}
    if len(sizes) != 1:
        raise SystemExit(f"The models have different sample sizes {sizes}; evaluate them in separate runs.")
    size = sizes.pop()
    extractor, reference = setup_reference(
        args.reference, resolution=args.resolution or (size if isinstance(size, int) else None),
        num_samples=args.reference_num_samples, cache_dir=args.cache_dir, inception_path=args.inception_path,
        device=args.device, progress=not args.no_progress)
    settings = EvalSettings(num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                            device=args.device, progress=not args.no_progress, kid_subsets=args.kid_subsets,
                            output_dir=args.output_dir)

    results = []
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        results += evaluate_consistency_model(pipe, steps, reference, extractor, settings, name=name)
    if args.teacher.lower() != "none":
        teacher = load_teacher(resolve_pretrained(args.teacher)).to(args.device)
        results += evaluate_teacher(teacher, samplers, nfes, reference, extractor, settings,
                                    name=f"teacher {args.teacher}", clip_denoised=args.teacher_clip_denoised)

    report = {"models": models, "teacher": args.teacher, **run_metadata(settings, extractor, reference),
              "results": results}
    title = f"{args.num_samples} samples vs {reference.count} reference images ({args.device})"
    paths = write_report(report, args.output_dir, title)
    print_table(results)
    print(f"Wrote {', '.join(os.path.relpath(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
