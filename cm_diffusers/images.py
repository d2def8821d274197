"""Images out: uint8 quantisation as a PNG save does it, and the one grid writer (evaluation previews, training
validation grids, the grids of `generate` and `edit`)."""

import math
from typing import Optional

import numpy as np
import PIL.Image
import torch

from .files import save_image_atomic


def to_uint8_images(images) -> torch.Tensor:
    """Images -> uint8 (N, C, H, W) with C in {1, 3}.

    Accepts tensors or arrays: uint8 in [0, 255], or floats in [0, 1] (what `output_type="pt"` returns), shaped
    (N, C, H, W) or (N, H, W) for grayscale. Floats are rounded exactly as a PNG save would round them.
    """
    images = images if isinstance(images, torch.Tensor) else torch.tensor(np.asarray(images))
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"Expected images of shape (N, C, H, W) with 1 or 3 channels (or (N, H, W)), got {tuple(images.shape)}."
        )
    if images.dtype == torch.uint8:
        return images
    if not images.dtype.is_floating_point:
        raise ValueError(f"Images must be uint8 in [0, 255] or floats in [0, 1], got dtype {images.dtype}.")
    finite = torch.isfinite(images)
    if not bool(finite.all()):  # NaN would pass the range check below and become black pixels: a silent FID
        bad = int((~finite).sum())
        raise ValueError(
            f"{bad} of {images.numel()} pixel values are NaN or infinite: the model produced non-finite samples "
            "(diverged weights, or float16 overflow: try --dtype float32). No FID is computed from them."
        )
    low, high = images.min().item(), images.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"Float images must lie in [0, 1] (got values in [{low:.3f}, {high:.3f}]); map [-1, 1] samples with "
            "(x / 2 + 0.5).clamp(0, 1), or pass uint8 images."
        )
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def image_grid(images, nrow: Optional[int] = None, padding: int = 0) -> PIL.Image.Image:
    """
    Images -> one PIL grid of `nrow` columns (default ceil(sqrt(N))), `padding` white pixels around each image;
    grayscale stays grayscale.

    `images`: torch (N, C, H, W) uint8 or floats in [0, 1] (`output_type="pt"`), numpy (N, H, W, C) floats in
    [0, 1] (`output_type="np"`), or a list of PIL images.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(image) for image in images])
        images = images[..., None] if images.ndim == 3 else images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    images = to_uint8_images(images)
    count, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    ncol = math.ceil(count / nrow)
    grid = torch.full((channels, ncol * (height + padding) + padding, nrow * (width + padding) + padding), 255,
                      dtype=torch.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    array = grid[0].numpy() if channels == 1 else grid.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array, mode="L" if channels == 1 else "RGB")


def save_image_grid(images, path: str, nrow: Optional[int] = None, padding: int = 0) -> PIL.Image.Image:
    """`image_grid` saved as one PNG, atomically; returns the grid."""
    grid = image_grid(images, nrow, padding)
    save_image_atomic(grid, path)
    return grid
