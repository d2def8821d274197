"""training/train_latent_diffusion.py on tiny sizes: VAE stage then latent diffusion stage, exact resume across the
stage boundary, a StableDiffusionPipeline folder that samples and that --mode lcd takes as its teacher."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import DiffusionPipeline, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_diffusers.latent import load_latent_teacher  # noqa: E402
from training import train_latent_diffusion  # noqa: E402


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory):
    """A class-folder image set (imagefolder labels with class names: 'circle', 'square'), 16 px RGB."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        (folder / label).mkdir()
        for i in range(8):
            pixels = (rng.uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


def train(*flags):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_latent_diffusion.main(train_latent_diffusion.parse_args([str(flag) for flag in flags]))


def flags(data_dir, output_dir):
    return ["--train_data_dir", data_dir, "--caption_template", "a {}", "--output_dir", output_dir,
            "--max_train_steps", 4, "--vae_steps", 2, "--train_batch_size", 4, "--vae_channels", "8,16",
            "--unet_channels", "16,32", "--text_hidden_size", 16, "--max_prompt_length", 12,
            "--checkpointing_steps", 2, "--save_model_steps", 4, "--validation_inference_steps", 2, "--seed", 0,
            "--learning_rate", 1e-3, "--lr_warmup_steps", 0]  # fmt: skip


def test_two_stages_resume_exactly_and_give_an_lcd_teacher(labelled_images, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(*flags(labelled_images, straight)) == 4
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # taken at the VAE -> UNet boundary
    assert train(*flags(labelled_images, resumed), "--resume_from_checkpoint", "latest") == 4

    logs = [[json.loads(line) for line in open(out / "logs" / "train_log.jsonl")] for out in (straight, resumed)]
    assert [entry["stage"] for entry in logs[0] if "step" in entry] == [1, 1, 2, 2]
    for a, b in zip([e for e in logs[0] if "step" in e][2:], [e for e in logs[1] if "step" in e]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for part in ("unet", "vae", "text_encoder"):
        first = load_file(straight / part / "diffusion_pytorch_model.safetensors") if part != "text_encoder" else (
            load_file(straight / part / "model.safetensors"))  # fmt: skip
        second = load_file(resumed / part / next(p.name for p in (straight / part).glob("*.safetensors")))
        for name in first:
            torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6)

    pipe = DiffusionPipeline.from_pretrained(straight)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.vae.config.scaling_factor != 0.18215
    images = pipe(["a circle", "a square"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    teacher = load_latent_teacher(str(straight))
    assert teacher.prediction_type == "epsilon" and teacher.vae_scale_factor == 2
    assert (straight / "samples" / "step_0000004.png").is_file()


def test_resolution_must_be_a_multiple_of_8(labelled_images, tmp_path):
    with pytest.raises(SystemExit):
        train_latent_diffusion.parse_args([str(f) for f in [*flags(labelled_images, tmp_path), "--resolution", 28]])
