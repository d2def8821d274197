#!/usr/bin/env python
"""One command that proves the GPU path and trains full-quality Fashion-MNIST models when a GPU is at hand.

Parts, in this order, each in its own subprocess(es) with its own time limit, so that a part that fails, hangs or
runs out of time never stops the rest:

  cuda_tests        pytest -m cuda tests/test_cuda.py: pipeline, editing, a training step and a serving call on CUDA,
                    fp16/bf16 sampling against fp32 (max difference), CPU-GPU synchronisations per sampling call
  sampling_speed    benchmarks/sampling_speed.py: the shipped model and the CIFAR-size UNet, batch 1/64/512, fp32/fp16
  train_throughput  benchmarks/train_throughput.py under accelerate launch: images/s and peak memory of CD and ECT
  teacher           training/recipes/gpu-fashion-mnist-edm.sh: an EDM teacher on Fashion-MNIST (bf16)
  cd, ect           training/recipes/gpu-fashion-mnist-{cd,ect}.sh: the students, from that teacher
  fid               cm-diffusers evaluate: FID/KID at 2,000 samples against 10,000 train images (the README's protocol)
  serve             benchmarks/serve_load.py: the API on --device cuda --dtype float16 (throughput ratio, p50/p99)

Each part ends `ok`, `failed` (with the error) or `skipped` (with the reason: no CUDA device, a missing package or
data, a part it needs that failed). Results: DIR/gpu_check.json and DIR/gpu_check.md (rewritten after every part, so
a run cut short keeps what it measured) and every command's log in DIR/logs/. The trained pipelines go to --work_dir
(runs/ by default: the recipes' own output folders), and each into one archive beside its folder, e.g.
runs/gpu-fashion-mnist-cd.tar (weights, configs, card and sample grids; no checkpoints: ~15 MiB).

    python benchmarks/gpu_check.py                  # the full check: about 10 minutes on one H200
    python benchmarks/gpu_check.py --plan           # the time plan and every command of the run; runs nothing
    python benchmarks/gpu_check.py --quick          # tiny sizes on the CPU (CI): the same code paths in 1-2 minutes
    python benchmarks/gpu_check.py --parts teacher,cd,ect,fid --time_limit teacher=300

Sizes of the full run are estimates for an H200 (no GPU has run it yet); each part's budget is its hard time limit.
"""

import argparse
import importlib.util
import json
import os
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_runner import (  # noqa: E402
    INJECTED,
    Command,
    Failed,
    Part,
    Skipped,
    fmt,
    number,
    parse_key_values,
    run_environment,
    run_parts,
    write_reports,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "training", "recipes")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SHIPPED = "fashion-mnist-cd"
MODEL_FOLDERS = {"teacher": "gpu-fashion-mnist-edm", "cd": "gpu-fashion-mnist-cd", "ect": "gpu-fashion-mnist-ect"}

# Modes whose training throughput is measured: a new mode (sCD) is one entry here, once train_throughput.py's MODES
# has it (its flags and its floor).
THROUGHPUT_MODES = ["cd", "ect"]
# The full run's throughput cases, most wanted first: the part runs as many as its budget allows.
THROUGHPUT_RUNS = [(mode, precision, batch) for batch, precision in ((256, "bf16"), (256, "no"), (512, "bf16"),
                                                                    (128, "bf16")) for mode in THROUGHPUT_MODES]
# the tests' tiny UNet, as a --unet_config for the --quick teacher
TINY_UNET = {"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 1, "out_channels": 1,
             "layers_per_block": 1, "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D",
             "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
             "attention_head_dim": 8}  # fmt: skip


@dataclass
class Context:
    quick: bool
    cuda: bool
    output: str
    work: str
    fashion_mnist_dir: str
    reference: str
    python: str = sys.executable
    plan_only: bool = False  # --plan: every command, also those whose inputs a run would create first

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def out(self, *names) -> str:
        return os.path.join(self.output, *names)

    def model(self, name) -> str:
        """The folder of a trained pipeline (`teacher`, `cd`, `ect`: the recipes' own names) or of other work."""
        return os.path.join(self.work, MODEL_FOLDERS.get(name, name))


