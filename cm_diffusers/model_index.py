"""What a consistency-model pipeline folder's `model_index.json` says, shared by the pipeline and the Hub tools.

diffusers >= 0.40 refuses third-party class names in model_index.json, so saved folders name diffusers'
config-identical `ConsistencyModelPipeline` and `CMStochasticIterativeScheduler`; loading accepts those and ours.
"""

import json

from .files import write_text_atomic

SCHEDULER_NAMES = {"ConsistencyScheduler", "CMStochasticIterativeScheduler"}
DIFFUSERS_PIPELINE_NAME = "ConsistencyModelPipeline"
DIFFUSERS_SCHEDULER_NAME = "CMStochasticIterativeScheduler"


def rewrite_json(path: str, updates: dict):
    """Updates keys of a JSON config file in place, atomically (a crash leaves the old file or the new one)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(updates)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_is_consistency_model(index: dict, name: str):
    """Refuse pipelines that are not consistency models, saying what they are and what to use instead."""
    scheduler = (index.get("scheduler") or [None, None])[1]
    unet = (index.get("unet") or [None, None])[1]
    if scheduler in SCHEDULER_NAMES and unet is not None:
        return
    kind = index.get("_class_name", "an unknown pipeline")
    if scheduler is not None and unet is not None:
        hint = (
            f"It is a diffusion model ({kind} with {scheduler}): sample it with diffusers.{kind}, or distill it "
            "into a consistency model with `accelerate launch training/train_consistency.py --mode cd "
            f"--teacher_model_name_or_path {name}`."
        )
    else:
        hint = f"It is {kind} with components {sorted(k for k in index if not k.startswith('_'))}."
    raise ValueError(f"{name} is not a consistency-model pipeline (UNet2DModel + ConsistencyScheduler). {hint}")
