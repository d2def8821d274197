"""Zero-shot editing with consistency models (Song et al. 2023, Algorithm 4).

One algorithm serves every task: a reference image y, an invertible linear map A with its inverse, and a mask Omega
in A's output space (1 = free to generate, 0 = kept from y). After every consistency step the sample is projected
back onto the set of images that agree with y on the kept coefficients:

    x <- A^-1[(A y) * (1 - Omega) + (A x) * Omega]

Inpainting uses A = identity, colorization a per-pixel orthogonal basis whose first vector is the luma direction,
super-resolution a per-patch orthogonal basis whose first vector is the patch mean; stroke-guided editing (SDEdit)
keeps nothing (Omega = 1) but starts from the whole reference noised to an intermediate level; interpolation is the
special case y = 0, Omega = 1 with given noise. The loop itself is `cm_diffusers.sampling.consistency_sample`
(Algorithm 1 with a projection after each step); `pipeline_editing.ConsistencyEditingMixin` puts each task on
`ConsistencyPipeline` as one call.
"""

import warnings
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from .parameterization import SIGMA_MIN
from .sampling import consistency_sample
from .validation import validate_sigmas

LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Stroke-guided editing levels of the paper's LSUN Bedroom experiments (sigma_max = 80); other models scale them.
STROKE_SIGMAS = (5.38, 2.24)
STROKE_REFERENCE_SIGMA_MAX = 80.0
DEFAULT_EDIT_STEPS = 10

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Linear transforms A: forward(x) = A x, inverse(x) = A^-1 x, both on (B, C, H, W) tensors


def orthogonal_basis(first_column) -> torch.Tensor:
    """An orthogonal n x n matrix (float64) whose first column is `first_column / ||first_column||` (QR of [v, I])."""
    v = torch.as_tensor(first_column, dtype=torch.float64).flatten()
    if v.numel() == 0 or not torch.isfinite(v).all() or v.norm() == 0:
        raise ValueError(f"The first basis vector must be finite and non-zero, got {v.tolist()}.")
    matrix = torch.eye(v.numel(), dtype=torch.float64)
    matrix[:, 0] = v / v.norm()
    # Householder QR always returns an orthogonal Q, with Q[:, 0] = +-v/||v|| since R[0, 0] = +-1.
    q, _ = torch.linalg.qr(matrix)
    return -q if torch.dot(q[:, 0], v) < 0 else q


