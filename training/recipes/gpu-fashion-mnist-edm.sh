#!/bin/bash
# The full-quality Fashion-MNIST EDM teacher for one GPU (benchmarks/gpu_check.py runs it as its part `teacher`): a
# 3.87M-parameter UNet2DModel (blocks 64/96/96, two layers per block, no attention; 14.8 MiB of float32 weights, 2.5x
# the CPU-trained fashion-mnist-edm), EDM preconditioning with the consistency time input t = 250 ln sigma (so that the
# CD and ECT students start at its denoiser), batch 256 in bf16, AdamW 1e-3 with a cosine decay, EMA up to 0.9995.
# STEPS=3000 is sized from an estimate (25-40 ms per step on an H200, launch-bound at this size; gpu_check gives it
# 160 s), not a measurement: no GPU has run it yet; read the step times in gpu_check's report and resize. The pipeline folder is written every
# STEPS/4 steps, so a run stopped at its time limit still leaves a teacher. Resumable like the CPU recipes.
# Knobs (environment): OUT, DATA (the data flags), UNET, BATCH, STEPS, PRECISION, WORKERS. Not common.sh's `launch`:
# that is the CPU launch of the shipped models (no mixed precision, one thread).
set -euo pipefail
OUT=${OUT:-runs/gpu-fashion-mnist-edm}
DATA=${DATA:---dataset_name fashion_mnist --resolution 28 --random_flip}
UNET=${UNET:-training/recipes/gpu-fashion-mnist-edm-unet.json}
BATCH=${BATCH:-256}
STEPS=${STEPS:-3000}
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-4}
SAVE=$(( (STEPS + 3) / 4 ))
# $DATA is split into words on purpose (several flags)
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION" \
  --dynamo_backend no training/train_diffusion.py $DATA --output_dir "$OUT" \
  --model_type edm --edm_time_input consistency --unet_config "$UNET" \
  --train_batch_size "$BATCH" --max_train_steps "$STEPS" --mixed_precision "$PRECISION" \
  --learning_rate 1e-3 --lr_warmup_steps $(( STEPS / 20 )) --lr_scheduler cosine --use_ema --ema_max_decay 0.9995 \
  --seed 0 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$SAVE" --checkpoints_total_limit 1 \
  --save_model_steps "$SAVE" --validation_steps "$STEPS" --validation_inference_steps 40 \
  --resume_from_checkpoint latest
