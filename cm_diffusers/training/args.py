"""The command-line flags both training scripts share, as argparse groups; each script passes its own defaults.

Every numeric flag is checked when it is parsed (the types of `cm_diffusers.argtypes`), so a bad value fails at once
with a message naming the flag, never after minutes of data loading.
"""

import argparse
import shlex
import sys

from ..argtypes import float_in, non_negative_float, non_negative_int, positive_float, positive_int
from ..redaction import redact_command

BETA = float_in(0, 1, high_open=True)  # Adam's betas and EMA decays: [0, 1)
LR_SCHEDULES = ["constant", "constant_with_warmup", "cosine", "linear"]
OPTIMIZER_FLAGS = ("optimizer", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                   "lr_scheduler", "lr_warmup_steps")  # fmt: skip


def add_optimization_args(
    parser: argparse.ArgumentParser,
    learning_rate=None,
    optimizers=("adamw",),
    adam_beta1: float = 0.9,
    adam_weight_decay: float = 0.0,
    lr_scheduler: str = "constant_with_warmup",
    lr_warmup_steps: int = 0,
    learning_rate_help: str = "Peak learning rate.",
) -> argparse._ArgumentGroup:
    """--train_batch_size, --max_train_steps, --learning_rate, --optimizer, Adam's settings, the schedule, clipping,
    accumulation, mixed precision, --seed and --dataloader_num_workers."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=positive_int, default=64, help="Batch size per process.")
    group.add_argument("--max_train_steps", type=positive_int, default=10000, help="Number of optimizer steps.")
    group.add_argument("--learning_rate", type=positive_float, default=learning_rate, help=learning_rate_help)
    group.add_argument("--optimizer", type=str, default=optimizers[0], choices=list(optimizers),
                       help=f"Optimizer ({', '.join(optimizers)}).")
    group.add_argument("--adam_beta1", type=BETA, default=adam_beta1, help="Adam beta1.")
    group.add_argument("--adam_beta2", type=BETA, default=0.999, help="Adam beta2.")
    group.add_argument("--adam_weight_decay", type=non_negative_float, default=adam_weight_decay, help="Weight decay.")
    group.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="Adam epsilon.")
    group.add_argument("--lr_scheduler", type=str, default=lr_scheduler, choices=LR_SCHEDULES,
                       help="Learning-rate schedule after the warm-up (diffusers' get_scheduler).")
    group.add_argument("--lr_warmup_steps", type=non_negative_int, default=lr_warmup_steps,
                       help="Linear warm-up steps.")
    group.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping (0: none).")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-batches per step.")
    group.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                       help="Autocast precision (fp16 needs a GPU).")
    group.add_argument("--seed", type=int, default=0, help="Seed of the weights, the noise and the data order.")
    group.add_argument("--dataloader_num_workers", type=non_negative_int, default=0, help="Data loading processes.")
    return group


def add_output_args(
    parser: argparse.ArgumentParser,
    checkpointing_steps: int = 0,
    checkpoints_total_limit=None,
    validation_steps: int = 0,
    report_to: str = "none",
    allow_never: bool = True,
) -> argparse._ArgumentGroup:
    """Checkpoints, resumption, validation grids, logging and the Hub upload. With `allow_never`, 0 turns periodic
    checkpoints and validation grids off; without it they must be positive."""
    every = non_negative_int if allow_never else positive_int
    never = " (0: never)" if allow_never else ""
    group = parser.add_argument_group("checkpoints, logging, hub")
    group.add_argument("--checkpointing_steps", type=every, default=checkpointing_steps,
                       help=f"Save a resumable training state every N steps{never}.")
    group.add_argument("--checkpoints_total_limit", type=positive_int, default=checkpoints_total_limit,
                       help="Keep at most this many checkpoints.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="`latest` or a checkpoint-N folder; keep --max_train_steps unchanged (schedules depend "
                       "on it).")
    group.add_argument("--validation_steps", type=every, default=validation_steps,
                       help=f"Save a grid of samples every N steps{never}.")
    group.add_argument("--num_validation_images", type=positive_int, default=16, help="Images per grid.")
    group.add_argument("--report_to", type=str, default=report_to, choices=["none", "tensorboard"],
                       help="Where to log besides logs/train_log.jsonl.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Log folder, relative to --output_dir.")
    group.add_argument("--log_every_rank", action="store_true",
                       help="Every rank writes its own log (with a digest of its weights).")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline (no checkpoints or logs).")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the output folder's name).")
    group.add_argument("--hub_token", type=str, default=None,
                       help="A Hub write token for --push_to_hub. Prefer the HF_TOKEN environment variable (or `hf "
                       "auth login`); either way the token is never written into the model card, the logs or "
                       "anything pushed.")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return group


def record_command_line(args, argv=None):
    """Stores the command line for the model card and the logs, with secret values (--hub_token, any --*key*,
    --*password*) replaced by REDACTED."""
    args.command_line = shlex.join(redact_command(sys.argv[1:] if argv is None else argv, keep_paths=True))
    return args


def optimizer_settings(args) -> dict:
    """The flags a checkpoint records and a resumed run applies (see `checkpoints.apply_optimizer_flags`)."""
    return {name: getattr(args, name) for name in OPTIMIZER_FLAGS}
