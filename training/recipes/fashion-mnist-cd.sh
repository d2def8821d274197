#!/bin/bash
# Consistency distillation of fashion-mnist-ddpm, shipped as fashion-mnist-cd: 1,200 steps of denoiser warm-up
# (the student, started from the teacher's weights, regresses onto the teacher's D(x, sigma) with the consistency
# scalings), then 3,400 CD steps (N = 18, Heun, pseudo-Huber, mu = 0) at batch 32.
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-cd}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 training/train_consistency.py --mode cd \
  --teacher_model_name_or_path fashion-mnist-ddpm --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 4600 --denoiser_warmup_steps 1200 \
  --learning_rate 2e-4 --lr_warmup_steps 100 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 200 --checkpoints_total_limit 2 --validation_steps 600 --resume_from_checkpoint latest
