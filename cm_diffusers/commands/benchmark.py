"""`cm-diffusers benchmark`: measured throughput of a consistency model at 1 and 2 steps against its teacher at the
NFE that reaches the same FID (from an `evaluate` results.json) or at a given NFE, the speedup, and the cost per
million images at a given hourly price of this hardware."""

import json
import os
import time
from typing import Optional

import torch

from ..argtypes import number_list, positive_float, positive_int
from ..evaluation import consistency_generator, load_models, model_label, teacher_generator
from ..files import check_folder_path, write_text_atomic


def register(subparsers):
    parser = subparsers.add_parser(
        "benchmark", help="Images/s, ms/image and cost per million images: consistency model vs its teacher."
    )
    parser.add_argument("--model", default=None,
                        help="Consistency pipeline folder, Hub repo id or shipped name (default: fashion-mnist-cd).")
    parser.add_argument("--teacher", required=True, help="Teacher diffusion model folder (DDPM or EDM).")
    parser.add_argument("--eval_json", default=None,
                        help="results.json of `cm-diffusers evaluate`: the teacher is timed at the cheapest "
                        "sampler/NFE whose FID is at least as good as the consistency model's.")
    parser.add_argument("--teacher_nfe", type=positive_int, default=None,
                        help="Time the teacher at this NFE instead (with --teacher_sampler).")
    parser.add_argument("--teacher_sampler", default="heun", choices=["heun", "euler", "ddim"],
                        help="Sampler used with --teacher_nfe.")
    parser.add_argument("--steps", type=number_list(int, "--steps", low=1), default="1,2",
                        help="Comma-separated consistency step counts to time.")
    parser.add_argument("--price_per_hour", type=positive_float, default=2.5,
                        help="Price of this machine per hour (USD).")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="Images per batch.")
    parser.add_argument("--num_batches", type=positive_int, default=5,
                        help="Timed batches per configuration (after 1 warm-up).")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--output_json", default="benchmark.json", help="Where the JSON report is written.")
    parser.set_defaults(func=run)


def measure_throughput(generate, batch_size: int, num_batches: int, device, seed: int = 0) -> dict:
    """Images per second and ms per image over `num_batches` timed batches after one untimed warm-up batch."""
    generator = torch.Generator("cpu").manual_seed(seed)
    generate(batch_size, generator)  # warm-up: allocator, kernel selection, lazy initialisation
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(num_batches):
        generate(batch_size, generator)
    synchronize()
    seconds = time.perf_counter() - start
    images = batch_size * num_batches
    return {"images_per_second": images / seconds, "ms_per_image": 1000 * seconds / images}


def cost_per_million(images_per_second: float, price_per_hour: float) -> float:
    """Cost of 10^6 images at `price_per_hour` for the whole machine."""
    return price_per_hour * 1e6 / images_per_second / 3600


def matching_teacher(eval_report: dict, steps: int, model: Optional[str] = None) -> dict:
    """The cheapest teacher record (lowest NFE, then time) with FID <= the consistency model's at `steps` steps.

    A report of several consistency models (`benchmarks/quality.py --merge`) is read for the rows of `model` (the
    label `cm-diffusers evaluate` gave it); of several schedules with `steps` steps, the best FID counts. When no
    teacher configuration of the sweep is that good, the teacher's best-FID configuration is returned with
    `matched=False`: the speedup against it is then a lower bound.
    """
    results = eval_report.get("results", [])
    cm = [r for r in results if r["sampler"] == "consistency" and r["steps"] == steps]
    teacher = [r for r in results if r["sampler"] != "consistency"]
    models = sorted({r["model"] for r in cm})
    if len(models) > 1:
        if model not in models:
            raise ValueError(f"The evaluate JSON has {steps}-step results of several models ({', '.join(models)}); "
                             f"the one benchmarked ({model}) is not among them.")
        cm = [r for r in cm if r["model"] == model]
    cm = sorted(cm, key=lambda r: r["fid"])
    if not cm:
        raise ValueError(f"The evaluate JSON has no consistency-model result at {steps} step(s); rerun evaluate with "
                         f"--steps including {steps}.")
    if not teacher:
        raise ValueError("The evaluate JSON has no teacher results; rerun evaluate with --teacher.")
    good = [r for r in teacher if r["fid"] <= cm[0]["fid"]]
    if good:
        best = min(good, key=lambda r: (r["nfe"], r["ms_per_image"]))
        return dict(best, matched=True, cm_fid=cm[0]["fid"])
    return dict(min(teacher, key=lambda r: r["fid"]), matched=False, cm_fid=cm[0]["fid"])


