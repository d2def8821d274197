#!/bin/bash
# Consistency distillation of the GPU teacher (gpu-fashion-mnist-edm.sh; benchmarks/gpu_check.py runs this as its
# part `cd`): N = 18 with Heun steps (the paper's CIFAR-10 setting), pseudo-Huber, stop-gradient target (mu = 0),
# batch 256 in bf16, RAdam 4e-4 with a cosine decay, evaluation EMA 0.995; the student starts at the teacher's denoiser
# (same architecture, consistency time input). STEPS=600 is sized from an estimate (50-80 ms per step on an H200: a CD
# step costs about two teacher steps; gpu_check gives it 65 s), not a measurement. The pipeline is written at the end
# only: size STEPS well inside the time limit. Knobs (environment): OUT, TEACHER (default: gpu-fashion-mnist-edm
# beside OUT, trained first, with its own sizes, when missing), DATA, BATCH, STEPS, PRECISION, WORKERS.
set -euo pipefail
OUT=${OUT:-runs/gpu-fashion-mnist-cd}
TEACHER=${TEACHER:-$(dirname "$OUT")/gpu-fashion-mnist-edm}
DATA=${DATA:---dataset_name fashion_mnist --resolution 28 --random_flip}
BATCH=${BATCH:-256}
STEPS=${STEPS:-600}
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-4}
if [ ! -f "$TEACHER/model_index.json" ]; then  # one command: the teacher first, at its own STEPS and BATCH
  OUT="$TEACHER" STEPS= BATCH= bash "$(dirname "$0")/gpu-fashion-mnist-edm.sh"
fi
# $DATA is split into words on purpose (several flags)
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION" \
  --dynamo_backend no training/train_consistency.py --mode cd --teacher_model_name_or_path "$TEACHER" $DATA \
  --output_dir "$OUT" --train_batch_size "$BATCH" --max_train_steps "$STEPS" --mixed_precision "$PRECISION" \
  --num_scales 18 --ode_solver heun --loss_type pseudo_huber --target_ema_decay 0 \
  --learning_rate 4e-4 --lr_scheduler cosine --lr_warmup_steps $(( STEPS / 20 )) --ema_decay 0.995 --seed 0 \
  --dataloader_num_workers "$WORKERS" --checkpointing_steps $(( (STEPS + 1) / 2 )) --checkpoints_total_limit 1 \
  --validation_steps 0 --resume_from_checkpoint latest
