"""FID against training step for consistency runs of `training/train_consistency.py`: has a run converged, and what
would more compute buy?

For every `checkpoint-N` of each run, the EMA (evaluation) weights become a ConsistencyPipeline folder
(`<run>/fid_vs_step/step-N`), which `cm-diffusers evaluate` measures at 1 (and optionally 2) steps with a small
sample count (the same seed and reference as the README's table, fewer samples: compare points with each other).
Step 0 is the student as initialised (the teacher's weights). Already measured points are kept, so the script can run
again while a training continues. Writes one JSON and one PNG for all runs.

    python benchmarks/fid_vs_step.py --run cd=runs/fashion-mnist-cd --run ect=runs/fashion-mnist-ct \
        --init_from runs/fashion-mnist-edm --num_samples 500 --output benchmarks/results/quality_fid_vs_step.json

Runs measured by parallel processes each write their own --output (two writers of one file lose points); `--merge`
joins them afterwards:

    python benchmarks/fid_vs_step.py --merge eval/fvs_cd.json eval/fvs_ect.json --output all.json

Modes whose steps cost differently (an sCD step is about two CD steps) compare at equal CPU time: give every run its
step time (`--seconds_per_step LABEL=S`, from benchmarks/train_throughput.py on a quiet machine) and the plot gets a
second panel against CPU minutes; `--only LABEL ...` keeps some runs of the merged files.

A run started from another run's final weights (`--student_model_name_or_path`) is measured like any other (no
--init_from) and joined with `--continues LABEL=PARENT`: its step 0 is the parent's last point, and the plot draws
it on from there.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from diffusers import UNet2DModel  # noqa: E402

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler  # noqa: E402
from cm_diffusers.shipped_models import resolve_pretrained  # noqa: E402
from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler  # noqa: E402


def ema_weights(checkpoint: str):
    """The EMAModel state registered for checkpointing (the custom object holding `shadow_params`)."""
    for path in sorted(glob.glob(os.path.join(checkpoint, "custom_checkpoint_*.pkl"))):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow_params" in state:
            return state["shadow_params"]
    raise FileNotFoundError(f"{checkpoint} has no EMA state (train with --ema_decay > 0).")


def student_config(run_dir: str, init_from):
    """The student's UNet config: that of the run's saved pipeline once it has finished, else of --init_from."""
    if os.path.isfile(os.path.join(run_dir, "unet", "config.json")):
        return dict(UNet2DModel.load_config(os.path.join(run_dir, "unet")))
    if init_from is None:
        raise SystemExit(f"{run_dir} has no saved pipeline yet: pass --init_from (the folder the run started from).")
    return dict(UNet2DModel.load_config(os.path.join(resolve_pretrained(init_from), "unet")))


def run_scheduler_config(run_dir: str) -> dict:
    """The scheduler config of the run's saved pipeline (a TrigFlow one for sCT / sCD runs, which therefore must
    have finished), else the consistency default of the discrete modes."""
    path = os.path.join(run_dir, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    log = os.path.join(run_dir, "logs", "train_log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            if any('"tangent_norm"' in line for line in f):  # only sCT / sCD log their tangent
                raise SystemExit(f"{run_dir} is an sCT/sCD run that has not saved its pipeline yet: its checkpoints "
                                 "need its TrigFlow scheduler; measure it once the training has finished.")
    return dict(ConsistencyScheduler().config, _class_name="ConsistencyScheduler")


def initial_weights(init_from: str, scheduler_config: dict) -> dict:
    """The student's weights at step 0: the teacher's, in TrigFlow form for an sCT / sCD run (F = -F_edm: the
    negated last convolution, as the training starts)."""
    from cm_diffusers.teachers import load_teacher
    from cm_diffusers.training.consistency import trigflow_from_teacher

    unet = UNet2DModel.from_pretrained(resolve_pretrained(init_from), subfolder="unet")
    if scheduler_config.get("_class_name") == TrigFlowSCMScheduler.__name__:
        trigflow_from_teacher(unet, load_teacher(init_from), scheduler_config["time_input"])
    return unet.state_dict()


def export(unet_config: dict, weights, folder: str, scheduler_config: dict):
    """A ConsistencyPipeline folder with `weights` (a list in parameter order, or a state dict)."""
    unet = UNet2DModel.from_config(unet_config)
    if isinstance(weights, dict):
        unet.load_state_dict(weights)
    else:
        params = list(unet.parameters())
        if len(params) != len(weights):
            raise ValueError(f"{len(weights)} EMA tensors for {len(params)} parameters.")
        with torch.no_grad():
            for param, value in zip(params, weights):
                param.copy_(value)
    if scheduler_config.get("_class_name") == TrigFlowSCMScheduler.__name__:
        scheduler = TrigFlowSCMScheduler.from_config(scheduler_config)
    else:
        scheduler = ConsistencyScheduler.from_config(scheduler_config)
    ConsistencyPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(folder)


def evaluate(folder: str, args, extra_sigmas: str) -> list:
    out = os.path.join(folder, "eval")
    if not os.path.isfile(os.path.join(out, "results.json")):
        command = [
            sys.executable, "-m", "cm_diffusers.cli", "evaluate", "--model", os.path.abspath(folder),
            "--steps", "1", "--num_samples", str(args.num_samples), "--seed", "0",
            "--reference", "fashion-mnist-train", "--reference_num_samples", "10000",
            "--output_dir", os.path.abspath(out), "--no_progress", "--batch_size", "100",
            "--cache_dir", os.path.abspath(args.cache_dir),
        ]  # fmt: skip
        if extra_sigmas:
            command += ["--sigmas", extra_sigmas]
        subprocess.run(command, check=True, cwd=REPO)  # this checkout's cm_diffusers, not another installed one
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["results"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="label=output_dir of a training run; repeat.")
    parser.add_argument("--init_from", type=str, default=None, help="Teacher folder: its weights are step 0.")
    parser.add_argument("--two_step_sigmas", type=str, default="80,0.821", help="2-step schedule ('' to skip).")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--cache_dir", type=str, default=".fid_cache", help="Cached reference statistics.")
    parser.add_argument("--steps", type=str, default=None, help="Only these checkpoint steps (comma-separated).")
    parser.add_argument("--output", type=str, default="benchmarks/results/quality_fid_vs_step.json")
    parser.add_argument(
        "--images_per_step",
        action="append",
        default=[],
        metavar="LABEL=N",
        help="Images per optimizer step of a run (batch x processes x accumulation); when every run "
        "has one, the plot's x-axis is images seen, which compares runs of different batches.",
    )
    parser.add_argument(
        "--seconds_per_step",
        action="append",
        default=[],
        metavar="LABEL=S",
        help="CPU seconds of one optimizer step of a run (benchmarks/train_throughput.py on a quiet machine); "
        "the runs that have one are also drawn against CPU time, which compares modes of different step costs.",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="With --merge: keep only these runs (and the runs they continue).",
    )
    parser.add_argument(
        "--continues",
        action="append",
        default=[],
        metavar="LABEL=PARENT",
        help="With --merge: run LABEL was started from the final weights of run PARENT (train_consistency.py "
        "--student_model_name_or_path); its step 0 is PARENT's last point and the plot draws it from there on.",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Instead of measuring: join the runs of these outputs (of runs measured in parallel, "
        "each to its own --output) into --output and plot them together.",
    )
    args = parser.parse_args(argv)
    images_per_step = {label: int(n) for label, _, n in (s.partition("=") for s in args.images_per_step)}
    seconds_per_step = {label: float(n) for label, _, n in (s.partition("=") for s in args.seconds_per_step)}
    continues = dict(spec.partition("=")[::2] for spec in args.continues)
    if args.merge:
        return merge(args.merge, args.output, images_per_step, continues, seconds_per_step, args.only)
    if not args.run:
        parser.error("give at least one --run (or --merge).")
    wanted = None if args.steps is None else {int(s) for s in args.steps.split(",")}

    report = {"protocol": {}, "runs": {}}
    if os.path.isfile(args.output):
        with open(args.output) as f:
            report = json.load(f)
    report["protocol"] = {
        "metric": f"cm-diffusers evaluate, {args.num_samples} samples, seed 0, vs 10,000 Fashion-MNIST train images",
        "weights": "the EMA (evaluation) weights of each checkpoint; step 0 = the teacher's weights (in TrigFlow "
        "form for sCT / sCD runs)",
        "two_step_sigmas": args.two_step_sigmas,
    }
    for spec in args.run:
        label, _, run_dir = spec.partition("=")
        run = report["runs"].setdefault(label, {"output_dir": run_dir, "points": {}})
        scheduler_config = run_scheduler_config(run_dir)
        # the network's view of time: the same teacher weights are another step 0 under another time input
        run["time_input"] = scheduler_config.get("time_input")
        if label in images_per_step:
            run["images_per_step"] = images_per_step[label]
        if label in seconds_per_step:
            run["seconds_per_step"] = seconds_per_step[label]
        checkpoints = {int(m.group(1)): path for path in glob.glob(os.path.join(run_dir, "checkpoint-*"))
                       if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path)))}  # fmt: skip
        if args.init_from:
            checkpoints[0] = None
        for step in sorted(checkpoints):
            if str(step) in run["points"] or (wanted is not None and step not in wanted):
                continue
            shared = [r["points"]["0"] for r in report["runs"].values()
                      if "0" in r["points"] and r.get("time_input") == run["time_input"]]  # fmt: skip
            if step == 0 and shared:  # every run starts from the same teacher weights: measured once
                run["points"]["0"] = shared[0]
                continue
            folder = os.path.join(run_dir, "fid_vs_step", f"step-{step}")
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                config = student_config(run_dir, args.init_from)
                if step == 0:
                    weights = initial_weights(args.init_from, scheduler_config)
                else:
                    weights = ema_weights(checkpoints[step])
                export(config, weights, folder, scheduler_config)
            rows = evaluate(folder, args, args.two_step_sigmas)
            run["points"][str(step)] = {f"{row['steps']}step": row["fid"] for row in rows}
            print(label, step, run["points"][str(step)], flush=True)
            with open(args.output, "w") as f:
                json.dump(report, f, indent=2)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.splitext(args.output)[0] + ".png")


def merge(paths: list, output: str, images_per_step: dict, continues: dict = None, seconds_per_step: dict = None,
          only: list = None):  # fmt: skip
    """One report from several: the runs of all (or those `only` names), under the protocol of the first (they must
    share it); a run that `continues` another starts at that one's last point."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    merged = {"protocol": reports[0]["protocol"], "runs": {}}
    for path, report in zip(paths, reports):
        if report["protocol"]["metric"] != merged["protocol"]["metric"]:
            raise SystemExit(f"{path} was measured differently ({report['protocol']['metric']}); not merged.")
        for label, run in report["runs"].items():
            if label in merged["runs"]:
                raise SystemExit(f"Run {label!r} appears in more than one of {paths}; label the runs uniquely.")
            merged["runs"][label] = run
            if label in images_per_step:
                run["images_per_step"] = images_per_step[label]
            if label in (seconds_per_step or {}):
                run["seconds_per_step"] = seconds_per_step[label]
    if only is not None:
        missing = sorted(set(only) - set(merged["runs"]))
        if missing:
            raise SystemExit(f"--only {missing}: no such run among {sorted(merged['runs'])}.")
        for label, parent in (continues or {}).items():
            if label in merged["runs"]:
                merged["runs"][label]["continues"] = parent
        keep = set()
        for label in only:  # a run and every run it continues, back to the first
            while label is not None and label not in keep:
                keep.add(label)
                label = merged["runs"].get(label, {}).get("continues")
        merged["runs"] = {label: run for label, run in merged["runs"].items() if label in keep}
    for label, parent in (continues or {}).items():
        if label not in merged["runs"] or parent not in merged["runs"]:
            raise SystemExit(f"--continues {label}={parent}: both runs must be among the merged ones.")
        parent_points = merged["runs"][parent]["points"]
        merged["runs"][label]["continues"] = parent
        merged["runs"][label]["points"].setdefault("0", parent_points[max(parent_points, key=int)])
    with open(output, "w") as f:
        json.dump(merged, f, indent=2)
    plot(merged, os.path.splitext(output)[0] + ".png")
    print(f"Wrote {output} and its plot ({', '.join(merged['runs'])})")


