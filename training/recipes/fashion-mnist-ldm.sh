#!/bin/bash
# Builds fashion-mnist-ldm (shipped): a small text-to-image latent diffusion teacher on Fashion-MNIST with
# class-name prompts ("a sneaker", "a ankle boot": one template for all ten classes), the teacher of the LCD recipes.
# AutoencoderKL (16,32; 32x32x1 -> 4x16x16 latents) for 400 steps, then a UNet2DConditionModel (32,64;
# cross-attention at 8x8) and a 2-layer CLIP text encoder with the project's byte-level tokenizer for 2,000 more,
# prompts dropped 10% of the time for guidance; AdamW 5e-4, EMA 0.999 of the UNet. Images are upscaled to 32x32:
# diffusers' SD pipelines need a multiple of 8 (FID compares at 28x28 after resizing back).
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/fashion-mnist-ldm}
launch training/train_latent_diffusion.py \
  --dataset_name fashion_mnist --caption_template "a {}" --resolution 32 --output_dir "$OUT" \
  --vae_channels 16,32 --unet_channels 32,64 --text_hidden_size 64 --max_prompt_length 20 \
  --train_batch_size 64 --vae_steps 400 --max_train_steps 2400 --learning_rate 5e-4 --lr_warmup_steps 100 \
  --ema_max_decay 0.999 --seed 0 --checkpointing_steps 100 --checkpoints_total_limit 2 --save_model_steps 200 \
  --validation_inference_steps 25 --validation_guidance_scale 4 --resume_from_checkpoint latest
