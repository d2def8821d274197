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


def layout_hub_cache(folder, repo_id: str, cache_dir, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """Copy a saved pipeline folder into the Hugging Face cache layout (`models--org--name/snapshots/<rev>/` with
    `refs/main`), so `from_pretrained(repo_id, cache_dir=...)` resolves it offline exactly as after a download."""
    import os
    import shutil

    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(repo_dir, "snapshots", revision))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(revision)
    return repo_dir
