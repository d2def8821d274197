"""Reference images (Fashion-MNIST IDX files, image folders, datasets) and their cached Inception statistics."""

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import image_mode, read_fashion_mnist, resize_center_crop
from .metrics import InceptionFeatureExtractor, extract_features, statistics_from_features

logger = logging.getLogger(__name__)

FASHION_MNIST_REFERENCES = {"fashion-mnist-train": "train", "fashion-mnist-test": "t10k"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.environ.get("CM_DIFFUSERS_FID_CACHE", ".fid_cache")

# ----------------------------------------------------------------------------------------------------------------
# Reference images


def _pil_to_uint8(image, resolution: Optional[int]) -> np.ndarray:
    image = image.convert(image_mode(image))
    if resolution is not None:
        image = resize_center_crop(image, resolution)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@dataclass
class ReferenceImages:
    """A reference image source: `source` identifies it in caches; `load(indices)` returns uint8 (n, C, H, W)."""

    source: str
    size: int
    load: Callable[[np.ndarray], np.ndarray]


def reference_images(reference, resolution: Optional[int] = None, image_column: Optional[str] = None):
    """Resolve `reference` into [`ReferenceImages`].

    `reference` is `"fashion-mnist-train"` / `"fashion-mnist-test"` (the IDX files), a folder of images (searched
    recursively), a folder written by `datasets.Dataset.save_to_disk`, or a `datasets.Dataset` with an image
    column. Images are converted to uint8 and, when `resolution` is given, resized like the training data.
    """
    import datasets
    from PIL import Image

    suffix = f":res={resolution}" if resolution is not None else ""
    if isinstance(reference, str) and reference in FASHION_MNIST_REFERENCES:
        pixels = read_fashion_mnist(FASHION_MNIST_REFERENCES[reference])

        def load_fashion(indices):
            if resolution in (None, 28):
                return pixels[indices][:, None]
            return np.stack([_pil_to_uint8(Image.fromarray(pixels[i]), resolution) for i in indices])

        return ReferenceImages(f"{reference}{suffix}", len(pixels), load_fashion)
    if isinstance(reference, (str, os.PathLike)) and os.path.isdir(reference):
        if os.path.isfile(os.path.join(reference, "dataset_info.json")) or os.path.isfile(
            os.path.join(reference, "state.json")
        ):
            return reference_images(datasets.load_from_disk(str(reference)), resolution, image_column)
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(reference)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(f"The reference folder {reference} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        listing = hashlib.sha1(
            "\n".join(f"{os.path.relpath(f, reference)}:{os.path.getsize(f)}" for f in files).encode()
        )

        def load_files(indices):
            images = []
            for i in indices:
                with Image.open(files[i]) as image:
                    images.append(_pil_to_uint8(image, resolution))
            return _stack_same_size(images, reference)

        source = f"folder:{os.path.abspath(reference)}:{listing.hexdigest()[:12]}{suffix}"
        return ReferenceImages(source, len(files), load_files)
    if isinstance(reference, datasets.Dataset):
        column = image_column or next(
            (name for name, feature in reference.features.items() if isinstance(feature, datasets.Image)), None
        )
        if column is None or column not in reference.column_names:
            raise ValueError(
                f"Could not find an image column in the dataset (columns: {reference.column_names}); pass "
                "image_column=..."
            )

        def load_dataset_rows(indices):
            rows = reference.select(indices.tolist())[column]
            return _stack_same_size([_pil_to_uint8(image, resolution) for image in rows], "the dataset")

        source = f"dataset:{reference._fingerprint}:{column}{suffix}"
        return ReferenceImages(source, len(reference), load_dataset_rows)
    raise ValueError(
        f"Unknown reference {reference!r}: use fashion-mnist-train, fashion-mnist-test, a folder of images, a "
        "folder saved with datasets' save_to_disk, a datasets.Dataset, or a statistics .npz written by this module."
    )


def _stack_same_size(images: list, where: str) -> np.ndarray:
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"Images in {where} differ in size/channels ({sorted(shapes)}); pass a resolution.")
    return np.stack(images)


# ----------------------------------------------------------------------------------------------------------------
# Cached reference statistics


