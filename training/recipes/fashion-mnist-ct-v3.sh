#!/bin/bash
# ECT from fashion-mnist-edm's weights, third round (continued by fashion-mnist-ct-v4.sh, the shipped one). Run 2
# (fashion-mnist-ct-v2.sh: 2,400 steps in 4 stages) had a 1-step FID of 121.5, behind the ECT student of the older
# DDPM teacher (112.0), and its FID-vs-step curve was still falling until its learning rate decayed. This run is 4,000
# steps in 5 stages of 800 (the gap sigma - r halves per stage) with the same cosine decay, EMA, batch and loss, and
# draws ln sigma from N(-0.4, 2.0) instead of ECT's CIFAR-10 N(-1.1, 2.0): the high noise levels that one-step
# sampling starts from are trained about twice as often (P(sigma > 10) 8.8% instead of 4.4%). P_MEAN=-1.1
# OUT=runs/fashion-mnist-ct-v3-pmean-1.1 reproduces the comparison run.
# No teacher output is used (the teacher folder provides the initial weights only). Result: FID 101.95 at 1 step (the
# then shipped fashion-mnist-ct: 112.03) and 63.79 at 2, but its one-step images from sigma 80 are greyer than the
# data: pixel W1 0.057 against the shipped-model test's 0.05 (tests/test_pretrained.py). Run 4
# (fashion-mnist-ct-v4.sh) continues it and samples from sigma 40, which fixed that.
set -euo pipefail
OUT=${OUT:-runs/fashion-mnist-ct-v3}
TEACHER=${TEACHER:-fashion-mnist-edm}
P_MEAN=${P_MEAN:--0.4}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_consistency.py --mode ect \
  --teacher_model_name_or_path "$TEACHER" --dataset_name fashion_mnist --resolution 28 --random_flip \
  --output_dir "$OUT" --train_batch_size 32 --max_train_steps 4000 --ect_num_stages 5 --dropout 0 \
  --p_mean "$P_MEAN" --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 800 --validation_steps 2000 --resume_from_checkpoint latest
