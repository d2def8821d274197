"""Checkpoints of the training scripts: atomic saves, resumption, NaN stops.

Checkpoints are `accelerator.save_state` folders named `checkpoint-{global_step}` with a `training_state.json`.
A checkpoint is written into a hidden temporary sibling and renamed into place only when complete, so a run killed
during a save keeps its last good checkpoint and never leaves a half-written `checkpoint-N` behind. Objects beyond
the prepared model/optimizer/scheduler (EMA weights, a target network) go into the same folder when the caller
registers them with `accelerator.register_for_checkpointing` before saving or loading.

Before a checkpoint is written, `raise_if_weights_not_finite` checks that the weights (and the optimizer and EMA
states) are finite and still give a finite loss, so every `checkpoint-N` on disk is one training can resume from; the
NaN message names the newest such checkpoint. A failed write (a full disk) removes the temporary folder and says how
much space was needed. A resumed run takes the optimizer flags of its command line (learning rate, betas, weight
decay, epsilon; the schedule's shape is rebuilt from the flags anyway) and refuses a different optimizer class.
"""

import json
import logging
import os
import re
import shutil
from typing import Callable, Optional

import torch

from ..files import WRITE_ERRORS, free_bytes, write_error

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
TMP_PREFIX = ".tmp-checkpoint-"


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


def _tensor_bytes(obj) -> int:
    """Bytes of all tensors inside nested dicts/lists (a state dict, an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def checkpoint_bytes(accelerator) -> int:
    """About how many bytes `save_checkpoint` writes: models, optimizer states and registered objects."""
    total = sum(_tensor_bytes(model.state_dict()) for model in accelerator._models)
    total += sum(_tensor_bytes(optimizer.state_dict()) for optimizer in accelerator._optimizers)
    for obj in accelerator._custom_objects:
        total += _tensor_bytes(obj.state_dict()) if hasattr(obj, "state_dict") else 0
    return int(total * 1.02) + 2**16  # headers, RNG states, json


def save_checkpoint(
    accelerator,
    output_dir: str,
    global_step: int,
    checkpoints_total_limit: Optional[int] = None,
    settings: Optional[dict] = None,
):
    """Saves the full training state to `output_dir/checkpoint-{global_step}` atomically; all ranks must call it.

    Returns the checkpoint's path. Only the newest `checkpoints_total_limit` checkpoints are kept. `settings` (e.g.
    the optimizer flags) are stored with the step and read back by `checkpoint_settings`. When the write fails (a full
    disk), the temporary folder is removed and an OSError says how much space was needed.
    """
    final_dir = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp_dir = os.path.join(output_dir, f"{TMP_PREFIX}{global_step}")
    needed = checkpoint_bytes(accelerator)
    if free_bytes(output_dir) < needed:  # every rank refuses before writing a byte (none waits for the others)
        raise write_error(output_dir, needed, OSError("not enough free space"), f"checkpoint-{global_step}")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        for name in os.listdir(output_dir):  # leftovers of saves that were killed or hit a full disk
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()

    try:
        accelerator.save_state(tmp_dir)  # every rank writes its own RNG state; main writes the rest
        if accelerator.is_main_process:
            with open(os.path.join(tmp_dir, STATE_FILE), "w") as f:
                json.dump({"global_step": int(global_step), "settings": settings or {}}, f)
    except WRITE_ERRORS as error:  # torch reports a full disk as "basic_ios::clear: iostream error"
        failure = write_error(output_dir, needed, error, f"checkpoint-{global_step}")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise failure from error
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
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


def save_pretrained_atomic(
    save: Callable, output_dir: str, components=("unet", "scheduler", "model_index.json"), needed_bytes: int = 0
):
    """`save(folder)` writes a pipeline into a temporary sibling; each component then replaces its old version by a
    rename, `model_index.json` (what marks a complete pipeline) last. A failed write (a full disk) removes the
    temporary folder, keeps the old files intact, and raises an OSError saying how much space (`needed_bytes`) was
    needed."""
    tmp_dir = os.path.join(output_dir, ".tmp-pipeline")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        save(tmp_dir)
    except WRITE_ERRORS as error:
        written = [os.path.join(root, name) for root, _, names in os.walk(tmp_dir) for name in names]
        needed = max(needed_bytes, sum(os.path.getsize(path) for path in written))
        failure = write_error(output_dir, needed, error, "the pipeline")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise failure from error
    for name in components:
        src, dst = os.path.join(tmp_dir, name), os.path.join(output_dir, name)
        if os.path.isdir(src):
            _replace_dir(src, dst)
        else:
            os.replace(src, dst)
    shutil.rmtree(tmp_dir, ignore_errors=True)


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


def checkpoint_settings(path: str) -> dict:
    """The `settings` a checkpoint was saved with ({} for checkpoints written before settings were stored)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f).get("settings") or {}


