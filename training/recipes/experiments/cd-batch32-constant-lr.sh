#!/bin/bash
# Not shipped (README, Results: "CD run 1"): consistency distillation of fashion-mnist-edm at batch 32 with a constant
# learning rate (3e-4), N = 12, Heun, pseudo-Huber, mu = 0, 1,200 steps; every checkpoint kept for
# benchmarks/fid_vs_step.py.
source "$(dirname "$0")/../common.sh"
OUT=${OUT:-runs/cd-batch32-constant-lr}
launch training/train_consistency.py --mode cd \
  --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 1200 --num_scales 12 --ode_solver heun \
  --loss_type pseudo_huber --target_ema_decay 0 \
  --learning_rate 3e-4 --lr_warmup_steps 100 --ema_decay 0.998 --seed 0 \
  --checkpointing_steps 200 --validation_steps 400 --resume_from_checkpoint latest
