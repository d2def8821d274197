"""Models shipped inside the package: short names resolve offline, load with diffusers and with our adapters."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_fashion_mnist
from diffusers import DDPMPipeline
from PIL import Image

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


@requires_fashion_mnist
@pytest.mark.parametrize("name", ["fashion-mnist-cd", "fashion-mnist-ct"])
def test_shipped_consistency_models_sample_garments_in_one_step_and_denoise(name):
    """Offline, by short name: one-step samples whose pixel distribution is Fashion-MNIST's (noise or a blank image
    is far from it), and f(x + sigma z, sigma) much closer to real test images than the noisy input."""
    from cm_diffusers import ConsistencyPipeline
    from cm_diffusers.evaluation import pixel_wasserstein1, read_fashion_mnist
    from cm_diffusers.networks import unet_forward
    from cm_diffusers.parameterization import consistency_function

    pipe = ConsistencyPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    teacher = load_teacher("fashion-mnist-edm")  # both are students of the shipped EDM teacher
    assert pipe.scheduler.config.sigma_min == pytest.approx(teacher.sigma_min)  # its teacher's range
    images = pipe(batch_size=32, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (32, 28, 28, 1)
    real = read_fashion_mnist("test")[:256].astype(np.float32) / 255

    rng = np.random.default_rng(0)
    assert pixel_wasserstein1(images, real) < 0.05
    assert pixel_wasserstein1(rng.uniform(size=images.shape), real) > 0.15
    assert pixel_wasserstein1(np.zeros(images.shape), real) > 0.15

    clean = torch.from_numpy(real[:32]).reshape(32, 1, 28, 28) * 2 - 1
    network = unet_forward(pipe.unet)
    for sigma in (0.5, 1.0):
        noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            denoised = consistency_function(network, noisy, torch.full((32,), sigma), pipe.scheduler.config.sigma_min)
        assert (denoised - clean).pow(2).mean() < 0.4 * (noisy - clean).pow(2).mean()


def test_shipped_edm_teacher_starts_its_students_and_guards_plain_diffusers():
    """fashion-mnist-edm: an EDM teacher with the consistency time input. By short name it denoises; a consistency
    function on its weights is its D up to the boundary terms; plain diffusers needs trust_remote_code to run it."""
    from diffusers import DiffusionPipeline

    from cm_diffusers.networks import unet_forward
    from cm_diffusers.parameterization import consistency_function

    path = resolve_pretrained("fashion-mnist-edm")
    assert os.path.getsize(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")) < 20 * 2**20
    teacher = load_teacher("fashion-mnist-edm")
    assert teacher.kind == "edm" and teacher.scheduler_config["c_noise_scale"] == 1000.0
    torch.manual_seed(0)
    clean = torch.zeros(4, 1, 28, 28) - 1
    clean[:, :, 6:22, 8:20] = 0.8
    noisy = clean + 0.3 * torch.randn_like(clean)
    with torch.no_grad():
        denoised = teacher(noisy, torch.full((4,), 0.3))
        f = consistency_function(unet_forward(teacher.unet), noisy, torch.full((4,), 2.0))
        D = teacher(noisy, torch.full((4,), 2.0))
    assert (denoised - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()
    assert ((f - D).norm() / D.norm()).item() < 0.01
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(path)


def test_shipped_edm_teacher_carries_the_current_pipeline_file():
    """The folder ships copies of edm_teacher_pipeline.py for trust_remote_code: they must equal the source."""
    from pathlib import Path

    from cm_diffusers.shipped_models import PRETRAINED_DIR

    source = (Path(__file__).resolve().parents[1] / "cm_diffusers" / "edm_teacher_pipeline.py").read_text()
    folder = Path(PRETRAINED_DIR) / "fashion-mnist-edm"
    for copy in (folder / "pipeline_edm_teacher.py", folder / "scheduler" / "pipeline_edm_teacher.py"):
        assert copy.read_text() == source, f"{copy} differs from cm_diffusers/edm_teacher_pipeline.py"


def test_model_cards_folder_holds_the_shipped_cards():
    """model_cards/<name>.md are the cards of the shipped models, copied for reading on the repository page: a
    model shipped with a new card must bring its copy along."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "model_cards"
    for name in SHIPPED_MODELS:
        card = (Path(PRETRAINED_DIR) / name / "README.md").read_text()
        assert (folder / f"{name}.md").read_text() == card, f"model_cards/{name}.md is not {name}'s shipped card"


