#!/bin/bash
# Consistency distillation of fashion-mnist-edm, run 1 (history: the EMA weights of its checkpoint-600, FID 115.88 at
# 1 step, were shipped as fashion-mnist-cd until run 2, fashion-mnist-cd-v2.sh, measured 104.11; this run's FID swung
# between 135 and 166 at 500 samples after step 400, see the README's FID-against-training-step table). The teacher was trained with the
# consistency models' time input (t = 250 ln sigma), so the student starts from its weights as the teacher's own
# denoiser (up to the boundary-condition terms) and needs no warm-up. N = 12 (fewer, larger gaps than the paper's 18:
# the boundary condition reaches sigma_max in fewer rounds, which matters in a short CPU run), Heun, pseudo-Huber,
# mu = 0 (stop-grad target), RAdam lr 3e-4, batch 32, 1,200 steps.
# Every checkpoint is kept for benchmarks/fid_vs_step.py.
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-cd}
TEACHER=${TEACHER:-fashion-mnist-edm}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_consistency.py --mode cd \
  --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 1200 --num_scales 12 --ode_solver heun \
  --loss_type pseudo_huber --target_ema_decay 0 \
  --learning_rate 3e-4 --lr_warmup_steps 100 --ema_decay 0.998 --seed 0 \
  --checkpointing_steps 200 --validation_steps 400 --resume_from_checkpoint latest
