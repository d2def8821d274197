"""Accelerate plumbing shared by the training scripts: the accelerator, atomic checkpoints, resumption, NaN stops.

Checkpoints are `accelerator.save_state` folders named `checkpoint-{global_step}` with a `training_state.json`.
A checkpoint is written into a hidden temporary sibling and renamed into place only when complete, so a run killed
during a save keeps its last good checkpoint and never leaves a half-written `checkpoint-N` behind. Objects beyond
the prepared model/optimizer/scheduler (EMA weights, a target network) go into the same folder when the caller
registers them with `accelerator.register_for_checkpointing` before saving or loading.
"""

import json
import logging
import os
import re
import shutil
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
TMP_PREFIX = ".tmp-checkpoint-"


def _is_multi_process_launch() -> bool:
    """True under `accelerate launch --multi_gpu`, torchrun, or any launcher that sets WORLD_SIZE > 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]) > 1
    return int(os.environ.get("LOCAL_RANK", -1)) != -1


def make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, log_with=None, project_dir=None):
    """An `accelerate.Accelerator` that never falls into two silent, independent trainings on CPU.

    Without CUDA, a multi-process launch (torchrun, `accelerate launch --multi_gpu`) builds a non-distributed
    Accelerator in every process unless it is told to use the CPU: here the processes then form a real gloo
    (MULTI_CPU) group. The data loaders use seedable samplers (seed + epoch), so a resumed run sees the batches in
    the same order as an uninterrupted one.

    Args:
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` (needs a GPU) or `"bf16"`.
        gradient_accumulation_steps (`int`, defaults to 1): micro-batches per optimizer step.
        log_with (`str`, *optional*): a tracker such as `"tensorboard"`; `None` or `"none"` logs nowhere.
        project_dir (`str`, *optional*): where trackers write (e.g. `output_dir/logs`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}.")
    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("fp16 mixed precision needs a CUDA GPU; on CPU use --mixed_precision bf16 or no.")
    cpu_distributed = _is_multi_process_launch() and not cuda
    if log_with in (None, "none", ""):
        log_with = None
    elif project_dir is None:
        raise ValueError(f"Logging with {log_with!r} needs a project_dir for the logs.")

    accelerator = Accelerator(
        cpu=cpu_distributed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if _is_multi_process_launch() and accelerator.num_processes == 1:
        raise RuntimeError(
            "This is a multi-process launch but Accelerate built a single-process state: every process would train "
            "alone and overwrite the others' files. Launch with `accelerate launch --multi_gpu --num_processes N` "
            "or torchrun."
        )
    if accelerator.is_main_process:
        mode = "CPU distributed over gloo" if cpu_distributed else str(accelerator.distributed_type)
        logger.info(
            f"Accelerate: {mode}, {accelerator.num_processes} process(es), device {accelerator.device}, "
            f"mixed precision {accelerator.mixed_precision}"
        )
    return accelerator


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints in `output_dir` as (global_step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str, global_step: int, checkpoints_total_limit: Optional[int] = None):
    """Saves the full training state to `output_dir/checkpoint-{global_step}` atomically; all ranks must call it.

    Returns the checkpoint's path. Only the newest `checkpoints_total_limit` checkpoints are kept.
    """
    final_dir = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp_dir = os.path.join(output_dir, f"{TMP_PREFIX}{global_step}")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a leftover of a save that was killed
    accelerator.wait_for_everyone()

    accelerator.save_state(tmp_dir)  # every rank writes its own RNG state; main writes the rest
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with open(os.path.join(tmp_dir, STATE_FILE), "w") as f:
            json.dump({"global_step": int(global_step)}, f)
        _replace_dir(tmp_dir, final_dir)
        _prune(output_dir, checkpoints_total_limit)
        logger.info(f"Saved checkpoint {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


def _replace_dir(src: str, dst: str):
    """Renames a finished folder into place; an existing `dst` (same step saved again) is moved aside first."""
    old = None
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)  # atomic on one file system: readers see no checkpoint-N or a complete one
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(output_dir: str, checkpoints_total_limit: Optional[int]):
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if checkpoints_total_limit is None:
        return
    if checkpoints_total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {checkpoints_total_limit}.")
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(len(checkpoints) - checkpoints_total_limit, 0)]:
        logger.info(f"Removing old checkpoint {path}")
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The checkpoint to resume from: None (start fresh), "latest" (newest in `output_dir`, or None) or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"No checkpoint in {output_dir}: starting a new training run.")
            return None
        return checkpoints[-1][1]
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} does not exist; pass `latest` or a checkpoint-N folder of a run."
        )
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE}); pass `latest` or a "
            "checkpoint-N folder written by save_checkpoint."
        )
    return path


def check_checkpoint_is_data_only(path: str):
    """Refuses a checkpoint whose pickled files hold anything but tensors and plain values.

    Accelerate unpickles registered objects (EMA, target network, lr schedule) with `weights_only=False`, which would
    run code hidden in a tampered file; each is first opened here with `weights_only=True`, which cannot.
    """
    from accelerate.utils.other import load as accelerate_load  # weights_only=True, plus numpy RNG-state types

    for name in sorted(os.listdir(path)):
        if not name.endswith((".pkl", ".bin", ".pt")):
            continue
        try:
            accelerate_load(os.path.join(path, name), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{os.path.join(path, name)} holds more than tensors and plain values, so it is not opened "
                f"(it could run code when unpickled). Resume from a checkpoint this package wrote. ({error})"
            ) from None


def load_checkpoint(accelerator, path: str) -> int:
    """Restores everything `save_checkpoint` saved (models, optimizer, lr schedule, RNG, registered objects).

    Returns the global step the checkpoint was taken at.
    """
    check_checkpoint_is_data_only(path)
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        global_step = int(json.load(f)["global_step"])
    logger.info(f"Resumed from {path} at step {global_step}")
    return global_step


def raise_if_not_finite(loss: torch.Tensor, global_step: int, output_dir: str):
    """Stops training on a NaN/inf loss with a message naming the step and the checkpoint to resume from.

    Pass a loss that is the same on every rank (e.g. `accelerator.reduce(loss, "mean")`) so all ranks stop together.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        advice = (
            f"The last good checkpoint is {checkpoints[-1][1]} (step {checkpoints[-1][0]}): resume with "
            "--resume_from_checkpoint latest"
        )
    else:
        advice = "No checkpoint was saved yet"
    raise FloatingPointError(
        f"The loss is {loss.detach().float().mean().item()} at step {global_step}. {advice}, and lower the learning "
        "rate, enable gradient clipping or use --mixed_precision no/bf16 instead of fp16."
    )


def default_unet_config(resolution: int, channels: int, num_class_embeds=None) -> dict:
    """The UNet2DModel both training scripts use without --unet_config: 3 levels (32, 64, 64) with attention at half
    resolution up to 32 px (~1.6M parameters at 28x28, the shipped Fashion-MNIST size), 4 levels up to 64 px and
    beyond."""
    if resolution <= 32:
        block_out_channels = (32, 64, 64)
        down = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")  # attention at half resolution (14x14 for 28)
    else:
        block_out_channels = (64, 128, 128, 256)
        down = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    halvings = len(block_out_channels) - 1
    if resolution % 2**halvings:
        raise ValueError(
            f"The default UNet halves the resolution {halvings} times: --resolution {resolution} must be divisible "
            f"by {2**halvings}; pass --unet_config for another architecture."
        )
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=8,
        norm_num_groups=32,
        num_class_embeds=num_class_embeds,
    )
