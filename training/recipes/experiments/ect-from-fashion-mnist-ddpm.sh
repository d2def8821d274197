#!/bin/bash
# Not shipped any more (README, Results: the fashion-mnist-ct of before ECT from fashion-mnist-edm): ECT from the DDPM
# teacher fashion-mnist-ddpm's weights. No teacher output is used: 700 steps of denoising score matching on the data
# (the eps-teacher's UNet learns the consistency scalings), then ECT in 6 stages at batch 32, 3,600 steps in all.
source "$(dirname "$0")/../common.sh"
OUT=${OUT:-runs/ect-from-fashion-mnist-ddpm}
launch training/train_consistency.py --mode ect \
  --teacher_model_name_or_path fashion-mnist-ddpm --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 3600 --denoiser_warmup_steps 700 \
  --denoiser_warmup_target data --ect_num_stages 6 --dropout 0 \
  --learning_rate 2e-4 --lr_warmup_steps 100 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 200 --checkpoints_total_limit 2 --validation_steps 500 --resume_from_checkpoint latest
