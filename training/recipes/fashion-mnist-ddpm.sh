#!/bin/bash
# Builds fashion-mnist-ddpm (shipped, the earlier teacher; kept for DDPM-teacher tests and comparisons): a DDPM
# epsilon-prediction UNet2DModel (1.62M parameters, 28x28x1), 2,200 steps at batch 64, AdamW 5e-4 cosine, EMA 0.999.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-ddpm}
launch training/train_diffusion.py \
  --dataset_name fashion_mnist --resolution 28 --random_flip --output_dir "$OUT" \
  --model_type ddpm --prediction_type epsilon --train_batch_size 64 --max_train_steps 2200 \
  --learning_rate 5e-4 --lr_warmup_steps 200 --lr_scheduler cosine --use_ema --ema_max_decay 0.999 --seed 0 \
  --checkpointing_steps 250 --checkpoints_total_limit 2 --save_model_steps 500 \
  --validation_steps 1000 --validation_inference_steps 50 --resume_from_checkpoint latest
