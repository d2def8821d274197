"""Distances of the consistency losses: (B, ...) x (B, ...) -> (B,), one value per sample, in float32 by the caller.

`l2`, `l1`, iCT's `PseudoHuber` on the per-sample L2 norm, and `LPIPS` (which needs its backbone weights on disk);
`make_distance` picks one by the `--loss_type` name.
"""

import os
from typing import Callable, Optional

import torch

from .parameterization import pseudo_huber_c


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample (the paper's l2 metric)."""
    return _flat(a - b).square().mean(dim=1)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample."""
    return _flat(a - b).abs().mean(dim=1)


class PseudoHuber:
    """iCT's pseudo-Huber distance sqrt(||a - b||_2^2 + c^2) - c on the per-sample L2 norm (not elementwise)."""

    def __init__(self, c: Optional[float] = None):
        self.c = c  # None: iCT's c = 0.00054 sqrt(d), d = values per sample

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = pseudo_huber_c(a[0].numel()) if self.c is None else self.c
        return torch.sqrt(_flat(a - b).square().sum(dim=1) + c**2) - c


# The torchvision ImageNet backbones that `lpips` loads; torchvision would download them, which cannot happen here.
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class LPIPS:
    """LPIPS (Zhang et al. 2018) as the CD/CT paper used it: inputs upsampled to 224 px, gray repeated to RGB."""

    def __init__(self, net: str = "vgg", device=None):
        try:
            import lpips
        except ImportError as err:
            raise ImportError(
                "--loss_type lpips needs the `lpips` package (`pip install lpips`) and the torchvision backbone "
                f"weights {LPIPS_BACKBONE_FILES[net]} in {self.checkpoint_dir()}. Without them use --loss_type "
                "pseudo_huber (the default; iCT shows it matches LPIPS without its bias)."
            ) from err
        weights = os.path.join(self.checkpoint_dir(), LPIPS_BACKBONE_FILES[net])
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"--loss_type lpips needs the torchvision {net} backbone weights at {weights}; they cannot be "
                "downloaded on this machine. Copy the file there (set TORCH_HOME to use another folder) or use "
                "--loss_type pseudo_huber."
            )
        self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False).to(device)

    @staticmethod
    def checkpoint_dir() -> str:
        return os.path.join(torch.hub.get_dir(), "checkpoints")

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        if a.shape[-1] < 224:
            a = torch.nn.functional.interpolate(a, size=224, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=224, mode="bilinear", align_corners=False)
        return self.model.to(a.device)(a, b).reshape(a.shape[0])


def make_distance(loss_type: str, huber_c: Optional[float] = None, device=None) -> Callable:
    """The distance named by `--loss_type`: l2, l1, pseudo_huber (c = 0.00054 sqrt(d) unless given) or lpips."""
    if loss_type == "l2":
        return l2
    if loss_type == "l1":
        return l1
    if loss_type == "pseudo_huber":
        return PseudoHuber(huber_c)
    if loss_type == "lpips":
        return LPIPS(device=device)
    raise ValueError(f"Unknown loss_type {loss_type!r}; choose l2, l1, pseudo_huber or lpips.")
