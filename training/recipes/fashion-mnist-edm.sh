#!/bin/bash
# Builds fashion-mnist-edm (shipped teacher): a 1.54M-parameter UNet2DModel without attention, EDM preconditioning,
# ln sigma ~ N(-1.2, 1.2^2) with EDM's loss weight, and the consistency models' time input t = 250 ln sigma
# (--edm_time_input consistency), so a consistency student initialised from its weights starts at D(x, sigma).
# 2,000 steps at batch 64, AdamW 1e-3 cosine, EMA up to 0.9995. How the shipped run went: README, Results.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-edm}
launch training/train_diffusion.py \
  --dataset_name fashion_mnist --resolution 28 --random_flip --output_dir "$OUT" \
  --model_type edm --edm_time_input consistency --unet_config training/recipes/fashion-mnist-edm-unet.json \
  --train_batch_size 64 --max_train_steps 2000 \
  --learning_rate 1e-3 --lr_warmup_steps 200 --lr_scheduler cosine --use_ema --ema_max_decay 0.9995 --seed 0 \
  --checkpointing_steps 200 --checkpoints_total_limit 2 --save_model_steps 600 \
  --validation_steps 1200 --validation_inference_steps 40 --resume_from_checkpoint latest
