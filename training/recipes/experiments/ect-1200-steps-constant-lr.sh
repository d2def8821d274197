#!/bin/bash
# Not shipped (README, Results: "ECT run 1"): ECT from fashion-mnist-edm's weights, 1,200 steps in 4 stages, constant
# learning rate 2e-4, batch 32, EMA 0.998; every checkpoint kept for benchmarks/fid_vs_step.py.
source "$(dirname "$0")/../common.sh"
OUT=${OUT:-runs/ect-1200-steps-constant-lr}
launch training/train_consistency.py --mode ect \
  --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 1200 --ect_num_stages 4 --dropout 0 \
  --learning_rate 2e-4 --lr_warmup_steps 100 --ema_decay 0.998 --seed 0 \
  --checkpointing_steps 200 --validation_steps 400 --resume_from_checkpoint latest
