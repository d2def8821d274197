#!/bin/bash
# Builds fashion-mnist-lcm (not shipped yet): the full LCM of the Fashion-MNIST latent teacher (fashion-mnist-ldm.sh,
# run first into $LDM when that folder holds no model): the teacher's UNet plus a 64-d w-embedding, target network
# EMA 0.95 (LCM's), w ~ U[1, 5], AdamW 1e-4, evaluation EMA 0.999; saved as a LatentConsistencyModelPipeline.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-lcm}
LDM=${LDM:-$(dirname "$OUT")/fashion-mnist-ldm}
if [ ! -f "$LDM/model_index.json" ]; then
  OUT="$LDM" bash "$(dirname "$0")/fashion-mnist-ldm.sh"
fi
launch training/train_consistency.py --mode lcd --lcd_student lcm --teacher_model_name_or_path "$LDM" \
  --dataset_name fashion_mnist --caption_template "a {}" --resolution 32 --output_dir "$OUT" \
  --time_cond_proj_dim 64 --num_scales 50 --w_min 1 --w_max 5 --loss_type l2 --train_batch_size 64 \
  --max_train_steps 1000 --learning_rate 1e-4 --optimizer adamw --lr_warmup_steps 50 --ema_decay 0.999 --seed 0 \
  --checkpointing_steps 100 --checkpoints_total_limit 2 --num_validation_images 10 --validation_prompts \
  "a t-shirt/top" "a trouser" "a pullover" "a dress" "a coat" "a sandal" "a shirt" "a sneaker" "a bag" \
  "a ankle boot" --resume_from_checkpoint latest