# ----------------------------------------------------------------------------------------------------------------
# Part 1: the CUDA-marked tests


def cuda_tests_commands(ctx):
    return [Command("pytest", [ctx.python, "-m", "pytest", os.path.join(REPO, "tests", "test_cuda.py"), "-m", "cuda",
                               "-q", "-rs", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                               "--junitxml", ctx.out("cuda_tests.xml")])]


def cuda_tests_summary(ctx):
    """Counts, failures and the numbers the tests record (max fp16/bf16 differences, syncs per call)."""
    root = ElementTree.parse(ctx.out("cuda_tests.xml")).getroot()
    counts, failures, skips, numbers = {"passed": 0, "failed": 0, "skipped": 0}, [], [], {}
    for case in root.iter("testcase"):
        name = case.get("name")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skips.append(outcome.get("message", ""))
        else:
            counts["failed"] += 1
            message = (outcome.get("message") or "").strip()
            failures.append(f"{name}: {message.splitlines()[0][:300] if message else outcome.tag}")
        for prop in case.iter("property"):
            numbers[prop.get("name")] = number(prop.get("value"))
    details = {**counts, "tests": sum(counts.values()), "recorded": numbers, "failures": failures}
    if counts["failed"]:
        raise Failed(f"{counts['failed']} of {details['tests']} CUDA tests failed: " + "; ".join(failures))
    if counts["passed"] == 0:
        raise Skipped(f"all {counts['skipped']} CUDA tests skipped: {skips[0] if skips else 'no reason given'}")
    return details


def cuda_tests_line(details):
    recorded = details["recorded"]
    halves = ", ".join(f"{k.replace('_max_abs_diff', '')} {fmt(v)}" for k, v in recorded.items()
                       if k.endswith("max_abs_diff"))
    return (f"{details['passed']} passed, {details['skipped']} skipped; max |diff|: {halves}; syncs per call "
            f"{fmt(recorded.get('syncs_per_call_1step'))}")


# ----------------------------------------------------------------------------------------------------------------
# Part 2: sampling speed against the floor


def sampling_cases(ctx):
    if ctx.quick:  # the shipped model at batch 1 and 2, float32 only (half-precision convolutions are slow on CPUs)
        return dict(unets="shipped", batch_sizes="1,2", nfes="1", repeats=2, dtypes=["float32"])
    return dict(unets="shipped,cifar32", batch_sizes="1,64,512", nfes="1,2", repeats=8, dtypes=["float32", "float16"])


def sampling_commands(ctx):
    cases = sampling_cases(ctx)
    return [Command(f"sampling-{dtype}", [ctx.python, os.path.join(REPO, "benchmarks", "sampling_speed.py"),
                                          "--device", ctx.device, "--dtype", dtype, "--unets", cases["unets"],
                                          "--batch_sizes", cases["batch_sizes"], "--nfes", cases["nfes"],
                                          "--repeats", str(cases["repeats"]),
                                          "--output_dir", ctx.out("sampling", dtype)])
            for dtype in cases["dtypes"]]


def sampling_summary(ctx):
    rows = []
    for dtype in sampling_cases(ctx)["dtypes"]:
        with open(ctx.out("sampling", dtype, "sampling_speed.json")) as f:
            report = json.load(f)
        rows += [{"dtype": dtype, **{key: row[key] for key in ("unet", "batch_size", "nfe", "floor_ms",
                                                                "ours_over_floor", "diffusers_over_floor")}}
                 for row in report["results"]]
    return {"device": ctx.device, "rows": rows, "worst_ours_over_floor": max(r["ours_over_floor"] for r in rows)}


def sampling_line(details):
    return f"worst ours/floor {details['worst_ours_over_floor']:.3f} over {len(details['rows'])} cases"


# ----------------------------------------------------------------------------------------------------------------
# Part 3: training throughput


