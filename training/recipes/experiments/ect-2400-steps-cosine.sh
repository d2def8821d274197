#!/bin/bash
# Not shipped (README, Results: "ECT run 2"): ECT from fashion-mnist-edm's weights, 2,400 steps in 4 stages, 2e-4
# cosine, batch 32, EMA 0.999.
source "$(dirname "$0")/../common.sh"
OUT=${OUT:-runs/ect-2400-steps-cosine}
launch training/train_consistency.py --mode ect \
  --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 2400 --ect_num_stages 4 --dropout 0 \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 400 --validation_steps 1200 --resume_from_checkpoint latest
