"""The run around a training loop: the accelerator, model sources checked before data loads, the default UNet,
tracker configs without secrets, and a script entry point that turns user errors into one line."""

import logging
import os
import sys
from typing import Callable

import torch

from ..redaction import is_secret_name, redact_command

logger = logging.getLogger(__name__)


def _is_multi_process_launch() -> bool:
    """True under `accelerate launch --multi_gpu`, torchrun, or any launcher that sets WORLD_SIZE > 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]) > 1
    return int(os.environ.get("LOCAL_RANK", -1)) != -1


def make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, log_with=None, project_dir=None):
    """An `accelerate.Accelerator` that never falls into two silent, independent trainings on CPU.

    Without CUDA, a multi-process launch (torchrun, `accelerate launch --multi_gpu`) builds a non-distributed
    Accelerator in every process unless it is told to use the CPU: here the processes then form a real gloo
    (MULTI_CPU) group. (Data order is not Accelerate's business here: `loop.StepBatches` derives each rank's batches
    from the global step, so a resumed run sees them in the same order as an uninterrupted one.)

    Args:
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` (needs a GPU) or `"bf16"`.
        gradient_accumulation_steps (`int`, defaults to 1): micro-batches per optimizer step.
        log_with (`str`, *optional*): a tracker such as `"tensorboard"`; `None` or `"none"` logs nowhere.
        project_dir (`str`, *optional*): where trackers write (e.g. `output_dir/logs`).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

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


def check_model_source(name: str, flag: str):
    """Checks a model argument before any data is loaded: a shipped short name, a folder holding a diffusers model,
    or a Hub repo id (already in the cache when HF_HUB_OFFLINE is set). Raises a ValueError naming `flag`."""
    from ..shipped_models import SHIPPED_MODELS, resolve_pretrained

    if name in SHIPPED_MODELS:
        resolve_pretrained(name)
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        markers = ("model_index.json", os.path.join("unet", "config.json"), "config.json")
        if not any(os.path.isfile(os.path.join(path, marker)) for marker in markers):
            raise ValueError(
                f"{flag} {name}: the folder holds no diffusers model (no model_index.json, unet/config.json or "
                "config.json)."
            )
        return
    if os.path.exists(path):
        raise ValueError(f"{flag} {name} is a file; pass a model folder, a Hub repo id or a shipped model name.")
    if name.startswith(("/", "~", ".")) or name.count("/") != 1:
        raise ValueError(
            f"{flag} {name}: no such folder, and not a Hub repo id (org/name) or a shipped model "
            f"({', '.join(SHIPPED_MODELS)})."
        )
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        cached = any(
            isinstance(try_to_load_from_cache(name, filename), str)
            for filename in ("model_index.json", "unet/config.json", "config.json")
        )
        if not cached:
            raise ValueError(
                f"{flag} {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it first or "
                "pass a local folder."
            )


def public_config(args) -> dict:
    """The flags as a tracker config (TensorBoard hparams: numbers, strings, booleans), secrets removed."""
    config = {}
    for name, value in vars(args).items():
        if is_secret_name(name):
            continue
        if name == "command_line":
            value = " ".join(redact_command(value.split(), keep_paths=True))
        config[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def run_script(main: Callable, args, prog: str):
    """Runs a training script's main(args); errors the user can fix (bad flags or data, NaN, a full disk) end with
    one line on stderr and exit status 1 instead of a traceback."""
    try:
        main(args)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as error:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # end the progress bar's line before the message
            bar.close()
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(1)


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