def run(args) -> int:
    if (args.eval_json is None) == (args.teacher_nfe is None):
        raise ValueError("Pass exactly one of --eval_json (match the teacher's FID) and --teacher_nfe (a fixed NFE).")
    steps = args.steps
    check_folder_path(os.path.dirname(os.path.abspath(args.output_json)), "--output_json")
    eval_report = None
    if args.eval_json is not None:
        with open(args.eval_json) as f:
            try:
                eval_report = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"--eval_json {args.eval_json} is not JSON: {error}") from None
        if not isinstance(eval_report, dict) or not isinstance(eval_report.get("results"), list):
            raise ValueError(f"--eval_json {args.eval_json} is not a results.json of `cm-diffusers evaluate`.")

    pipe, teacher = load_models(args.model, args.teacher, args.device)
    from ..shipped_models import DEFAULT_MODEL

    model_name = model_label(args.model or DEFAULT_MODEL, "consistency model")
    teacher_name = f"teacher {model_label(args.teacher, '')}"
    entries, comparisons, timed = [], [], {}

    def time_entry(key, generate, **fields):
        if key not in timed:
            timed[key] = measure_throughput(generate, args.batch_size, args.num_batches, args.device, args.seed)
            speed = timed[key]
            entries.append(dict(fields, **speed,
                                cost_per_million_images=cost_per_million(speed["images_per_second"],
                                                                         args.price_per_hour)))
        return timed[key]

    for k in steps:
        cm_fid = None
        if eval_report is not None:
            target = matching_teacher(eval_report, k, model_name)
            sampler, nfe, matched, cm_fid = target["sampler"], target["nfe"], target["matched"], target["cm_fid"]
            teacher_fid = target["fid"]
        else:
            sampler, nfe, matched, teacher_fid = args.teacher_sampler, args.teacher_nfe, None, None
        cm_speed = time_entry(("cm", k), consistency_generator(pipe, k), model=model_name,
                              sampler="consistency", steps=k, nfe=k, fid=cm_fid)
        teacher_speed = time_entry(("teacher", sampler, nfe), teacher_generator(teacher, sampler, nfe, args.device),
                                   model=teacher_name, sampler=sampler, nfe=nfe, fid=teacher_fid)
        comparisons.append({
            "consistency_steps": k, "teacher_sampler": sampler, "teacher_nfe": nfe, "fid_matched": matched,
            "consistency_fid": cm_fid, "teacher_fid": teacher_fid,
            "speedup": teacher_speed["ms_per_image"] / cm_speed["ms_per_image"],
            "speedup_is_lower_bound": matched is False,
        })

    report = {"model": args.model, "teacher": args.teacher, "price_per_hour": args.price_per_hour,
              "num_batches": args.num_batches, "batch_size": args.batch_size, "device": str(args.device),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "eval_json": args.eval_json, "entries": entries, "comparisons": comparisons}
    write_text_atomic(args.output_json, json.dumps(report, indent=2))

    print(f"{'configuration':<28}{'NFE':>5}{'FID':>9}{'images/s':>11}{'ms/image':>11}{'$/1M images':>13}")
    for e in entries:
        name = f"{e['model']} ({e['sampler']})"
        fid = f"{e['fid']:.2f}" if e["fid"] is not None else "-"
        print(f"{name:<28}{e['nfe']:>5}{fid:>9}{e['images_per_second']:>11.1f}{e['ms_per_image']:>11.2f}"
              f"{e['cost_per_million_images']:>13.2f}")
    for c in comparisons:
        how = {True: "same or better FID", False: "best FID of the sweep (still worse: speedup is a lower bound)",
               None: "fixed NFE"}[c["fid_matched"]]
        print(f"{c['consistency_steps']}-step consistency model vs teacher {c['teacher_sampler']} at NFE "
              f"{c['teacher_nfe']} ({how}): {c['speedup']:.1f}x faster")
    print(f"Price: ${args.price_per_hour}/hour on {args.device}. Wrote {args.output_json}")
    return 0