def test_shipped_latent_teacher_and_lcm_lora_load_offline_by_short_name(tmp_path):
    """fashion-mnist-ldm (a StableDiffusionPipeline) and fashion-mnist-lcm-lora (adapters only), by short name:
    both under 20 MB, plain diffusers loads them (load_lora_weights + LCMScheduler), the adapters are what the
    4-step images come from, the same seed gives the same images, and `generate --lora` samples them."""
    pytest.importorskip("peft")
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    from cm_diffusers.cli import main
    from cm_diffusers.latent.text_to_image import generate, load_text_to_image

    sizes = {name: sum(f.stat().st_size for f in Path(resolve_pretrained(name)).rglob("*") if f.is_file())
             for name in ("fashion-mnist-ldm", "fashion-mnist-lcm-lora")}  # fmt: skip
    assert all(size < 20 * 2**20 for size in sizes.values()), sizes
    assert {"fashion-mnist-ldm", "fashion-mnist-lcm-lora"} <= set(available_models())
    prompts = ["a trouser", "a sandal"]
    pipe = load_text_to_image("fashion-mnist-ldm", "fashion-mnist-lcm-lora")
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    images = generate(pipe, prompts, 4, 1.0, seed=0)
    assert images.shape == (2, 32, 32, 1) and np.array_equal(images, generate(pipe, prompts, 4, 1.0, seed=0))
    assert images.std() > 0.1  # not blank
    bare = DiffusionPipeline.from_pretrained(resolve_pretrained("fashion-mnist-ldm"))
    bare.scheduler = LCMScheduler.from_config(bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)
    assert np.abs(generate(bare, prompts, 4, 1.0, seed=0) - images).mean() > 0.01  # the adapters change the images
    out = tmp_path / "samples.png"
    flags = ["generate", "--model", "fashion-mnist-ldm", "--lora", "fashion-mnist-lcm-lora", "--prompt", "a bag",
             "--num_images", "4", "--steps", "4", "--output", str(out)]  # fmt: skip
    assert main(flags) == 0 and Image.open(out).size[0] > 32


def test_shipped_scd_student_samples_alike_in_both_pipelines_by_short_name():
    """fashion-mnist-scd (TrigFlow): by short name in ConsistencyPipeline, and its folder in plain diffusers with the
    pipeline file it carries (an unchanged copy of ours): the same images for the same seed at 1 and 2 steps."""
    from diffusers import DiffusionPipeline

    from cm_diffusers import ConsistencyPipeline

    path = resolve_pretrained("fashion-mnist-scd")
    source = Path(__file__).resolve().parents[1] / "cm_diffusers" / "trigflow_pipeline.py"
    for copy in (Path(path) / "pipeline_trigflow.py", Path(path) / "scheduler" / "pipeline_trigflow.py"):
        assert copy.read_text() == source.read_text(), f"{copy} differs from cm_diffusers/trigflow_pipeline.py"
    ours = ConsistencyPipeline.from_pretrained("fashion-mnist-scd")
    plain = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    assert ours.is_trigflow and ours.scheduler.config.time_input == "log_sigma"
    for pipe in (ours, plain):
        pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        a = ours(batch_size=4, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np").images
        b = plain(batch_size=4, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np").images
        assert a.shape == (4, 28, 28, 1) and a.std() > 0.1
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)  # float32 rounding through the 1.1M-parameter UNet