class IdentityTransform:
    """A = I: the mask is drawn in pixel space (inpainting, stroke-guided editing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ColorizationTransform:
    """Per pixel, the coefficients of the RGB vector in an orthogonal basis Q whose first vector is the luma direction.

    Coefficient 0 is proportional to the luma 0.2989 R + 0.5870 G + 0.1140 B; `mask_like` frees the other two.
    """

    def __init__(self, luma_weights: Sequence[float] = LUMA_WEIGHTS):
        self.Q = orthogonal_basis(luma_weights).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, "ColorizationTransform")
        if x.shape[1] != self.Q.shape[0]:
            raise ValueError(f"ColorizationTransform needs {self.Q.shape[0]} channels, got a tensor of shape "
                             f"{tuple(x.shape)}.")
        return torch.einsum("bchw,cd->bdhw", x, self.Q.to(x))

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bdhw,cd->bchw", x, self.Q.to(x))

    def mask_like(self, x: torch.Tensor) -> torch.Tensor:
        """Omega for colorization: 0 on the luma coefficient (kept), 1 on the two chroma coefficients."""
        mask = torch.ones(1, x.shape[1], 1, 1, device=x.device, dtype=x.dtype)
        mask[:, 0] = 0
        return mask


class SuperResolutionTransform:
    """Per p x p patch, the coefficients of its p^2 pixels in an orthogonal basis whose first vector is constant.

    Coefficient 0 is p times the patch mean. The output keeps the (B, C, H, W) layout: the coefficients of a patch
    fill that patch in row-major order, so coefficient 0 sits at the patch's top-left pixel.
    """

    def __init__(self, patch_size: int):
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
            raise ValueError(f"`patch_size` must be a positive integer, got {patch_size!r}.")
        self.patch_size = int(patch_size)
        self.Q = orthogonal_basis(torch.ones(self.patch_size**2)).float()

    def _check(self, x: torch.Tensor):
        _check_4d(x, "SuperResolutionTransform")
        p = self.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"The patch size {p} must divide the image height and width, got a tensor of shape {tuple(x.shape)}."
            )

    def _apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        self._check(x)
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // p, w // p, p * p)
        coeffs = patches @ matrix.to(x)
        return coeffs.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.Q)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.Q.T)

    def mask_like(self, x: torch.Tensor) -> torch.Tensor:
        """Omega for super-resolution: 0 on each patch's mean coefficient (kept), 1 elsewhere."""
        self._check(x)
        mask = torch.ones(1, 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        mask[..., :: self.patch_size, :: self.patch_size] = 0
        return mask


class LinearTransform:
    """Any invertible linear map, given as a square matrix or as a pair of callables (forward, inverse).

    A matrix of size C x C acts on the channels of every pixel; one of size (C H W) x (C H W) acts on the flattened
    sample. The matrix is inverted once, in float64, and applied in float64. Callables must map (B, C, H, W)
    tensors to tensors of any shape that `inverse` maps back; `consistency_edit` checks the round trip.
    """

    def __init__(self, matrix=None, forward: Callable | None = None, inverse: Callable | None = None):
        if (matrix is None) == (forward is None and inverse is None):
            raise ValueError("Pass either `matrix` or both `forward` and `inverse` to LinearTransform.")
        if matrix is None:
            if forward is None or inverse is None or not callable(forward) or not callable(inverse):
                raise ValueError("LinearTransform needs both `forward` and `inverse` as callables.")
            self.matrix = self.matrix_inverse = None
            self._forward, self._inverse = forward, inverse
            return
        matrix = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
        matrix = matrix.to(torch.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(f"LinearTransform needs a square matrix, got shape {tuple(matrix.shape)}.")
        if not torch.isfinite(matrix).all():
            raise ValueError("LinearTransform's matrix has NaN or infinite entries.")
        if torch.linalg.matrix_rank(matrix) < matrix.shape[0]:
            raise ValueError(
                f"LinearTransform's {matrix.shape[0]}x{matrix.shape[0]} matrix is singular (rank "
                f"{int(torch.linalg.matrix_rank(matrix))}); Algorithm 4 needs an invertible map."
            )
        self.matrix, self.matrix_inverse = matrix, torch.linalg.inv(matrix)
        self._forward = self._inverse = None

    def _apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        _check_4d(x, "LinearTransform")
        n = matrix.shape[0]
        b, c, h, w = x.shape
        if n == c:
            out = torch.einsum("dc,bchw->bdhw", matrix.to(x.device), x.double())
        elif n == c * h * w:
            out = (x.double().reshape(b, n) @ matrix.to(x.device).T).reshape(b, c, h, w)
        else:
            raise ValueError(
                f"LinearTransform's {n}x{n} matrix fits neither the channels ({c}) nor the flattened sample "
                f"({c * h * w} = {c}x{h}x{w}) of a tensor of shape {tuple(x.shape)}."
            )
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x) if self._forward is not None else self._apply(x, self.matrix)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._inverse(x) if self._inverse is not None else self._apply(x, self.matrix_inverse)


def _check_4d(x: torch.Tensor, who: str):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{who} works on (batch, channels, height, width) tensors, got {_describe(x)}.")


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__


# ----------------------------------------------------------------------------------------------------------------
# The algorithm


def slerp(a: torch.Tensor, b: torch.Tensor, alpha) -> torch.Tensor:
    """Spherical interpolation per sample (dim 0 is the batch): sin((1-alpha) theta)/sin(theta) a + sin(alpha theta)/
    sin(theta) b, with theta the angle between a[i] and b[i]; linear where they are (anti)parallel."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"slerp needs two tensors of the same shape (batch, ...), got {_describe(a)} and {_describe(b)}."
        )
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=a.device).flatten()
    cos_theta = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1))
    theta = torch.arccos(cos_theta.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    parallel = sin_theta.abs() < 1e-6
    safe_sin = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    w_a = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / safe_sin)
    w_b = torch.where(parallel, alpha, torch.sin(alpha * theta) / safe_sin)
    out = w_a[:, None] * a64 + w_b[:, None] * b64
    return out.reshape(a.shape).to(a.dtype)


def consistency_edit(
    consistency_fn: ConsistencyFn,
    y: torch.Tensor,
    transform,
    mask,
    sigmas,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sigma_min: float = SIGMA_MIN,
    clip_denoised: bool = True,
    latents: torch.Tensor | None = None,
    start_from_reference: bool = False,
    s_noise: float = 1.0,
    **deprecated,
) -> torch.Tensor:
    """
    Zero-shot editing, Song et al. (2023) Algorithm 4.

    Args:
        consistency_fn (`Callable`): f(x, sigma) -> denoised, called with a (B,) tensor of noise levels.
        y (`torch.Tensor`): Reference images (B, C, H, W) in the model's space [-1, 1].
        transform: Object with `forward(x)` = A x and `inverse(x)` = A^-1 x (e.g. [`IdentityTransform`]).
        mask (`torch.Tensor`, `float` or `None`): Omega in A's output space, broadcastable to `forward(y)`, values
            in [0, 1]; 1 = free to generate, 0 = kept from y. `None` keeps nothing (Omega = 1).
        sigmas (sequence of `float` or `torch.Tensor`): Strictly descending noise levels, each >= `sigma_min`.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Source of all noise.
        sigma_min (`float`): The model's epsilon; re-noising to level s adds noise of std sqrt(s^2 - eps^2).
        clip_denoised (`bool`, defaults to `True`): Clamp f's output to [-1, 1] before each projection (the
            scheduler config's `clip_denoised`; the keyword `clamp` of earlier releases still works, with a warning).
        latents (`torch.Tensor`, *optional*): Standard normal noise of the first step (drawn when omitted).
        start_from_reference (`bool`, defaults to `False`): Start from x = y + sigma_1 z with the whole reference
            instead of A^-1[(A y)(1 - Omega)]: stroke-guided editing (SDEdit) and denoising, where Omega = 1 would
            otherwise discard y.
        s_noise (`float`, defaults to 1.0): Scale of the noise added between steps (the scheduler's `s_noise`).

    Returns:
        `torch.Tensor`: the edited images, projected after the last step (unclamped: the kept coefficients are y's).
    """
    if "clamp" in deprecated:
        warnings.warn("consistency_edit(clamp=...) is deprecated; pass clip_denoised=... (the scheduler's name).",
                      FutureWarning, stacklevel=2)
        clip_denoised = deprecated.pop("clamp")
    if deprecated:
        raise TypeError(f"consistency_edit() got an unexpected keyword argument {next(iter(deprecated))!r}")
    _check_4d(y, "consistency_edit's reference `y`")
    if not (callable(getattr(transform, "forward", None)) and callable(getattr(transform, "inverse", None))):
        raise ValueError(f"`transform` needs `forward` and `inverse` methods, got {type(transform).__name__}.")
    sigmas = validate_sigmas(sigmas, sigma_min).tolist()
    if latents is not None and tuple(latents.shape) != tuple(y.shape):
        raise ValueError(f"`latents` have shape {tuple(latents.shape)}, but `y` has shape {tuple(y.shape)}.")
    _check_invertible(transform, y)

    y_transformed = transform.forward(y)
    mask = _check_transform_mask(mask, y_transformed)
    kept = y_transformed * (1 - mask)

    def project(x: torch.Tensor) -> torch.Tensor:
        return transform.inverse(kept + transform.forward(x) * mask)

    if not start_from_reference:
        # y <- A^-1[(A y) * (1 - Omega)]: only the kept coefficients of the reference enter the first noisy sample
        y = transform.inverse(kept)
    if latents is None:
        latents = randn_tensor(y.shape, generator=generator, device=y.device, dtype=y.dtype)

    def randn(shape):
        return randn_tensor(shape, generator=generator, device=y.device, dtype=y.dtype)

    return consistency_sample(consistency_fn, latents.to(device=y.device, dtype=y.dtype), sigmas, sigma_min,
                              s_noise, clip_denoised, randn=randn, start=y, project=project)


def _check_invertible(transform, y: torch.Tensor):
    """inverse(forward(.)) must give back both y and a random probe: catches singular maps and wrong inverses."""
    probe = randn_tensor(y.shape, generator=torch.Generator("cpu").manual_seed(0), device=y.device, dtype=y.dtype)
    for name, x in (("the reference image", y), ("a random probe", probe)):
        error = (transform.inverse(transform.forward(x)) - x).abs().max().item()
        if not error <= 1e-3 * max(1.0, x.abs().max().item()):
            raise ValueError(
                f"transform.inverse(transform.forward(x)) differs from x by up to {error:.3g} for {name}: the map "
                "must be invertible and `inverse` must be its inverse."
            )


def _check_transform_mask(mask, y_transformed: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones((), device=y_transformed.device, dtype=y_transformed.dtype)
    mask = torch.as_tensor(mask if not isinstance(mask, np.ndarray) else torch.from_numpy(mask))
    mask = mask.to(device=y_transformed.device, dtype=y_transformed.dtype)
    try:
        shape = torch.broadcast_shapes(mask.shape, y_transformed.shape)
    except RuntimeError:
        shape = None
    if shape != y_transformed.shape:
        raise ValueError(
            f"The mask of shape {tuple(mask.shape)} does not broadcast to the transformed image of shape "
            f"{tuple(y_transformed.shape)}; give one value per coefficient (1 = generate, 0 = keep)."
        )
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"Mask values must lie in [0, 1], got [{mask.min().item()}, {mask.max().item()}].")
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Input conversion: PIL, numpy and torch images and masks -> (B, C, H, W) float tensors


def image_to_tensor(image, input_range=(0.0, 1.0)) -> torch.Tensor:
    """
    Images -> (B, C, H, W) float32 in the model's space [-1, 1].

    PIL images (mode L -> 1 channel, any other mode -> RGB) and uint8 arrays are read as 0..255. Float numpy arrays
    (HW, HWC or BHWC) and float torch tensors (HW, CHW or BCHW) are read in `input_range`, (0, 1) by default, the
    range of `output_type="np"` and `"pt"`; pass `input_range=(-1, 1)` for tensors in the model's own space. A list
    of images is stacked into a batch.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("Got an empty list of images.")
        tensors = [image_to_tensor(item, input_range) for item in image]
        if len({tuple(t.shape[1:]) for t in tensors}) > 1:
            raise ValueError(f"The images of a list differ in shape: {[tuple(t.shape[1:]) for t in tensors]}.")
        return torch.cat(tensors)
    lo, hi = _check_range(input_range)
    if isinstance(image, PIL.Image.Image):
        array = np.asarray(image.convert("L" if image.mode in ("1", "L", "LA") else "RGB"))
        return image_to_tensor(array, input_range)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"A numpy image must be HW, HWC or BHWC, got shape {image.shape}.")
        array = image[None, :, :, None] if image.ndim == 2 else (image[None] if image.ndim == 3 else image)
        tensor = torch.from_numpy(np.array(array, copy=True)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"A torch image must be HW, CHW or BCHW, got shape {tuple(image.shape)}.")
        tensor = image.reshape((1,) * (4 - image.ndim) + tuple(image.shape)).detach()
    else:
        raise ValueError(f"Images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}.")
    if tensor.dtype == torch.uint8:
        lo, hi, tensor = 0.0, 255.0, tensor.float()
    elif tensor.dtype == torch.bool or not tensor.dtype.is_floating_point:
        raise ValueError(f"Images must be float or uint8, got dtype {tensor.dtype}.")
    tensor = tensor.float().cpu()
    if not torch.isfinite(tensor).all():
        raise ValueError("The image contains NaN or infinite values; pass finite pixel values.")
    tolerance = 1e-4 * (hi - lo)
    if tensor.min() < lo - tolerance or tensor.max() > hi + tolerance:
        raise ValueError(
            f"Image values span [{tensor.min().item():.4g}, {tensor.max().item():.4g}], outside input_range=({lo}, "
            f"{hi}); pass `input_range=(-1, 1)` for images in the model's space."
        )
    return ((tensor - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)


def mask_to_tensor(mask) -> torch.Tensor:
    """Masks -> (B, C, H, W) float32 in [0, 1]: PIL (mode L, 255 = 1), uint8 or bool arrays, or floats in [0, 1].

    Array layouts follow `image_to_tensor`: numpy HW, HWC or BHWC; torch HW, CHW or BCHW.
    """
    if isinstance(mask, (list, tuple)):
        if not mask:
            raise ValueError("Got an empty list of masks.")
        return torch.cat([mask_to_tensor(item) for item in mask])
    if isinstance(mask, PIL.Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        if mask.ndim not in (2, 3, 4):
            raise ValueError(f"A numpy mask must be HW, HWC or BHWC, got shape {mask.shape}.")
        array = mask[None, :, :, None] if mask.ndim == 2 else (mask[None] if mask.ndim == 3 else mask)
        tensor = torch.from_numpy(np.array(array, copy=True)).permute(0, 3, 1, 2)
    elif isinstance(mask, torch.Tensor):
        if mask.ndim not in (2, 3, 4):
            raise ValueError(f"A torch mask must be HW, CHW or BCHW, got shape {tuple(mask.shape)}.")
        tensor = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)).detach()
    else:
        raise ValueError(f"Masks must be PIL images, numpy arrays or torch tensors, got {type(mask).__name__}.")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255
    elif tensor.dtype == torch.bool:
        tensor = tensor.float()
    elif not tensor.dtype.is_floating_point:
        raise ValueError(f"Masks must be float, uint8 or bool, got dtype {tensor.dtype}.")
    tensor = tensor.float().cpu()
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(
            f"Mask values must lie in [0, 1] (1 = regenerate), got [{tensor.min().item():.4g}, "
            f"{tensor.max().item():.4g}]; uint8 masks and PIL images are read as 0..255."
        )
    return tensor


def _check_range(input_range) -> tuple:
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"`input_range` must be a pair (low, high) such as (0, 1) or (-1, 1), got {input_range!r}."
        ) from None
    if not hi > lo:
        raise ValueError(f"`input_range` must have low < high, got {input_range!r}.")
    return lo, hi


