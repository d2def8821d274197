"""Models shipped inside the package (folder `pretrained/`), addressed by short names (`fashion-mnist-cd`, ...)."""

import os

PRETRAINED_DIR = os.path.join(os.path.dirname(__file__), "pretrained")
DEFAULT_MODEL = "fashion-mnist-cd"
SHIPPED_MODELS = {
    "fashion-mnist-cd": "Consistency-distilled from the Fashion-MNIST EDM teacher fashion-mnist-edm (1-2 steps).",
    "fashion-mnist-ct": "Consistency model trained without distillation (ECT from fashion-mnist-edm's weights, data "
    "only; 1-2 steps).",
    "fashion-mnist-ddpm": "The earlier DDPM (epsilon) teacher, in diffusers DDPMPipeline format.",
    "fashion-mnist-edm": "The EDM teacher with the consistency time input (t = 250 ln sigma); diffusers needs "
    "trust_remote_code=True.",
    "fashion-mnist-scd": "Continuous-time consistency distillation (sCD, TrigFlow) of fashion-mnist-edm (1-2 steps; "
    "behind fashion-mnist-cd at this scale); plain diffusers needs trust_remote_code=True.",
    "fashion-mnist-ldm": "A small text-to-image latent diffusion model (StableDiffusionPipeline: VAE, CLIP text "
    "encoder, UNet2DConditionModel) prompted by class names ('a sneaker'); the LCD teacher.",
    "fashion-mnist-lcm-lora": "LCM-LoRA of fashion-mnist-ldm (adapters only): 1-4 steps with LCMScheduler, loaded "
    "onto the teacher with load_lora_weights (generate --model fashion-mnist-ldm --lora fashion-mnist-lcm-lora).",
}
# What marks a shipped folder as present: a pipeline's model_index.json, or an adapter folder's LoRA weights
_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors")


def _present(name: str) -> bool:
    return any(os.path.isfile(os.path.join(PRETRAINED_DIR, name, marker)) for marker in _MARKERS)


def available_models() -> list:
    """Short names of the shipped models present in this installation."""
    return [name for name in SHIPPED_MODELS if _present(name)]


def resolve_pretrained(name_or_path):
    """A shipped model's short name -> its folder; anything else (a path, a Hub repo id) is returned unchanged."""
    if isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path) in SHIPPED_MODELS:
        folder = os.path.join(PRETRAINED_DIR, str(name_or_path))
        if not _present(str(name_or_path)):
            raise FileNotFoundError(
                f"The shipped model {name_or_path!r} is not in this installation ({folder}); available: "
                f"{available_models() or 'none'}. Pass a pipeline folder or a Hub repo id instead."
            )
        return folder
    return name_or_path
