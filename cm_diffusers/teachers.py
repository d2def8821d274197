"""Diffusion checkpoints as denoisers D(x, sigma) in EDM sigma space (the k-diffusion idea), for distillation.

A teacher is called as `teacher(x, sigma, class_labels=None) -> denoised`, where x = x0 + sigma * noise and sigma
is a float or a (B,) tensor. Two adapters share one small base:

- [`DDPMDenoiser`]: a UNet2DModel trained on DDPM's discrete timesteps (DDPMScheduler / DDIMScheduler-style config,
  the format of google/ddpm-cifar10-32). Level t has sigma_t = sqrt((1 - alphabar_t) / alphabar_t); the network
  sees x / sqrt(1 + sigma^2) (= x_t) at the fractional timestep found by interpolating ln sigma between levels, and
  its epsilon, v or x0 prediction is turned into D(x, sigma).
- [`EDMDenoiser`]: a UNet2DModel with EDM preconditioning, read from diffusers' EDMEulerScheduler /
  EDMDPMSolverMultistepScheduler config; the scheduler's own precondition_inputs / _noise / _outputs compute D.
  Networks trained with the consistency models' time input t = 250 ln sigma (`train_diffusion.py --edm_time_input
  consistency`) name `ConsistencyTimeEDMEulerScheduler` (cm_diffusers/edm_teacher_pipeline.py); a consistency
  student initialised from their weights starts at D (up to the boundary-condition terms).

[`load_teacher`] reads a folder or a Hub repo id (offline from the cache) and picks the adapter.
"""

import inspect
import json
import os
from typing import Optional

import torch

from .networks import unet_forward
from .parameterization import append_dims

DISCRETE_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)  # fmt: skip
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "ConsistencyTimeEDMEulerScheduler")
SUPPORTED = (
    "pixel-space UNet2DModel checkpoints with a DDPM/DDIM-style scheduler config (epsilon, v_prediction or sample "
    "prediction, any beta schedule) or an EDM scheduler config (EDMEulerScheduler, EDMDPMSolverMultistepScheduler)"
)


EDM_TEACHER_PIPELINE_FILE = "pipeline_edm_teacher.py"


def __getattr__(name):
    # the scheduler lives in a file that depends on diffusers, imported on first use
    if name == "ConsistencyTimeEDMEulerScheduler":
        from .edm_teacher_pipeline import ConsistencyTimeEDMEulerScheduler

        return ConsistencyTimeEDMEulerScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_edm_teacher_pipeline_files(folder: str):
    """Makes a folder with unet/ and a ConsistencyTimeEDMEulerScheduler scheduler/ a pipeline that plain diffusers
    samples correctly, through custom code it refuses to run without `trust_remote_code=True`:
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` gives an `EDMTeacherPipeline`.

    Without this, diffusers' EDMEulerScheduler would read the scheduler config (ignoring c_noise_scale with only a
    warning) and feed the network 0.25 ln sigma instead of the 250 ln sigma it was trained on: garbage samples.
    """
    import shutil

    import diffusers

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edm_teacher_pipeline.py")
    module = EDM_TEACHER_PIPELINE_FILE[: -len(".py")]
    shutil.copyfile(source, os.path.join(folder, EDM_TEACHER_PIPELINE_FILE))  # the pipeline class
    shutil.copyfile(source, os.path.join(folder, "scheduler", EDM_TEACHER_PIPELINE_FILE))  # the scheduler component
    index = {
        "_class_name": [module, "EDMTeacherPipeline"],
        "_diffusers_version": diffusers.__version__,
        "scheduler": [module, "ConsistencyTimeEDMEulerScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


class Denoiser(torch.nn.Module):
    """Shared base: holds the UNet and the scheduler config; subclasses implement `denoise(x, sigma, class_labels)`."""

    kind = None

    def __init__(self, unet, scheduler_config: dict, sigma_min: float, sigma_max: float, prediction_type: str):
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prediction_type = prediction_type

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x, sigma): the denoised estimate of x0 from x = x0 + sigma * noise, in x's dtype."""
        compute_dtype = torch.promote_types(x.dtype, torch.float32)  # scalings in fp32 even for half inputs
        sigma = torch.as_tensor(sigma, dtype=compute_dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.numel() != x.shape[0]:
            raise ValueError(f"sigma must be a float or one value per sample ({x.shape[0]}), got {sigma.numel()}.")
        return self.denoise(x.to(compute_dtype), sigma, class_labels).to(x.dtype)

    def _unet(self, model_input, timestep, class_labels):
        return unet_forward(self.unet, dtype=self.unet.dtype)(model_input, timestep, class_labels)

    def extra_repr(self) -> str:
        sigma_range = f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}]"
        return f"kind={self.kind}, prediction_type={self.prediction_type}, sigma in {sigma_range}"


