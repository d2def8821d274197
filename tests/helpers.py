"""Tiny real diffusers models built in code, so tests need no downloads."""

import torch
from diffusers import UNet2DModel


def make_tiny_unet(sample_size=16, in_channels=1, num_class_embeds=None, seed=0, dropout=0.0) -> UNet2DModel:
    """A 2-level UNet2DModel with one attention level (~180k parameters); seeded, so calls repeat exactly."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
        dropout=dropout,
    ).eval()
