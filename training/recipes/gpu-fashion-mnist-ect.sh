#!/bin/bash
# Easy consistency tuning from the GPU teacher's weights (gpu-fashion-mnist-edm.sh; benchmarks/gpu_check.py runs this
# as its part `ect`): 4 stages (the gap sigma - r halves per stage), ln sigma ~ N(-0.4, 2.0) (the CPU runs' choice:
# high levels twice as often as ECT's CIFAR-10 N(-1.1, 2.0)), no dropout, batch 256 in bf16, RAdam 2e-4 with a cosine
# decay, evaluation EMA 0.995. STEPS=800 is sized from an estimate (35-55 ms per step on an H200, about 1.3 teacher
# steps; gpu_check gives it 65 s), not a measurement. The pipeline is written at the end only: size STEPS well inside
# the time limit. Knobs (environment): OUT, TEACHER (default: gpu-fashion-mnist-edm beside OUT, trained first, with its
# own sizes, when missing), DATA, BATCH, STEPS, PRECISION, WORKERS.
set -euo pipefail
OUT=${OUT:-runs/gpu-fashion-mnist-ect}
TEACHER=${TEACHER:-$(dirname "$OUT")/gpu-fashion-mnist-edm}
DATA=${DATA:---dataset_name fashion_mnist --resolution 28 --random_flip}
BATCH=${BATCH:-256}
STEPS=${STEPS:-800}
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-4}
if [ ! -f "$TEACHER/model_index.json" ]; then  # one command: the teacher first, at its own STEPS and BATCH
  OUT="$TEACHER" STEPS= BATCH= bash "$(dirname "$0")/gpu-fashion-mnist-edm.sh"
fi
# $DATA is split into words on purpose (several flags)
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION" \
  --dynamo_backend no training/train_consistency.py --mode ect --teacher_model_name_or_path "$TEACHER" $DATA \
  --output_dir "$OUT" --train_batch_size "$BATCH" --max_train_steps "$STEPS" --mixed_precision "$PRECISION" \
  --ect_num_stages 4 --p_mean -0.4 --dropout 0 --learning_rate 2e-4 --lr_scheduler cosine \
  --lr_warmup_steps $(( STEPS / 20 )) --ema_decay 0.995 --seed 0 --dataloader_num_workers "$WORKERS" \
  --checkpointing_steps $(( (STEPS + 1) / 2 )) --checkpoints_total_limit 1 --validation_steps 0 \
  --resume_from_checkpoint latest