def apply_optimizer_flags(path: str, optimizer, lr_scheduler, settings: dict, refuse=("optimizer",)):
    """After resuming from `path`: the command line's optimizer flags win over the checkpoint's, with a warning for
    each change; a change of a flag in `refuse` (the optimizer class, whose state would not fit) is a ValueError.

    `settings` holds `learning_rate` and any of `adam_beta1`, `adam_beta2`, `adam_weight_decay`, `adam_epsilon`,
    `lr_scheduler`, `lr_warmup_steps`, `optimizer` (as `save_checkpoint` stored them). The schedule's shape comes
    from the flags anyway (its lambda is rebuilt, not saved); its base learning rate is reset here.
    """
    saved = checkpoint_settings(path)
    for name in refuse:
        if name in saved and name in settings and saved[name] != settings[name]:
            raise ValueError(
                f"{path} was trained with --{name} {saved[name]}, this command says --{name} {settings[name]}: its "
                f"optimizer state does not fit. Resume with --{name} {saved[name]}, or start a new run in another "
                "--output_dir (without --resume_from_checkpoint)."
            )
    changed = {
        name: (saved[name], value) for name, value in settings.items() if name in saved and saved[name] != value
    }
    for name, (old, new) in changed.items():
        logger.warning(f"Resuming with --{name} {new} (the checkpoint was trained with {old}).")
    for group in optimizer.param_groups:
        group["initial_lr"] = settings["learning_rate"]
        if "adam_beta1" in settings and "betas" in group:
            group["betas"] = (settings["adam_beta1"], settings["adam_beta2"])
        if "adam_weight_decay" in settings:
            group["weight_decay"] = settings["adam_weight_decay"]
        if "adam_epsilon" in settings:
            group["eps"] = settings["adam_epsilon"]
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps prepared schedulers
    schedule.base_lrs = [settings["learning_rate"]] * len(optimizer.param_groups)
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    schedule._last_lr = rates
    return changed


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


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point())


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _state_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _state_tensors(value)


def raise_if_weights_not_finite(
    accelerator, global_step: int, output_dir: str, modules=(), states=(), probe: Optional[Callable] = None
):
    """Checks, before anything is saved, that every weight of `modules`, every tensor of `states` (optimizer, EMA)
    and the loss `probe()` of the current weights are finite; all ranks agree. Weights of 1e30 are finite but give a
    NaN loss at the next step: the probe catches them, so no checkpoint of such weights is ever written. The probe
    runs without gradients on a forked RNG, so the run draws the same random numbers as without it.

    Raises FloatingPointError naming the newest checkpoint, which passed this same check when it was saved.
    """
    problems = []
    for module in modules:
        if not _all_finite(module.parameters()):
            problems.append(f"{type(module).__name__} weights")
    for name, state in states:
        if not _all_finite(_state_tensors(state)):
            problems.append(name)
    if not problems and probe is not None:
        device = accelerator.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), accelerator.autocast():
            loss = probe().detach()
        if not bool(torch.isfinite(loss).all()):
            problems.append(f"the loss of the current weights ({loss.float().mean().item()})")
    flag = accelerator.reduce(torch.tensor(float(len(problems) > 0), device=accelerator.device), reduction="sum")
    if flag.item() == 0:
        return
    raise FloatingPointError(
        f"Training diverged by step {global_step}: {', '.join(problems) or 'another rank'} not finite, so no "
        f"checkpoint was saved. {_resume_advice(output_dir)}"
    )


def _resume_advice(output_dir: str) -> str:
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        where = (
            f"The last good checkpoint is {checkpoints[-1][1]} (step {checkpoints[-1][0]}; its weights were checked "
            "finite before it was saved): resume with --resume_from_checkpoint latest"
        )
    else:
        where = "No checkpoint was saved yet: start again"
    return (
        f"{where} and a lower --learning_rate (resumed runs use the learning rate of their command line), gradient "
        "clipping (--max_grad_norm), or --mixed_precision no/bf16 instead of fp16."
    )


def raise_if_not_finite(loss: torch.Tensor, global_step: int, output_dir: str):
    """Stops training on a NaN/inf loss with a message naming the step and the checkpoint to resume from.

    Pass a loss that is the same on every rank (e.g. `accelerator.reduce(loss, "mean")`) so all ranks stop together.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    raise FloatingPointError(
        f"The loss is {loss.detach().float().mean().item()} at step {global_step}. {_resume_advice(output_dir)}"
    )


def truncate_log(path: str, global_step: int):
    """Drops the entries of a JSON-lines log after `global_step` (written by the run that a resume replaces), so
    a resumed run's log has every step once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue  # a line cut off by a kill
        if step is not None and step > global_step:
            break
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
