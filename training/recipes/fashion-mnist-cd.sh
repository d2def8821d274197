#!/bin/bash
# Builds fashion-mnist-cd (shipped): consistency distillation of fashion-mnist-edm, whose weights are the student's
# exact initialisation (no warm-up). N = 12, Heun teacher steps, pseudo-Huber, stop-grad target (mu = 0), RAdam,
# batch 64, EMA 0.998, in two stages:
#   1. 1,000 steps, 4e-4 cosine after a 100-step warm-up, seed 0 (into $STAGE1);
#   2. continued from stage 1's final weights (--student_model_name_or_path) for 1,000 steps, 2e-4 cosine, seed 1.
# Each stage resumes from its newest checkpoint when run again. The runs that led here: README, Results.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-cd}
STAGE1=${STAGE1:-$OUT-stage1}
CD_FLAGS=(--mode cd --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28
  --random_flip --train_batch_size 64 --max_train_steps 1000 --num_scales 12 --ode_solver heun
  --loss_type pseudo_huber --target_ema_decay 0 --lr_scheduler cosine --lr_warmup_steps 100 --ema_decay 0.998
  --checkpointing_steps 200 --validation_steps 500 --resume_from_checkpoint latest)
if [ ! -f "$STAGE1/model_index.json" ]; then
  launch training/train_consistency.py "${CD_FLAGS[@]}" --output_dir "$STAGE1" --learning_rate 4e-4 --seed 0
fi
launch training/train_consistency.py "${CD_FLAGS[@]}" --output_dir "$OUT" --student_model_name_or_path "$STAGE1" \
  --learning_rate 2e-4 --seed 1
