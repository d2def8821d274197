"""Making a diffusers UNet2DModel safe for the forward-mode AD (`torch.func.jvp`) that sCT / sCD training needs.

Two traps, both reported by practitioners of sCM and both met here on CPU:

- fused attention kernels have no forward-AD rule (torch 2.13 on CPU: "Trying to use forward AD with
  _scaled_dot_product_flash_attention_for_cpu that does not support it"; flash/efficient SDPA and xformers on GPU
  alike), and the tangent that diffusers' classic `AttnProcessor` returns is not contiguous, which group norm's
  forward AD then rejects. `JVPAttnProcessor` runs the classic processor with a contiguous output inside
  `forward_ad_attention()` (around the JVP), and, in a network without dropout, the fused one everywhere else (the
  student's forward and backward: 1.4 x faster here than the classic one on the 1.1M-parameter Fashion-MNIST UNet).
  With dropout it stays classic: the fused CPU kernel draws from the RNG, so the student would not see the dropout
  masks of the JVP.
- the time embedding must run in float32 (sCM trains unstably otherwise): under autocast its linear layers would run
  in half precision, so `keep_time_embedding_fp32` runs that module with autocast off.

Neither changes the weights or the saved config: the pipeline folder loads and samples as any other.
"""

import contextlib
import contextvars
import logging

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding

logger = logging.getLogger(__name__)


_IN_JVP = contextvars.ContextVar("cm_diffusers_forward_ad_attention", default=False)


@contextlib.contextmanager
def forward_ad_attention():
    """Within this context `JVPAttnProcessor` computes attention in a form forward-mode AD differentiates."""
    token = _IN_JVP.set(True)
    try:
        yield
    finally:
        _IN_JVP.reset(token)


class JVPAttnProcessor(AttnProcessor):
    """Inside `forward_ad_attention()`: diffusers' classic attention (explicit softmax(QK^T)V, which forward-mode AD
    differentiates) with a contiguous output, hence a contiguous tangent; elsewhere the fused SDPA processor when
    `fused` (for networks without dropout, see the module's docstring), else the classic one too."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = AttnProcessor2_0() if fused else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):  # fmt: skip
        if self.fused is not None and not _IN_JVP.get():
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        output = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return output.clone(memory_format=torch.contiguous_format)


class FP32TimestepEmbedding(TimestepEmbedding):
    """A `TimestepEmbedding` that computes in float32 whatever autocast says (same parameters and state dict)."""

    def forward(self, sample, condition=None):
        with torch.autocast(device_type=sample.device.type, enabled=False):
            return super().forward(sample.float(), None if condition is None else condition.float())


def make_jvp_safe(unet: torch.nn.Module) -> dict:
    """Switches every attention processor of `unet` to `JVPAttnProcessor` and its time embedding to float32.
    Returns {processor class: count} of what was replaced, which the caller logs."""
    replaced = {}
    fused = all(module.p == 0 for module in unet.modules() if isinstance(module, torch.nn.Dropout))
    for module in unet.modules():
        if isinstance(module, Attention) and not isinstance(module.processor, JVPAttnProcessor):
            name = type(module.processor).__name__
            replaced[name] = replaced.get(name, 0) + 1
            module.set_processor(JVPAttnProcessor(fused))
    keep_time_embedding_fp32(unet)
    return replaced


def keep_time_embedding_fp32(unet: torch.nn.Module):
    """Makes the UNet's `time_embedding` (a `TimestepEmbedding`) compute in float32 under autocast."""
    embedding = getattr(unet, "time_embedding", None)
    if type(embedding) is TimestepEmbedding:
        embedding.__class__ = FP32TimestepEmbedding


def check_forward_ad(unet: torch.nn.Module, sample_shape: tuple, class_labels=None):
    """Runs one `torch.func.jvp` through `unet` on a 1-image batch; a RuntimeError naming the failing operation and
    what to do when some layer has no forward-mode AD rule."""
    parameter = next(unet.parameters())
    x = torch.zeros((1, *sample_shape[1:]), device=parameter.device, dtype=parameter.dtype)
    t = torch.ones(1, device=parameter.device)
    labels = None if class_labels is None else class_labels[:1]

    def network(x_in, time):
        return unet(x_in, time, class_labels=labels, return_dict=False)[0]

    try:
        with torch.no_grad(), forward_ad_attention():
            torch.func.jvp(network, (x, t), (torch.ones_like(x), torch.ones_like(t)))
    except (NotImplementedError, RuntimeError) as error:
        raise RuntimeError(
            f"sct/scd differentiate the student with forward-mode AD (torch.func.jvp), which fails in this UNet: "
            f"{str(error).splitlines()[0]} Attention was switched to JVPAttnProcessor already; a layer type without "
            "a forward-AD rule must be replaced (or the architecture changed, e.g. --unet_config)."
        ) from error
