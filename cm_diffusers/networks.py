"""The one adapter between the package's math and a diffusers network.

Everything that evaluates a UNet2DModel (the pipeline's f(x, sigma), the training losses, the teachers' D(x, sigma))
sees it as a raw network F(x_in, t, class_labels=None) -> output; the time input t and the scalings around F come
from `parameterization.py` (or from a teacher adapter's own convention), never from here.
"""

from typing import Callable

import torch


def unet_forward(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> Callable:
    """A diffusers UNet2DModel (or a DDP / compiled wrapper of one) as the raw network F(x_in, t, class_labels=None).

    With `dtype` (the weights' dtype, e.g. float16 for a half-precision pipeline) the input is cast to it and the
    output back to the input's dtype; without it both pass through unchanged (autocast handles mixed precision).
    A text-conditioned UNet2DConditionModel (latent consistency distillation) becomes `latent.LatentUNet`, the raw
    network F(x_t, t, encoder_hidden_states, guidance).
    """
    config = getattr(getattr(unet, "module", unet), "config", None)  # a plain nn.Module (a test oracle) has none
    if getattr(config, "cross_attention_dim", None) is not None:
        from .latent.components import LatentUNet

        return LatentUNet(unet)

    def forward(x_in: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        cond = {"class_labels": class_labels} if class_labels is not None else {}
        if dtype is None:
            return unet(x_in, t, return_dict=False, **cond)[0]
        return unet(x_in.to(dtype), t, return_dict=False, **cond)[0].to(x_in.dtype)

    return forward
