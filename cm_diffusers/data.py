"""Image data both training and evaluation read, so the FID reference sees exactly what training sees.

- Fashion-MNIST from its gzipped IDX files (Debian's `dataset-fashion-mnist`: images from byte 16, labels from
  byte 8), read offline.
- `image_mode` and `resize_center_crop`: the colour mode and the square crop every image goes through on its
  way into a model (training batches, FID reference images).
"""

import gzip
import os

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)  # fmt: skip
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def read_idx(path: str, magic: int, offset: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file, after checking its magic number (2051 images, 2049 labels)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Install Fashion-MNIST (`apt-get install dataset-fashion-mnist`, or `make data`) or "
            "point --fashion_mnist_dir at a folder with the IDX .gz files."
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path} is not an IDX file (magic number {int.from_bytes(raw[:4], 'big')} != {magic}).")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


def _fashion_mnist_prefix(split: str) -> str:
    prefix = FASHION_MNIST_SPLITS.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has the splits `train` and `test`, got {split!r}.")
    return prefix


def read_fashion_mnist(split: str = "train", directory: str = FASHION_MNIST_DIR) -> np.ndarray:
    """Fashion-MNIST images as uint8 (N, 28, 28), in the files' (random) order."""
    path = os.path.join(directory, f"{_fashion_mnist_prefix(split)}-images-idx3-ubyte.gz")
    return read_idx(path, magic=2051, offset=16).reshape(-1, 28, 28)


def read_fashion_mnist_labels(split: str = "train", directory: str = FASHION_MNIST_DIR) -> np.ndarray:
    """Fashion-MNIST class indices (N,) in [0, 10), aligned with [`read_fashion_mnist`]."""
    path = os.path.join(directory, f"{_fashion_mnist_prefix(split)}-labels-idx1-ubyte.gz")
    return read_idx(path, magic=2049, offset=8).astype(np.int64)


def image_mode(image: Image.Image) -> str:
    """The mode a model sees an image in: "L" for grayscale sources (1 channel), "RGB" for everything else."""
    return "L" if image.mode in GRAYSCALE_MODES else "RGB"


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """PIL image -> resolution x resolution: bicubic resize of the shorter side, then a centre crop."""
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    scale = resolution / min(width, height)
    width, height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))
