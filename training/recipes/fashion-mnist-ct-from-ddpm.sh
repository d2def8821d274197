#!/bin/bash
# The fashion-mnist-ct shipped until ECT run 4 from fashion-mnist-edm (fashion-mnist-ct-v4.sh) replaced it: ECT from
# the earlier DDPM teacher fashion-mnist-ddpm, FID 112.03 at 1 step (see training/recipes/README.md).
# The student trained without distillation, then shipped as fashion-mnist-ct: easy consistency tuning (ECT) started from
# the teacher's weights. No teacher output is used: 700 steps of denoising score matching on the data (the
# eps-teacher's UNet learns the consistency scalings, i.e. becomes an EDM-style denoiser), then ECT (continuous
# lognormal sigma, r(sigma) shrinking over 6 stages, pseudo-Huber, 1/(sigma - r) weights) at batch 32.
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-ct-from-ddpm}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_consistency.py --mode ect \
  --teacher_model_name_or_path fashion-mnist-ddpm --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 3600 --denoiser_warmup_steps 700 \
  --denoiser_warmup_target data --ect_num_stages 6 --dropout 0 \
  --learning_rate 2e-4 --lr_warmup_steps 100 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 200 --checkpoints_total_limit 2 --validation_steps 500 --resume_from_checkpoint latest
