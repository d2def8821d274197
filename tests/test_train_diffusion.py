import json
import os

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import requires_fashion_mnist
from helpers import make_tiny_unet
from safetensors.torch import load_file

from cm_diffusers.training.runtime import default_unet_config
from training.train_diffusion import main, parse_args


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared cores its OpenMP spin-waits cost up to 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_unet_config(tmp_path):
    make_tiny_unet().save_config(tmp_path / "unet_config")
    return str(tmp_path / "unet_config" / "config.json")


def run(output_dir, unet_config, *extra):
    argv = [
        "--output_dir", str(output_dir),
        "--dataset_name", "fashion_mnist",
        "--resolution", "16",
        "--unet_config", unet_config,
        "--num_validation_images", "4",
        "--validation_inference_steps", "2",
        *extra,
    ]  # fmt: skip
    main(parse_args(argv))
    AcceleratorState._reset_state(True)


def tensorboard_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for root, _, files in os.walk(log_dir):
        if any(name.startswith("events.out") for name in files):
            events = EventAccumulator(root)
            events.Reload()
            if tag in events.Tags()["scalars"]:
                values.update({event.step: event.value for event in events.Scalars(tag)})
    return [values[step] for step in sorted(values)]


def test_default_unet_for_fashion_mnist():
    from diffusers import UNet2DModel

    unet = UNet2DModel(**default_unet_config(28, 1))
    assert 1e6 < sum(p.numel() for p in unet.parameters()) < 2e6
    assert unet(torch.zeros(1, 1, 28, 28), 10).sample.shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match="--unet_config"):
        default_unet_config(30, 1)


@requires_fashion_mnist
@pytest.mark.slow
def test_ddpm_loss_falls_and_the_folder_is_a_ddpm_pipeline(tmp_path, tiny_unet_config):
    from diffusers import DDPMPipeline

    out = tmp_path / "ddpm"
    run(
        out, tiny_unet_config,
        "--max_train_samples", "128", "--train_batch_size", "8", "--max_train_steps", "30",
        "--learning_rate", "2e-3", "--lr_warmup_steps", "5", "--use_ema", "--ema_inv_gamma", "0.5",
    )  # fmt: skip
    losses = tensorboard_scalars(out / "logs", "loss")
    assert len(losses) == 30
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:3]) / 3, losses

    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "samples" / "step-0000030.png").is_file()
    assert (out / "checkpoint-30" / "training_state.json").is_file()
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.beta_schedule == "linear"
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 1) and images.min() >= 0 and images.max() <= 1
    # the saved weights are the EMA weights of the last checkpoint
    ema = torch.load(out / "checkpoint-30" / "custom_checkpoint_1.pkl", weights_only=True)  # 0 is the lr schedule
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(saved["conv_in.weight"], ema["shadow_params"][0])


@requires_fashion_mnist
@pytest.mark.slow
def test_edm_loss_falls_and_the_folder_has_the_edm_scheduler(tmp_path, tiny_unet_config):
    from diffusers import EDMEulerScheduler, UNet2DModel

    out = tmp_path / "edm"
    run(
        out, tiny_unet_config, "--model_type", "edm",
        "--max_train_samples", "128", "--train_batch_size", "8", "--max_train_steps", "30",
        "--learning_rate", "2e-3", "--lr_warmup_steps", "5",
    )  # fmt: skip
    losses = tensorboard_scalars(out / "logs", "loss")
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:3]) / 3, losses  # lognormal sigmas make EDM's loss noisy
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-30", "logs", "samples", "scheduler", "unet"]
    scheduler = EDMEulerScheduler.from_pretrained(out, subfolder="scheduler")
    assert (scheduler.config.sigma_data, scheduler.config.sigma_min, scheduler.config.sigma_max) == (0.5, 0.002, 80.0)
    assert UNet2DModel.from_pretrained(out, subfolder="unet").config.sample_size == 16


@requires_fashion_mnist
@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_unet_config):
    # 12 images + mirrored copies in batches of 4, 2 micro-batches per step: 3 steps per epoch; 6 = 2 epochs
    common = [
        "--max_train_samples", "12", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--random_flip", "--use_ema", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
        "--learning_rate", "1e-3", "--checkpointing_steps", "100", "--report_to", "none",
        "--validation_steps", "100", "--save_model_steps", "100", "--prediction_type", "v_prediction",
    ]  # fmt: skip
    run(tmp_path / "straight", tiny_unet_config, *common, "--max_train_steps", "6")
    run(tmp_path / "resumed", tiny_unet_config, *common, "--max_train_steps", "4")
    run(tmp_path / "resumed", tiny_unet_config, *common, "--max_train_steps", "6", "--resume_from_checkpoint=latest")

    straight, resumed = tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6"
    weights_a, weights_b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6)
    ema_a = torch.load(straight / "custom_checkpoint_1.pkl", weights_only=True)
    ema_b = torch.load(resumed / "custom_checkpoint_1.pkl", weights_only=True)
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 6
    for a, b in zip(ema_a["shadow_params"], ema_b["shadow_params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and the weights did move: the comparison is not between two untouched initialisations
    initial = make_tiny_unet().state_dict()
    assert not torch.allclose(weights_a["conv_in.weight"], initial["conv_in.weight"])
