"""What a consistency-model pipeline folder's `model_index.json` says, shared by the pipeline and the Hub tools.

diffusers >= 0.40 refuses third-party class names in model_index.json, so saved folders name diffusers'
config-identical `ConsistencyModelPipeline` and `CMStochasticIterativeScheduler`; loading accepts those and ours.
"""

import json

from .files import write_text_atomic

SCHEDULER_NAMES = {"ConsistencyScheduler", "CMStochasticIterativeScheduler"}
DIFFUSERS_PIPELINE_NAME = "ConsistencyModelPipeline"
DIFFUSERS_SCHEDULER_NAME = "CMStochasticIterativeScheduler"
# Continuous-time (TrigFlow) models: the folder carries the self-contained pipeline file and names its classes
TRIGFLOW_SCHEDULER_NAME = "TrigFlowSCMScheduler"
TRIGFLOW_PIPELINE_NAME = "TrigFlowPipeline"
TRIGFLOW_PIPELINE_MODULE = "pipeline_trigflow"
TRIGFLOW_PIPELINE_FILE = TRIGFLOW_PIPELINE_MODULE + ".py"


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
    if scheduler in SCHEDULER_NAMES | {TRIGFLOW_SCHEDULER_NAME} and unet is not None:
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


def write_trigflow_pipeline_files(folder: str, unet_class: str = "UNet2DModel"):
    """Makes a saved TrigFlow model folder one that plain diffusers samples correctly, through code it runs only with
    `trust_remote_code=True`: `trigflow_pipeline.py` copied as `pipeline_trigflow.py` (pipeline and scheduler), and
    a model_index.json that names its classes. Loaded as a plain `SCMScheduler` instead, the scheduler would start
    at t = pi/2 (sigma = infinity) and feed the UNet t instead of its c_noise(t): so no diffusers name is written."""
    import os
    import shutil

    import diffusers

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trigflow_pipeline.py")
    shutil.copyfile(source, os.path.join(folder, TRIGFLOW_PIPELINE_FILE))
    shutil.copyfile(source, os.path.join(folder, "scheduler", TRIGFLOW_PIPELINE_FILE))
    module = TRIGFLOW_PIPELINE_MODULE
    index = {"_class_name": [module, TRIGFLOW_PIPELINE_NAME], "_diffusers_version": diffusers.__version__,
             "scheduler": [module, TRIGFLOW_SCHEDULER_NAME], "unet": ["diffusers", unet_class]}  # fmt: skip
    write_text_atomic(os.path.join(folder, "model_index.json"), json.dumps(index, indent=2) + "\n")