def throughput_runs(ctx):
    return [(mode, "no", 8) for mode in THROUGHPUT_MODES] if ctx.quick else THROUGHPUT_RUNS


def throughput_commands(ctx):
    commands = []
    for index, (mode, precision, batch) in enumerate(throughput_runs(ctx)):
        sizes = (["--preset", "tiny", "--warmup_steps", "1", "--steps", "2", "--floor_repeats", "2",
                  "--num_threads", "1"] if ctx.quick else
                 ["--preset", "cifar10", "--warmup_steps", "5", "--steps", "15", "--floor_repeats", "10",
                  "--num_workers", "4"])  # fmt: skip
        commands.append(Command(
            f"throughput-{mode}-{precision}-b{batch}",
            [ctx.python, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--mode", mode, "--launcher",
             "accelerate", "--mixed_precision", precision, "--batch_size", str(batch), *sizes,
             "--output_dir", ctx.out("throughput", f"{mode}-{precision}-b{batch}")],
            min_s=5 if ctx.quick else 25, optional=index >= len(THROUGHPUT_MODES)))  # the first cases must finish
    return commands


def throughput_summary(ctx):
    rows = []
    for mode, precision, batch in throughput_runs(ctx):
        folder = ctx.out("throughput", f"{mode}-{precision}-b{batch}")
        reports = [name for name in os.listdir(folder) if name.endswith(".json")] if os.path.isdir(folder) else []
        if not reports:
            continue  # not run (budget) or failed: the command's record says which
        with open(os.path.join(folder, reports[0])) as f:
            result = json.load(f)
        rows.append({"mode": mode, "mixed_precision": precision, "batch_size": batch,
                     "images_per_second": result["images_per_second"], "step_ms": 1e3 * result["step_seconds"],
                     "floor_ms": 1e3 * result["floor_seconds"], "step_over_floor": result["ratio"],
                     "peak_cuda_memory_mib": result["peak_cuda_memory_mib"], "peak_rss_mib": result["peak_rss_mib"],
                     "unet_parameters": result["unet_parameters"], "device": result["device"]})
    if not rows:
        raise Failed("no throughput case finished")
    return {"rows": rows}


def throughput_line(details):
    return "; ".join(f"{r['mode']} {r['mixed_precision']} b{r['batch_size']}: {r['images_per_second']:.0f} img/s"
                     for r in details["rows"])


# ----------------------------------------------------------------------------------------------------------------
# Parts 4-6: the full-quality run (teacher, then CD and ECT from it), through the recipes


def recipe_env(ctx, name):
    """The recipe's knobs: the full run keeps the recipe's own sizes; --quick shrinks everything."""
    env = {"OUT": ctx.model(name)}
    if name != "teacher":
        env["TEACHER"] = ctx.model("teacher")
    if ctx.quick:
        env.update(DATA=f"--train_data_dir {ctx.model('data')} --resolution 16", BATCH="8", PRECISION="no",
                   WORKERS="0", STEPS={"teacher": "4", "cd": "3", "ect": "3"}[name])
        if name == "teacher":
            env["UNET"] = ctx.model("tiny-unet.json")
    else:
        env["DATA"] = f"--dataset_name fashion_mnist --fashion_mnist_dir {ctx.fashion_mnist_dir} --resolution 28 " \
                      "--random_flip"
    return env


RECIPE_FILES = {"teacher": "gpu-fashion-mnist-edm.sh", "cd": "gpu-fashion-mnist-cd.sh",
                "ect": "gpu-fashion-mnist-ect.sh"}


def training_commands(name):
    def commands(ctx):
        return [Command(name, ["bash", os.path.join(RECIPES, RECIPE_FILES[name])], env=recipe_env(ctx, name))]

    return commands


