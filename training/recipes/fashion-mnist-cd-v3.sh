#!/bin/bash
# Consistency distillation of fashion-mnist-edm, third round: CD run 2 (fashion-mnist-cd-v2.sh) continued. Run 2's
# FID-vs-step curve was flat over its last 200 steps, where its cosine learning rate reached zero; this run starts
# from run 2's final weights (--student_model_name_or_path) and distils for 1,000 more steps with a fresh cosine
# schedule at half the peak (2e-4); everything else as run 2 (batch 64, N = 12, Heun, pseudo-Huber, EMA 0.998).
# One command: runs run 2 first when its output is missing.
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-cd-v3}
TEACHER=${TEACHER:-fashion-mnist-edm}
STUDENT=${STUDENT:-runs/fashion-mnist-cd-v2}
if [ ! -f "$STUDENT/model_index.json" ]; then
  OUT="$STUDENT" TEACHER="$TEACHER" bash "$(dirname "$0")/fashion-mnist-cd-v2.sh"
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_consistency.py --mode cd \
  --teacher_model_name_or_path "$TEACHER" --student_model_name_or_path "$STUDENT" --dataset_name fashion_mnist \
  --resolution 28 --random_flip --output_dir "$OUT" --train_batch_size 64 --max_train_steps 1000 --num_scales 12 \
  --ode_solver heun --loss_type pseudo_huber --target_ema_decay 0 \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 --ema_decay 0.998 --seed 1 \
  --checkpointing_steps 200 --validation_steps 500 --resume_from_checkpoint latest
