#!/bin/bash
# Builds fashion-mnist-lcm-lora (shipped): LCM-LoRA of the Fashion-MNIST latent teacher (fashion-mnist-ldm.sh,
# run first into $LDM when that folder holds no model), by latent consistency distillation: train_consistency.py
# --mode lcd --lcd_student lora, rank 16 on the teacher's UNet, the teacher's guided DDIM step over a 50-point
# skipping-step grid, w ~ U[1, 5] (diffusers' guidance 2-6; the teacher is sampled at 4), no target network, AdamW
# 1e-4. Output: pytorch_lora_weights.safetensors for `pipe.load_lora_weights` with LCMScheduler.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-lcm-lora}
LDM=${LDM:-$(dirname "$OUT")/fashion-mnist-ldm}
if [ ! -f "$LDM/model_index.json" ]; then
  OUT="$LDM" bash "$(dirname "$0")/fashion-mnist-ldm.sh"
fi
launch training/train_consistency.py --mode lcd --lcd_student lora --teacher_model_name_or_path "$LDM" \
  --dataset_name fashion_mnist --caption_template "a {}" --resolution 32 --output_dir "$OUT" \
  --lora_rank 16 --num_scales 50 --w_min 1 --w_max 5 --loss_type l2 --train_batch_size 64 --max_train_steps 1000 \
  --learning_rate 1e-4 --optimizer adamw --lr_warmup_steps 50 --ema_decay 0 --seed 0 --checkpointing_steps 100 \
  --checkpoints_total_limit 2 --num_validation_images 10 --validation_prompts "a t-shirt/top" "a trouser" \
  "a pullover" "a dress" "a coat" "a sandal" "a shirt" "a sneaker" "a bag" "a ankle boot" \
  --resume_from_checkpoint latest