def write_quick_data(ctx):
    """--quick's training data: 32 grayscale 16x16 PNGs of seeded soft blobs, and the tiny UNet's config."""
    import numpy as np
    from PIL import Image

    folder = ctx.model("data")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(32):
        cy, cx, radius = rng.uniform(4, 12), rng.uniform(4, 12), rng.uniform(2, 5)
        image = 255 * rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, f"{i:02d}.png"))
    with open(ctx.model("tiny-unet.json"), "w") as f:
        json.dump(TINY_UNET, f)


def training_summary(name):
    def summary(ctx):
        folder = ctx.model(name)
        entries = []
        log_path = os.path.join(folder, "logs", "train_log.jsonl")
        if os.path.isfile(log_path):
            with open(log_path) as f:
                entries = [e for e in map(json.loads, f) if "loss" in e and "step_time" in e]
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise Failed(f"no pipeline in {folder} after {len(entries)} logged steps")
        step_times = sorted(e["step_time"] for e in entries[1:]) or [float("nan")]
        last = entries[-10:]
        weights = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(folder, "unet")) for n in names
                   if n.endswith(".safetensors")]
        return {"pipeline": folder, "steps": entries[-1]["step"] if entries else None,
                "final_loss": sum(e["loss"] for e in last) / len(last) if last else None,
                "median_step_ms": 1e3 * step_times[len(step_times) // 2],
                "cuda_max_memory_mib": entries[-1].get("cuda_max_memory_mib") if entries else None,
                "weights_mib": sum(os.path.getsize(w) for w in weights) / 2**20}

    return summary


def training_line(details):
    return (f"{details['steps']} steps, {fmt(details['median_step_ms'])} ms/step, loss {fmt(details['final_loss'])}, "
            f"{details['weights_mib']:.1f} MiB")


def needs_data(ctx):
    if not ctx.quick and not os.path.isfile(os.path.join(ctx.fashion_mnist_dir, "train-images-idx3-ubyte.gz")):
        return (f"Fashion-MNIST not found in {ctx.fashion_mnist_dir} (`make data`, or point --fashion_mnist_dir at "
                "the IDX .gz files)")
    return None


def needs_teacher(ctx):
    if not os.path.isfile(os.path.join(ctx.model("teacher"), "model_index.json")):
        return f"no teacher pipeline in {ctx.model('teacher')} (see the part `teacher`)"
    return needs_data(ctx)


# ----------------------------------------------------------------------------------------------------------------
# Part 7: FID by the README's protocol


def fid_settings(ctx):
    if ctx.quick:
        return ["--num_samples", "8", "--batch_size", "8", "--reference", ctx.model("data"),
                "--reference_num_samples", "16", "--kid_subsets", "2"]
    return ["--num_samples", "2000", "--batch_size", "500", "--reference", ctx.reference,
            "--reference_num_samples", "10000"]


def fid_commands(ctx):
    common = [*fid_settings(ctx), "--seed", "0", "--device", ctx.device, "--cache_dir",
              ctx.model("gpu_check_fid_cache"), "--no_progress"]
    evaluate = [ctx.python, "-m", "cm_diffusers.cli", "evaluate"]
    # CD: 1 step and the cards' 2-step schedule 80, 0.821; ECT: 1 and 2 steps, and 1 step from sigma 40 (best on CPU)
    cd_steps = ["--steps", "1", "--sigmas", "80,0.821"] if not ctx.quick else ["--steps", "1"]
    ect_steps = ["--steps", "1,2", "--sigmas", "40"] if not ctx.quick else ["--steps", "1"]
    teacher = ["--teacher_samplers", "heun", "--teacher_nfe", "3" if ctx.quick else "35"]
    commands = []
    if os.path.isfile(os.path.join(ctx.model("cd"), "model_index.json")) or ctx.plan_only:
        commands.append(Command("fid-cd-and-teacher", [*evaluate, "--model", ctx.model("cd"), "--teacher",
                                                       ctx.model("teacher"), *cd_steps, *teacher, *common,
                                                       "--output_dir", ctx.out("fid", "cd")]))
    else:  # the teacher alone
        commands.append(Command("fid-teacher", [*evaluate, "--model", "none", "--teacher", ctx.model("teacher"),
                                                *teacher, *common, "--output_dir", ctx.out("fid", "teacher")]))
    if os.path.isfile(os.path.join(ctx.model("ect"), "model_index.json")) or ctx.plan_only:
        commands.append(Command("fid-ect", [*evaluate, "--model", ctx.model("ect"), *ect_steps, *common,
                                            "--output_dir", ctx.out("fid", "ect")]))
    return commands


def fid_requires(ctx):
    reason = needs_teacher(ctx)
    if reason:
        return reason
    try:
        from cm_diffusers.evaluation import find_inception_file

        find_inception_file()
    except FileNotFoundError as error:
        return (f"{error} The trained models are in {ctx.work}: measure them later with the commands of "
                "`gpu_check.py --plan --parts fid`.")
    if ctx.reference == "fashion-mnist-train" and not os.path.isdir(FASHION_MNIST_DIR):
        return (f"the reference fashion-mnist-train reads {FASHION_MNIST_DIR}, which is missing: pass --reference "
                "(a folder of the training images or a statistics .npz)")
    return None


FID_KEYS = ("model", "sampler", "steps", "nfe", "sigmas", "fid", "kid", "ms_per_image")


def fid_summary(ctx):
    rows = []
    for name in ("cd", "teacher", "ect"):  # the output folders of fid_commands
        path = ctx.out("fid", name, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                report = json.load(f)
            rows += [{key: row[key] for key in FID_KEYS if key in row} for row in report["results"]]
    if not rows:
        raise Failed("no FID results written")
    return {"num_samples": 8 if ctx.quick else 2000, "rows": rows}


def fid_line(details):
    return "; ".join(f"{r['model']} {r['sampler']} {r['nfe']} NFE" + (f" {r['sigmas']}" if r.get("sigmas") else "")
                     + f": FID {r['fid']:.2f}" for r in details["rows"])


# ----------------------------------------------------------------------------------------------------------------
# Part 8: the API under load


SERVE_LOAD = os.path.join(REPO, "benchmarks", "serve_load.py")


def serve_load_takes_device() -> bool:
    """Whether benchmarks/serve_load.py has --device/--dtype flags (it started its server with --device cpu before)."""
    with open(SERVE_LOAD) as f:
        text = f.read()
    return '"--device"' in text and '"--dtype"' in text


def serve_commands(ctx):
    trained = ctx.plan_only or os.path.isfile(os.path.join(ctx.model("cd"), "model_index.json"))
    model = ctx.model("cd") if trained else SHIPPED  # the trained CD model when there is one
    device = ["--device", "cuda", "--dtype", "float16"] if serve_load_takes_device() else []
    return [Command("serve-load", [ctx.python, SERVE_LOAD, "--model", model, *device, "--max_batch_size", "64",
                                   "--threads", "4", "--phase_s", "4", "--fault_s", "12",
                                   "--output", ctx.out("serve", "serve_load")])]


def serve_requires(ctx):
    if importlib.util.find_spec("ray") is None:
        return "ray[serve] is not installed (pip install -e '.[serve]')"
    if not serve_load_takes_device():
        return ("benchmarks/serve_load.py has no --device/--dtype flags yet (it starts the server with --device cpu), "
                "so it cannot measure the API on cuda")
    return None


def serve_summary(ctx):
    with open(ctx.out("serve", "serve_load.json")) as f:
        result = json.load(f)
    half = next(level for level in result["load_levels"] if level["fraction"] == 0.5)
    return {"throughput_ratio": result["throughput_ratio"],
            "throughput_ratio_8_images": result["saturation_8_images_per_request"]["throughput_ratio"],
            "saturation_images_per_s": result["saturation"]["images_per_s"],
            "unloaded_p50_ms": result["unloaded"]["p50_ms"], "unloaded_p99_ms": result["unloaded"]["p99_ms"],
            "p50_ms_at_50pct": half["p50_ms"], "p99_ms_at_50pct": half["p99_ms"],
            "errors_outside_fault_run": result["errors_outside_fault_run"], "targets": result["targets"]}


def serve_line(details):
    return (f"ratio {details['throughput_ratio']:.2f}, unloaded p50 {details['unloaded_p50_ms']:.1f} ms, p99 at 50% "
            f"{details['p99_ms_at_50pct']:.1f} ms")


# ----------------------------------------------------------------------------------------------------------------
# The parts, in running order (budgets in seconds: full run, --quick)

PARTS = [
    Part("cuda_tests", "pytest -m cuda tests/test_cuda.py", 55, 120, cuda_tests_commands, cuda_tests_summary,
         cuda_tests_line),
    Part("sampling_speed", "sampling_speed.py: shipped + CIFAR-size UNet, batch 1/64/512, fp32/fp16", 40, 120,
         sampling_commands, sampling_summary, sampling_line),
    Part("train_throughput", "train_throughput.py under accelerate: CD/ECT, fp32/bf16, batch 128-512", 75, 180,
         throughput_commands, throughput_summary, throughput_line),
    Part("teacher", "EDM teacher on Fashion-MNIST (recipe gpu-fashion-mnist-edm.sh)", 160, 150,
         training_commands("teacher"), training_summary("teacher"), training_line, requires=needs_data),
    Part("cd", "CD from the teacher (recipe gpu-fashion-mnist-cd.sh)", 65, 120, training_commands("cd"),
         training_summary("cd"), training_line, requires=needs_teacher),
    Part("ect", "ECT from the teacher (recipe gpu-fashion-mnist-ect.sh)", 65, 120, training_commands("ect"),
         training_summary("ect"), training_line, requires=needs_teacher),
    Part("fid", "FID/KID at 2,000 samples: teacher (Heun 35), CD and ECT at 1-2 steps", 55, 180, fid_commands,
         fid_summary, fid_line, requires=fid_requires),
    Part("serve", "serve_load.py: the API on --device cuda --dtype float16", 45, 60, serve_commands, serve_summary,
         serve_line, quick_on_cpu=False, requires=serve_requires),
]
PART_NAMES = [part.name for part in PARTS]


# ----------------------------------------------------------------------------------------------------------------
# Main


def archive_models(ctx) -> list:
    """Each trained pipeline (weights, configs, card, sample grids; no checkpoints or logs) as one tar file beside its
    folder: one file per model to carry off a GPU machine."""
    paths = []
    for name, folder in MODEL_FOLDERS.items():
        source = ctx.model(name)
        if not os.path.isfile(os.path.join(source, "model_index.json")):
            continue
        paths.append(source + ".tar")
        with tarfile.open(paths[-1], "w") as tar:
            for root, dirs, files in os.walk(source):
                dirs[:] = [d for d in dirs if not d.startswith(("checkpoint", "logs"))]
                for file in files:
                    full = os.path.join(root, file)
                    tar.add(full, arcname=os.path.join(folder, os.path.relpath(full, source)))
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (on the CPU without CUDA): a smoke run.")
    parser.add_argument("--plan", action="store_true", help="Print the time plan and the commands; run nothing.")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "gpu"),
                        help="Where gpu_check.json, gpu_check.md and the parts' results go.")
    parser.add_argument("--work_dir", default=None,
                        help="Where the trained pipelines go (default: runs/, where the recipes write them; "
                        "OUTPUT/work with --quick).")
    parser.add_argument("--parts", default=",".join(PART_NAMES), help="Comma-separated parts to run, in order.")
    parser.add_argument("--fashion_mnist_dir", default=FASHION_MNIST_DIR, help="Fashion-MNIST's IDX .gz files.")
    parser.add_argument("--reference", default="fashion-mnist-train",
                        help="FID reference (cm-diffusers evaluate --reference): fashion-mnist-train reads "
                        f"{FASHION_MNIST_DIR}; elsewhere pass a folder of the training images or a statistics .npz.")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="Total time limit (default: the sum of the parts' limits); a part that would end past it "
                        "gets what is left, or is skipped when that is under a third of its limit.")
    parser.add_argument("--time_limit", action="append", default=[], metavar="PART=SECONDS",
                        help="Override a part's time limit (repeatable).")
    parser.add_argument("--inject", action="append", default=[], metavar="PART=error|hang",
                        help="Testing the check itself: make PART fail (error) or hang until its time limit.")
    args = parser.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in args.parts if name not in PART_NAMES]
    if unknown:
        parser.error(f"Unknown --parts {unknown}; choose from {', '.join(PART_NAMES)}.")
    time_limits = parse_key_values(args.time_limit, PART_NAMES, "SECONDS", "--time_limit")
    args.time_limit = {k: float(v) for k, v in time_limits.items()}
    args.inject = parse_key_values(args.inject, PART_NAMES, "error|hang", "--inject")
    if any(kind not in INJECTED for kind in args.inject.values()):
        parser.error("--inject takes PART=error or PART=hang.")
    return args