class DDPMDenoiser(Denoiser):
    """A discrete-time DDPM network as D(x, sigma) (k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser).

    x_t = sqrt(alphabar) (x0 + sigma noise) with sigma = sqrt((1 - alphabar) / alphabar): the network sees c_in x at
    the fractional timestep of sigma, and one hook per prediction type turns its output into x0 (`DDPMEpsDenoiser`,
    `DDPMVDenoiser`, `DDPMSampleDenoiser`); `DDPMDenoiser(unet, config)` builds the one the config names.

    Args:
        unet: a UNet2DModel trained on timesteps 0..T-1.
        scheduler_config (`dict`): the checkpoint's scheduler config; diffusers' DDPMScheduler rebuilds its
            alphas_cumprod (linear, scaled_linear, squaredcos_cap_v2, sigmoid or trained betas).
    """

    kind = "ddpm"

    def __new__(cls, unet=None, scheduler_config=None):
        if cls is DDPMDenoiser:  # pick the adapter of the config's prediction type
            prediction_type = dict(scheduler_config or {}).get("prediction_type", "epsilon")
            if prediction_type not in DDPM_ADAPTERS:
                raise ValueError(
                    f"Unsupported prediction_type {prediction_type!r}; DDPM teachers predict epsilon, v_prediction "
                    f"or sample. Supported: {SUPPORTED}."
                )
            cls = DDPM_ADAPTERS[prediction_type]
        return super().__new__(cls)

    def __init__(self, unet, scheduler_config: dict):
        from diffusers import DDPMScheduler

        config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("Zero-terminal-SNR schedules (rescale_betas_zero_snr) have sigma_max = inf: unsupported.")
        known = inspect.signature(DDPMScheduler.__init__).parameters  # DDIM/PNDM/... configs add keys DDPM lacks
        ddpm = DDPMScheduler.from_config({k: v for k, v in config.items() if k in known})
        alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # ascending in t
        super().__init__(unet, scheduler_config, sigmas[0].item(), sigmas[-1].item(), self.prediction_type)
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self._log_sigmas_on = {}

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep of sigma: ln sigma interpolated linearly between the discrete levels (clamped)."""
        log_sigmas = self._log_sigmas_on.get(sigma.device)
        if log_sigmas is None:
            log_sigmas = self._log_sigmas_on.setdefault(sigma.device, self.log_sigmas.to(sigma.device))
        log_sigma = sigma.to(log_sigmas.dtype).log()
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
        return (low + w).to(torch.float32)

    def denoise(self, x, sigma, class_labels=None):
        sigma_b = append_dims(sigma, x.ndim)
        c_in = 1 / (sigma_b**2 + 1) ** 0.5  # = sqrt(alphabar)
        model_output = self._unet(c_in * x, self.sigma_to_timestep(sigma), class_labels).to(x.dtype)
        return self.output_to_denoised(x, sigma_b, c_in, model_output)

    def output_to_denoised(self, x, sigma, c_in, model_output):
        """The hook: x0 from the network's output (sigma and c_in = sqrt(alphabar) broadcast like x)."""
        raise NotImplementedError


class DDPMEpsDenoiser(DDPMDenoiser):
    """epsilon prediction: x0 = x - sigma eps."""

    prediction_type = "epsilon"

    def output_to_denoised(self, x, sigma, c_in, model_output):
        return x - sigma * model_output


class DDPMVDenoiser(DDPMDenoiser):
    """v prediction: x0 = sqrt(alphabar) x_t - sqrt(1 - alphabar) v, with x_t = c_in x."""

    prediction_type = "v_prediction"

    def output_to_denoised(self, x, sigma, c_in, model_output):
        return c_in**2 * x - sigma * c_in * model_output


class DDPMSampleDenoiser(DDPMDenoiser):
    """x0 prediction: the output is the denoised sample."""

    prediction_type = "sample"

    def output_to_denoised(self, x, sigma, c_in, model_output):
        return model_output


DDPM_ADAPTERS = {adapter.prediction_type: adapter for adapter in (DDPMEpsDenoiser, DDPMVDenoiser, DDPMSampleDenoiser)}


