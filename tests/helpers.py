"""Tiny real diffusers models built in code, so tests need no downloads."""

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

# the architecture of make_tiny_unet, as a --unet_config file for the training scripts
TINY_UNET_CONFIG = {
    "_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8,
}  # fmt: skip


def write_blob_images(folder, count: int = 32, size: int = 16):
    """`count` grayscale images of soft blobs of random position, size and brightness (seeded): real PNG files for
    the training scripts' image-folder path."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        cy, cx, radius = rng.uniform(size / 4, 3 * size / 4), rng.uniform(size / 4, 3 * size / 4), rng.uniform(2, 5)
        image = 255 * rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


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