def make_context(args, cuda: bool) -> Context:
    output = os.path.abspath(args.output)
    default_work = os.path.join(output, "work") if args.quick else os.path.join(REPO, "runs")
    work = os.path.abspath(args.work_dir or default_work)
    return Context(quick=args.quick, cuda=cuda, output=output, work=work,
                   fashion_mnist_dir=os.path.abspath(args.fashion_mnist_dir), reference=args.reference,
                   plan_only=args.plan)


def time_plan(args, ctx):
    limits = []
    for part in PARTS:
        if part.name in args.parts:
            limit = args.time_limit.get(part.name, part.quick_budget_s if ctx.quick else part.budget_s)
            limits.append((part, limit))
    return limits


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        cuda = not args.quick  # the plan of the run on a GPU (or --quick's on the CPU)
    else:
        import torch

        cuda = torch.cuda.is_available()
    ctx = make_context(args, cuda)
    plan = time_plan(args, ctx)
    total = sum(limit for _, limit in plan)
    budget = args.budget_s or total
    print(f"GPU check, {'quick' if ctx.quick else 'full'} run on {ctx.device}: time plan (s), total {total:.0f}, "
          f"budget {budget:.0f}")
    for part, limit in plan:
        print(f"  {part.name:17s} {limit:5.0f}  {part.description}")
    if not cuda and not args.quick:
        print("No CUDA device: the parts that need one will say so and skip (--quick runs tiny sizes on the CPU).")
    if args.plan:
        for part, _ in plan:
            print(f"\n[{part.name}]")
            for command in part.commands(ctx):
                print("  " + command.shell())
        return 0

    os.makedirs(ctx.out("logs"), exist_ok=True)
    os.makedirs(ctx.work, exist_ok=True)
    if ctx.quick:
        write_quick_data(ctx)
    # the recipes' `accelerate` is the one beside this interpreter (a venv's, when `make gpu-check` runs it)
    base_env = {**os.environ, "PATH": os.path.dirname(ctx.python) + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
                "TQDM_MININTERVAL": "10"}
    if ctx.quick and not ctx.cuda:
        base_env.setdefault("OMP_NUM_THREADS", "1")  # tiny models gain nothing from threads on a shared machine
    environment = run_environment(ctx.cuda, quick=ctx.quick, fashion_mnist=os.path.isdir(ctx.fashion_mnist_dir),
                                  work_dir=ctx.work)
    report = {"environment": environment, "plan_s": total, "budget_s": budget, "parts": [], "seconds": 0}
    started = time.perf_counter()
    run_parts(plan, ctx, budget, args.inject, base_env, report)
    try:
        report["model_archives"] = archive_models(ctx)
    except OSError as error:
        report["model_archives_error"] = str(error)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_reports(report, ctx.output)
    counts = {s: sum(r["status"] == s for r in report["parts"]) for s in ("ok", "failed", "skipped")}
    print(f"GPU check done in {report['seconds']:.0f} s: {counts}; {ctx.out('gpu_check.json')}, "
          f"{ctx.out('gpu_check.md')}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