@dataclass
class ReferenceStatistics:
    """Inception statistics of a reference set: mu, sigma, count, the features (for KID) and their provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray
    extractor_id: str
    source: str

    def save(self, path: str):
        """Writes the statistics as an .npz (mu, sigma, count, features, extractor_id, source, version)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.npz"  # write then rename, so an interrupted run never leaves a truncated cache
        np.savez(
            tmp,
            mu=self.mu,
            sigma=self.sigma,
            count=np.int64(self.count),
            features=self.features.astype(np.float32),
            extractor_id=np.str_(self.extractor_id),
            source=np.str_(self.source),
            version=np.int64(CACHE_VERSION),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, extractor_id: Optional[str] = None, source: Optional[str] = None):
        """Reads an .npz written by `save`; raises ValueError when it was made by another extractor or source."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "count", "features", "extractor_id", "source", "version"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{path} is not a cm_diffusers reference-statistics file (missing {sorted(missing)}); statistics "
                    "from other FID tools use other Inception ports and are not comparable. Recompute them from "
                    "the images."
                )
            stats = cls(
                data["mu"],
                data["sigma"],
                int(data["count"]),
                data["features"].astype(np.float64),
                str(data["extractor_id"]),
                str(data["source"]),
            )
            version = int(data["version"])
        if version != CACHE_VERSION:
            raise ValueError(f"{path} has cache format {version}, this version reads {CACHE_VERSION}; recompute it.")
        if extractor_id is not None and stats.extractor_id != extractor_id:
            raise ValueError(
                f"{path} is stale: computed with {stats.extractor_id}, but the feature extractor is {extractor_id}. "
                "Delete it to recompute."
            )
        if source is not None and stats.source != source:
            raise ValueError(f"{path} holds statistics of {stats.source!r}, not of {source!r}.")
        return stats


def subset_indices(size: int, count: int, seed: int = 0) -> np.ndarray:
    """The sorted indices of a fixed random subset, so the same request always describes the same images."""
    return np.sort(np.random.default_rng(seed).permutation(size)[:count])


def reference_statistics(
    reference,
    extractor: InceptionFeatureExtractor,
    num_samples: Optional[int] = None,
    resolution: Optional[int] = None,
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
    batch_size: int = 250,
    image_column: Optional[str] = None,
    progress: bool = True,
) -> ReferenceStatistics:
    """Statistics of `num_samples` reference images (all when None; a fixed random subset otherwise).

    Computed once and cached in `cache_dir` (None: no cache); a cache entry made by another extractor, or of other
    images, is detected and recomputed. A path to an .npz of this module is loaded directly (and must match the
    extractor).
    """
    if isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".npz"):
        return ReferenceStatistics.load(str(reference), extractor_id=extractor.identity)
    images = reference_images(reference, resolution, image_column)
    count = images.size if num_samples is None else min(num_samples, images.size)
    if num_samples is not None and num_samples > images.size:
        logger.warning(f"The reference has only {images.size} images; using all of them instead of {num_samples}.")
    source = f"{images.source}:n={count}"
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{source}|{extractor.identity}".encode()).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in images.source.split(":")[0])
        path = os.path.join(cache_dir, f"{name}-n{count}-{key}.npz")
        if os.path.isfile(path):
            try:
                return ReferenceStatistics.load(path, extractor_id=extractor.identity, source=source)
            except ValueError as err:
                logger.warning(f"Recomputing reference statistics: {err}")
    logger.warning(
        f"Computing the Inception statistics of {count} reference images ({images.source.split(':')[0]}) once; "
        f"{_duration_estimate(count, extractor.device)}. They are cached"
        + (f" in {cache_dir}." if cache_dir is not None else " nowhere (cache_dir=None).")
    )
    indices = subset_indices(images.size, count)
    batches = (images.load(indices[i : i + batch_size]) for i in range(0, count, batch_size))
    batches = tqdm(batches, total=math.ceil(count / batch_size), desc="reference features", disable=not progress)
    features = extract_features(batches, extractor, progress=False)
    mu, sigma, n = statistics_from_features(features)
    stats = ReferenceStatistics(mu, sigma, n, features, extractor.identity, source)
    if path is not None:
        stats.save(path)
    return stats


def _duration_estimate(count: int, device) -> str:
    """About how long Inception features of `count` images take: ~0.17 s per image on 2 CPU cores (measured)."""
    if torch.device(device).type != "cpu":
        return "a GPU takes seconds to minutes"
    seconds = count * 0.17 * 2 / max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    duration = f"{seconds:.0f} s" if seconds < 90 else f"{round(seconds / 60)} min"
    return f"on this CPU that takes about {duration}"