class EDMDenoiser(Denoiser):
    """An EDM-preconditioned network as D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022).

    The scalings are those of diffusers' EDM schedulers (c_noise = 0.25 ln sigma; c_out's sign flips for
    `v_prediction`), computed by the scheduler built from the config. A config key `c_noise_scale` (not a diffusers
    key) multiplies c_noise: 1000 for networks trained with OpenAI's t = 250 ln sigma (consistency_models' EDM
    teachers).
    """

    kind = "edm"

    def __init__(self, unet, scheduler_config: dict):
        import diffusers

        config = dict(scheduler_config)
        class_name = config.get("_class_name", "EDMEulerScheduler")
        if class_name not in EDM_SCHEDULERS:
            raise ValueError(f"EDMDenoiser needs one of {EDM_SCHEDULERS}, got {class_name}. Supported: {SUPPORTED}.")
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unsupported EDM prediction_type {prediction_type!r}; EDM schedulers know epsilon and "
                             "v_prediction.")  # fmt: skip
        self.c_noise_scale = float(config.get("c_noise_scale", 1.0))
        scheduler_kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "c_noise_scale"}
        if class_name == "ConsistencyTimeEDMEulerScheduler":  # its precondition_noise applies the scale itself
            from .edm_teacher_pipeline import ConsistencyTimeEDMEulerScheduler as scheduler_class

            self.c_noise_scale = 1.0
            scheduler_kwargs["c_noise_scale"] = config.get("c_noise_scale", 1000.0)
        else:
            scheduler_class = getattr(diffusers, class_name)
        scheduler = scheduler_class.from_config(scheduler_kwargs)
        super().__init__(unet, config, scheduler.config.sigma_min, scheduler.config.sigma_max, prediction_type)
        self.scheduler = scheduler

    def denoise(self, x, sigma, class_labels=None):
        sigma_b = append_dims(sigma, x.ndim)
        model_input = self.scheduler.precondition_inputs(x, sigma_b)
        c_noise = self.scheduler.precondition_noise(sigma) * self.c_noise_scale
        model_output = self._unet(model_input, c_noise, class_labels).to(x.dtype)
        return self.scheduler.precondition_outputs(x, model_output, sigma_b)


# ----------------------------------------------------------------------------------------------------------------


def _resolve_folder(name_or_path: str, cache_dir: Optional[str]) -> str:
    """A local folder as is; a repo id through the Hugging Face cache (works offline once downloaded)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path, cache_dir=cache_dir, allow_patterns=["*.json", "unet/*", "scheduler/*", "*.md"]
        )
    except Exception as err:  # offline misses, unknown repos, bad ids: one clear message
        raise OSError(
            f"Could not find a teacher at {name_or_path!r}: not a local folder, and the Hub repo could not be "
            f"resolved ({type(err).__name__}: {err}). Pass a folder, or download the repo into the cache first."
        ) from err


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_teacher(name_or_path: str, torch_dtype=None, device=None, cache_dir: Optional[str] = None) -> Denoiser:
    """
    Loads a diffusion checkpoint as a denoiser D(x, sigma, class_labels=None) in EDM sigma space.

    Args:
        name_or_path (`str`): a diffusers folder (`unet/` and `scheduler/`, usually with `model_index.json`), a
            Hub repo id, resolved through the Hugging Face cache (`HF_HUB_OFFLINE=1` works once cached), or a
            shipped short name (`"fashion-mnist-ddpm"`).
        torch_dtype (`torch.dtype`, *optional*): dtype of the UNet's weights (e.g. `torch.float16` on GPU).
        device (*optional*): where to put the UNet.
        cache_dir (`str`, *optional*): the Hugging Face cache to resolve repo ids in.

    Returns:
        [`DDPMDenoiser`] or [`EDMDenoiser`], with `.unet`, `.kind`, `.prediction_type`, `.sigma_min`, `.sigma_max`
        (the teacher's own noise range) and `.scheduler_config`.
    """
    from diffusers import UNet2DModel

    from .shipped_models import resolve_pretrained

    folder = _resolve_folder(resolve_pretrained(name_or_path), cache_dir)
    index = _read_json(os.path.join(folder, "model_index.json")) or {}
    components = {k for k, v in index.items() if not k.startswith("_") and v is not None and v[0] is not None}
    if {"vae", "vqvae"} & components or os.path.isdir(os.path.join(folder, "vae")):
        raise ValueError(f"{name_or_path} is a latent diffusion model (it has a VAE); supported: {SUPPORTED}.")
    if {"text_encoder", "tokenizer"} & components:
        raise ValueError(f"{name_or_path} is text-conditional; supported: {SUPPORTED}.")
    unet_config = _read_json(os.path.join(folder, "unet", "config.json"))
    if unet_config is None:
        raise ValueError(f"{name_or_path} has no unet/config.json; supported: {SUPPORTED}.")
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(
            f"{name_or_path} has a {unet_config['_class_name']} (text- or image-conditional); supported: {SUPPORTED}."
        )
    scheduler_config = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    if scheduler_config is None:
        raise ValueError(
            f"{name_or_path} has no scheduler/scheduler_config.json, so its noise schedule is unknown; supported: "
            f"{SUPPORTED}."
        )
    scheduler_class = scheduler_config.get("_class_name")
    if scheduler_class in EDM_SCHEDULERS:
        adapter = EDMDenoiser
    elif scheduler_class in DISCRETE_SCHEDULERS:
        adapter = DDPMDenoiser
    else:
        is_cm = scheduler_class == "CMStochasticIterativeScheduler"
        hint = " It is a consistency model already, not a diffusion teacher." if is_cm else ""
        raise ValueError(f"{name_or_path} has a {scheduler_class} scheduler.{hint} Supported: {SUPPORTED}.")

    # the dtype at loading, as diffusers asks (a later `.to(dtype)` warns about modules kept in float32)
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype)
    teacher = adapter(unet.eval().requires_grad_(False), scheduler_config)
    return teacher.to(device) if device is not None else teacher
