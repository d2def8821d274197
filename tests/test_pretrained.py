"""Models shipped inside the package: short names resolve offline, load with diffusers and with our adapters."""

import os

import pytest
import torch
from diffusers import DDPMPipeline

from cm_diffusers import load_teacher
from cm_diffusers.shipped_models import PRETRAINED_DIR, SHIPPED_MODELS, available_models, resolve_pretrained


def test_shipped_teacher_loads_offline_by_short_name():
    assert "fashion-mnist-ddpm" in available_models()
    path = resolve_pretrained("fashion-mnist-ddpm")
    assert path == os.path.join(PRETRAINED_DIR, "fashion-mnist-ddpm")
    assert os.path.getsize(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")) < 10 * 2**20
    pipe = DDPMPipeline.from_pretrained(path)
    assert (pipe.unet.config.in_channels, pipe.unet.config.sample_size) == (1, 28)
    teacher = load_teacher("fashion-mnist-ddpm")
    assert teacher.kind == "ddpm" and teacher.sigma_min == pytest.approx(0.01, rel=1e-3)
    # A trained eps-model denoises: from a lightly noised image its x0 estimate is closer than the noisy input.
    torch.manual_seed(0)
    clean = torch.zeros(4, 1, 28, 28) - 1  # the dataset's background
    clean[:, :, 6:22, 8:20] = 0.8
    noisy = clean + 0.3 * torch.randn_like(clean)
    with torch.no_grad():
        denoised = teacher(noisy, torch.full((4,), 0.3))
    assert (denoised - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()


def test_every_shipped_card_exists_and_names_a_license():
    for name in available_models():
        card = open(os.path.join(PRETRAINED_DIR, name, "README.md")).read()
        assert card.startswith("---\n") and "license:" in card


def test_missing_shipped_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("cm_diffusers.shipped_models.PRETRAINED_DIR", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="not in this installation"):
        resolve_pretrained("fashion-mnist-cd")
    assert resolve_pretrained("org/name") == "org/name"  # anything else passes through
    assert set(SHIPPED_MODELS) >= {"fashion-mnist-cd", "fashion-mnist-ct", "fashion-mnist-ddpm"}


def test_shipped_consistency_model_samples_offline_in_one_step():
    from cm_diffusers import ConsistencyPipeline

    pipe = ConsistencyPipeline.from_pretrained("fashion-mnist-cd")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_train_timesteps == 18
    assert pipe.scheduler.config.sigma_min == pytest.approx(load_teacher("fashion-mnist-ddpm").sigma_min)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (4, 28, 28, 1) and images.std() > 0.05
