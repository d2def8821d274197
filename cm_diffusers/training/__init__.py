"""The training core shared by `training/train_diffusion.py` and `training/train_consistency.py`.

- `args`: the flags both scripts share (optimisation; checkpoints, logging, Hub), validated when parsed.
- `runtime`: the accelerator (a real gloo group for multi-process CPU launches), model sources checked before any
  data loads, the default UNet, the script entry point that turns user errors into one line.
- `checkpoints`: atomic checkpoint and pipeline saves, resumption, finite-weight checks, NaN stops.
- `loop`: step-indexed data order, optimizer and learning-rate schedule, EMA and target networks, the per-step log.
- `consistency`, `diffusion`: what only one of the two scripts needs (models, losses, validation, the saved folder).
"""
