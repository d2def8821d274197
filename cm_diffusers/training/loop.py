"""What both training loops share: the step-indexed data order, the optimizer and its learning-rate schedule, EMA and
target networks, preparing and resuming a run, the per-step log and progress bar, and the checkpoint cycle.

One convention for both scripts: the learning-rate schedule is stepped once per optimizer step (not by Accelerate
once per process), so lr(k) is the same for any number of processes; the data order and the curricula are pure
functions of the global step, so every rank agrees and a resumed run continues exactly where it stopped.
"""

import hashlib
import json
import logging
import os
import time
from typing import Callable, Optional

import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .args import optimizer_settings
from .checkpoints import (
    apply_optimizer_flags,
    find_checkpoint,
    load_checkpoint,
    raise_if_weights_not_finite,
    save_checkpoint,
    truncate_log,
)
from .runtime import public_config

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Data order and per-step noise


class StepIndexedBatches(torch.utils.data.Sampler):
    """Endless batches of indices for one rank; micro-batch i depends only on (seed, i, rank).

    Each epoch is a seeded permutation split into disjoint per-rank shards, so ranks read different data and a run
    resumed at global step k continues with micro-batch k * gradient_accumulation_steps, exactly as if never stopped.
    """

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1, start=0):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_samples // world_size // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{num_samples} training images are too few for {world_size} process(es) x batch size "
                f"{batch_size}: lower --train_batch_size or add data."
            )
        self.start = start

    def __len__(self):
        return self.batches_per_epoch

    def __iter__(self):
        index, shard_epoch, shard = self.start, None, None
        while True:
            epoch, j = divmod(index, self.batches_per_epoch)
            if epoch != shard_epoch:
                order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
                shard_epoch, shard = epoch, order[self.rank :: self.world_size]
            yield shard[j * self.batch_size : (j + 1) * self.batch_size].tolist()
            index += 1


def collate(examples):
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([example["class_labels"] for example in examples], dtype=torch.long)
    if "captions" in examples[0]:  # text-to-image data (--caption_column): the prompts as strings
        batch["captions"] = [example["captions"] for example in examples]
    return batch


class StepBatches:
    """The endless micro-batches of one rank from `global_step` on (see `StepIndexedBatches`), moved to its device;
    `pop_seconds()` says how long the loop waited for data since the last call."""

    def __init__(self, dataset, args, accelerator, global_step: int):
        sampler = StepIndexedBatches(len(dataset), args.train_batch_size, args.seed, accelerator.process_index,
                                     accelerator.num_processes, start=global_step * args.gradient_accumulation_steps)
        # own generator: the loader's worker seed must not draw from the global RNG restored from the checkpoint
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed + accelerator.process_index + global_step),
        )
        self.iterator, self.device, self.seconds = iter(loader), accelerator.device, 0.0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        batch = next(self.iterator)
        self.seconds += time.perf_counter() - start
        return {name: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
                for name, value in batch.items()}  # fmt: skip

    def pop_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def step_generator(seed: int, index: int, process_index: int, device) -> torch.Generator:
    """A generator seeded by (seed, micro-step, rank) alone, so a resumed run draws the same noise."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + index * 4_099 + process_index)
    return generator


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA, target


def build_optimizer(parameters, args) -> torch.optim.Optimizer:
    """RAdam (the consistency-model papers) or AdamW with the flags' settings; foreach kernels on every device."""
    optimizer_cls = torch.optim.RAdam if args.optimizer == "radam" else torch.optim.AdamW
    return optimizer_cls(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, foreach=True)


def build_lr_schedule(optimizer, args):
    """diffusers' schedule over --max_train_steps optimizer steps; the loop steps it once per optimizer step."""
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                         num_training_steps=args.max_train_steps)


def make_ema(unet: UNet2DModel, decay: float, warmup: bool = False, inv_gamma: float = 1.0, power: float = 0.75):
    """diffusers' EMAModel of the weights; with `warmup`, decay = min(decay, 1 - (1 + t / inv_gamma)^-power)."""
    return EMAModel(unet.parameters(), decay=decay, use_ema_warmup=warmup, inv_gamma=inv_gamma, power=power,
                    foreach=True, model_cls=type(unet), model_config=unet.config)


