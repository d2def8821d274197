#!/bin/bash
# Continuous-time consistency distillation (sCD, Lu & Song 2024) of fashion-mnist-edm on Fashion-MNIST: the student
# starts as the teacher exactly (TrigFlow F = -F_edm at the teacher's own time input, 250 ln sigma; --time_input
# auto), ln sigma ~ N(-1.0, 1.4) mapped by t = arctan(sigma / 0.5), tangent warm-up over 200 steps, normalised
# tangent (c = 0.1), learned adaptive weighting, no prior weighting, RAdam 2e-4 cosine after a 50-step warm-up,
# batch 32, 1,600 steps (an sCD step costs 1.9 CD steps at the same batch on this CPU: about an hour of one core),
# EMA 0.995. Run 1 (README) was the first 400-step version of this recipe (tangent warm-up 100, EMA 0.99).
# Resumes from its newest checkpoint when run again. Not shipped unless its measured 1-step FID beats the shipped
# models' (README, Continuous-time consistency models).
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-scd}
STEPS=${STEPS:-1600}
launch training/train_consistency.py --mode scd --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist \
  --resolution 28 --random_flip --train_batch_size 32 --max_train_steps "$STEPS" --learning_rate 2e-4 \
  --lr_scheduler cosine --lr_warmup_steps 50 --tangent_warmup_steps 200 --ema_decay 0.995 \
  --checkpointing_steps 200 --validation_steps 800 --output_dir "$OUT" --resume_from_checkpoint latest --seed 0
