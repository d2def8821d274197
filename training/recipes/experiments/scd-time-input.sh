#!/bin/bash
# Not shipped (README, Continuous-time consistency models: "time input"): the network's time input of an sCD student
# of fashion-mnist-edm, compared at equal steps: TIME_INPUT=auto (the teacher's own 250 ln sigma: the student starts
# as the teacher exactly, but d c_noise / dt = 250 / (sin t cos t) grows without bound at both ends of [0, pi/2])
# against TIME_INPUT=t (the paper's 1000 t: a bounded derivative, but a student that starts away from its teacher).
# Otherwise fashion-mnist-scd.sh's settings over 200 steps (tangent warm-up 100); every checkpoint kept for
# benchmarks/fid_vs_step.py.
source "$(dirname "$0")/../common.sh"
TIME_INPUT=${TIME_INPUT:-auto}
OUT=${OUT:-runs/scd-time-input-$TIME_INPUT}
launch training/train_consistency.py --mode scd --time_input "$TIME_INPUT" --teacher_model_name_or_path "$TEACHER" \
  --dataset_name fashion_mnist --resolution 28 --random_flip --train_batch_size 32 --max_train_steps 200 \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 50 --tangent_warmup_steps 100 --ema_decay 0.99 \
  --checkpointing_steps 100 --validation_steps 200 --output_dir "$OUT" --resume_from_checkpoint latest --seed 0
