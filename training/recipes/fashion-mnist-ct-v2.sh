#!/bin/bash
# ECT from fashion-mnist-edm's weights, second attempt. The first (fashion-mnist-ct.sh: 1,200 steps, constant learning
# rate) was still improving steadily at its end (FID 222 -> 150 at 500 samples); this run is twice as long (2,400
# steps, the same 4 stages of a shrinking gap, each twice as long) and decays the learning rate to zero (cosine after
# a 100-step warm-up), with a longer EMA (0.999). Continuous lognormal sigma, pseudo-Huber, 1/(sigma - r) weights,
# batch 32, no dropout; no teacher output is used (the teacher folder provides the initial weights only).
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-ct-v2}
TEACHER=${TEACHER:-fashion-mnist-edm}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_consistency.py --mode ect \
  --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 2400 --ect_num_stages 4 --dropout 0 \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 400 --validation_steps 1200 --resume_from_checkpoint latest