def chain(run: dict, runs: dict) -> list:
    """The run and the runs it continues, oldest last."""
    parent = runs.get(run.get("continues"))
    return [run] + (chain(parent, runs) if parent else [])


def plot(report: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_images = all("images_per_step" in run for run in report["runs"].values())

    def scale(run):
        return run["images_per_step"] / 1000 if by_images else 1

    def start(run):  # a continued run is drawn from where its parent ended
        parent = report["runs"].get(run.get("continues"))
        return start(parent) + max(int(s) for s in parent["points"]) * scale(parent) if parent else 0

    def minutes(run):  # one step's CPU time, in minutes
        return run["seconds_per_step"] / 60

    def cpu_start(run):
        parent = report["runs"].get(run.get("continues"))
        return cpu_start(parent) + max(int(s) for s in parent["points"]) * minutes(parent) if parent else 0

    timed = {label: run for label, run in report["runs"].items()
             if all("seconds_per_step" in r for r in chain(run, report["runs"]))}  # fmt: skip
    panels = [("images" if by_images else "steps", report["runs"], start, scale)]
    if timed:
        panels.append(("cpu", timed, cpu_start, minutes))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    for ax, (axis, runs, origin, unit) in zip(axes[0], panels):
        for label, run in runs.items():
            steps = sorted(run["points"], key=int)
            for key, style in (("1step", "-o"), ("2step", "--s")):
                xs = [int(s) for s in steps if key in run["points"][s]]
                if xs:
                    name = f"{label} (batch {run['images_per_step']})" if "images_per_step" in run else label
                    ax.plot(
                        [origin(run) + x * unit(run) for x in xs],
                        [run["points"][str(s)][key] for s in xs],
                        style,
                        label=f"{name}, {key[0]} step(s)",
                    )
        ax.set_xlabel({"images": "training images seen (thousands)", "steps": "training step",
                       "cpu": "CPU time (minutes of one core, from the measured step time)"}[axis])  # fmt: skip
        ax.set_ylabel("FID (" + report["protocol"]["metric"].split(",")[1].strip() + ")")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("FID against " + {"images": "images seen", "steps": "training step", "cpu": "CPU time"}[axis])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
