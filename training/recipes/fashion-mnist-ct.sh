#!/bin/bash
# Builds fashion-mnist-ct (shipped): easy consistency tuning (ECT) from fashion-mnist-edm's weights (no teacher output
# is used: the folder gives the initial weights only). Continuous ln sigma ~ N(P_MEAN, 2), pseudo-Huber, 1/(sigma - r)
# weights, batch 32, EMA 0.999, no dropout, in two stages:
#   1. 4,000 steps in 5 stages of a halving gap sigma - r, 2e-4 cosine, seed 0 (into $STAGE1);
#   2. continued from stage 1's final EMA weights for 1,600 steps at the next gap (--ect_q 64 --ect_num_stages 1),
#      1e-4 cosine, seed 1, sampled from sigma 40 (--sampling_sigma_max 40; 2-step middle level 0.4).
# P_MEAN (default -0.4, ECT's CIFAR-10 value is -1.1) sets both stages' level distribution, STAGE1_P_MEAN stage 1's
# alone. Each stage resumes from its newest checkpoint when run again. The runs that led here: README, Results.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-ct}
STAGE1=${STAGE1:-$OUT-stage1}
P_MEAN=${P_MEAN:--0.4}
STAGE1_P_MEAN=${STAGE1_P_MEAN:-$P_MEAN}
ECT_FLAGS=(--mode ect --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28
  --random_flip --train_batch_size 32 --dropout 0 --lr_scheduler cosine --ema_decay 0.999
  --resume_from_checkpoint latest)
if [ ! -f "$STAGE1/model_index.json" ]; then
  launch training/train_consistency.py "${ECT_FLAGS[@]}" --output_dir "$STAGE1" --max_train_steps 4000 \
    --ect_num_stages 5 --p_mean "$STAGE1_P_MEAN" --learning_rate 2e-4 --lr_warmup_steps 100 --seed 0 \
    --checkpointing_steps 800 --validation_steps 2000
fi
launch training/train_consistency.py "${ECT_FLAGS[@]}" --output_dir "$OUT" --student_model_name_or_path "$STAGE1" \
  --max_train_steps 1600 --ect_q 64 --ect_num_stages 1 --p_mean "$P_MEAN" --learning_rate 1e-4 \
  --lr_warmup_steps 50 --seed 1 --checkpointing_steps 400 --validation_steps 800 \
  --sampling_sigma_max 40 --sigma_mid 0.4
