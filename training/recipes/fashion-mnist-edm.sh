#!/bin/bash
# The Fashion-MNIST EDM teacher, shipped as fashion-mnist-edm: a 1.54M-parameter UNet2DModel without attention
# (attention at 14x14 cost a third of each step on CPU for little gain at 28x28), EDM preconditioning trained on
# ln sigma ~ N(-1.2, 1.2^2) with EDM's loss weight, and the consistency models' time input t = 250 ln sigma
# (--edm_time_input consistency), so a consistency student initialised from these weights starts at D(x, sigma).
# 2,000 steps at batch 64, AdamW lr 1e-3 (cosine), EMA up to 0.9995: ~60-75 min on one thread of a shared 2-core CPU.
# (The shipped run was started with --max_train_steps 3600, restarted with 2400 at step 400 and with 2000 at step 600
# to fit a CPU shared with other work; the cosine schedule was recomputed each time: lr 8.75e-4 at step 600 instead of 9.4e-4.)
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-edm}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_diffusion.py \
  --dataset_name fashion_mnist --resolution 28 --random_flip --output_dir "$OUT" \
  --model_type edm --edm_time_input consistency --unet_config training/recipes/fashion-mnist-edm-unet.json \
  --train_batch_size 64 --max_train_steps 2000 \
  --learning_rate 1e-3 --lr_warmup_steps 200 --lr_scheduler cosine --use_ema --ema_max_decay 0.9995 --seed 0 \
  --checkpointing_steps 200 --checkpoints_total_limit 2 --save_model_steps 600 \
  --validation_steps 1200 --validation_inference_steps 40 --resume_from_checkpoint latest