@torch.no_grad()
def update_target(target: torch.nn.Module, online: torch.nn.Module, mu: float):
    """theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, Algorithm 2/3)."""
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p_online.detach(), 1.0 - mu)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters' bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def backward_and_step(accelerator, model, optimizer, loss, max_grad_norm: float, unwrapped=()):
    """Backward, clipping on the micro-step that syncs gradients, the optimizer step (Accelerate skips it while
    gradients accumulate), zeroed gradients. `unwrapped`: trained modules outside the DDP-wrapped `model` (sCM's
    log-variance head), whose gradients are averaged over the ranks here as DDP averages the model's."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and accelerator.num_processes > 1:
        for parameter in (p for module in unwrapped for p in module.parameters() if p.grad is not None):
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= accelerator.num_processes
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def evaluation_copy(unet: torch.nn.Module, ema=None) -> torch.nn.Module:
    """A float32 copy of the weights to sample and save: the EMA weights when there are some."""
    import copy

    unet = copy.deepcopy(unet).float()  # a copy draws no random numbers, unlike a new UNet
    if ema is not None:
        ema.copy_to(unet.parameters())
    return unet.eval()


# ----------------------------------------------------------------------------------------------------------------
# Preparing, resuming, checkpointing


def prepare_and_resume(accelerator, args, model, optimizer, lr_schedule, registered=()) -> tuple:
    """accelerator.prepare(model, optimizer); registers the schedule and the `registered` objects (EMA, a target
    network; None entries are skipped) for checkpointing; resumes from --resume_from_checkpoint, whose optimizer flags
    yield to the command line's. Returns (model, optimizer, global_step)."""
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    for obj in registered:
        if obj is not None:
            obj.to(accelerator.device)
            accelerator.register_for_checkpointing(obj)
    global_step = 0
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        global_step = load_checkpoint(accelerator, checkpoint)
        # lowering the learning rate after a divergence must take effect; a changed --optimizer is refused
        apply_optimizer_flags(checkpoint, optimizer, lr_schedule, optimizer_settings(args))
    return model, optimizer, global_step


def is_due(every: int, global_step: int) -> bool:
    return bool(every) and global_step % every == 0


def checkpoint(accelerator, args, global_step, modules, optimizer, ema=None, probe: Optional[Callable] = None):
    """Checks that weights, optimizer and EMA states and the loss `probe()` of the new weights are finite (weights of
    1e30 are finite yet give NaN a step later), then saves checkpoint-{global_step} atomically."""
    raise_if_diverged(accelerator, args, global_step, modules, optimizer, ema, probe)
    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, optimizer_settings(args))


def raise_if_diverged(accelerator, args, global_step, modules, optimizer, ema=None, probe=None):
    """A FloatingPointError naming the last good checkpoint when anything that would be saved is not finite."""
    states = [("optimizer state", optimizer.state_dict())]
    if ema is not None:
        states.append(("EMA weights", ema.shadow_params))
    modules = [module for module in modules if module is not None]
    raise_if_weights_not_finite(accelerator, global_step, args.output_dir, modules, states, probe)


# ----------------------------------------------------------------------------------------------------------------
# Logging


def finish_run(accelerator, log: "StepLog"):
    """Closes the log and ends the trackers once every rank is done."""
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def setup_logging(accelerator):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages


class StepLog:
    """The per-step record of a run: the progress bar (loss, images/s), the tracker, and logs/train_log.jsonl (one
    line per step; a resumed run drops the lines after its checkpoint, so every step is logged once). With
    --log_every_rank each rank writes its own file, with a digest of its weights."""

    def __init__(self, accelerator, args, global_step: int, project: str, batches: Optional[StepBatches] = None):
        self.accelerator, self.args, self.batches = accelerator, args, batches
        self.images_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logging_dir = os.path.join(args.output_dir, args.logging_dir)
        if accelerator.is_main_process and args.report_to != "none":
            accelerator.init_trackers(project, config=public_config(args))  # secrets left out
        self.file = None
        if accelerator.is_main_process or args.log_every_rank:
            os.makedirs(logging_dir, exist_ok=True)
            suffix = f"_rank{accelerator.process_index}" if args.log_every_rank else ""
            path = os.path.join(logging_dir, f"train_log{suffix}.jsonl")
            truncate_log(path, global_step)  # steps after the checkpoint are run again: log them once
            self.file = open(path, "a")
        self.progress = tqdm(total=args.max_train_steps, initial=global_step, unit="step", desc="steps",
                             disable=not accelerator.is_local_main_process)
        self.session_start, self.session_steps = time.perf_counter(), 0
        self.step_start = self.session_start

    def __call__(self, global_step: int, logs: dict, local_loss=None, model=None, **postfix):
        """Logs one optimizer step; `logs` holds plain numbers (copied to the host once by the caller)."""
        now = time.perf_counter()
        logs["step_time"], self.step_start = now - self.step_start, now
        if self.batches is not None:
            logs["data_time"] = self.batches.pop_seconds()
        if torch.cuda.is_available():
            logs["cuda_max_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.session_steps += 1
        images_per_second = self.images_per_step * self.session_steps / (now - self.session_start)
        self.progress.update(1)
        self.progress.set_postfix({"loss": f"{logs['loss']:.4g}", **postfix, "images/s": f"{images_per_second:.1f}"})
        self.accelerator.log(logs, step=global_step)
        if self.file is not None:
            record = {"step": global_step, **logs}
            if local_loss is not None:
                record["local_loss"] = float(local_loss)
            if self.args.log_every_rank and model is not None:  # proves that every rank holds the same weights
                record["weights_sha256"] = weights_digest(model)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def event(self, **record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        self.progress.close()
        if self.file is not None:
            self.file.close()
