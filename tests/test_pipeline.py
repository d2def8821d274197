"""ConsistencyPipeline: parity with diffusers' ConsistencyModelPipeline, inputs, outputs, save/load round trips."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
)
from helpers import layout_hub_cache, make_tiny_unet
from PIL import Image

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler

FINAL_STEP_TOL = 5e-6  # see tests/test_scheduler.py: diffusers' float32 re-noise to sigma_min at its final step


def make_pipelines(**unet_kwargs):
    unet = make_tiny_unet(**unet_kwargs)
    ours = ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler())
    theirs = ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler())
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize(
    "schedule, tol",
    [(dict(num_inference_steps=1), 1e-5), (dict(num_inference_steps=None, timesteps=[22, 0]), FINAL_STEP_TOL)],
    ids=["1step", "timesteps_22_0"],
)
def test_parity_with_diffusers(schedule, tol):
    ours, theirs = make_pipelines(in_channels=3)  # diffusers hard-codes 3 channels and square images
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = ours(batch_size=2, latents=latents, generator=torch.Generator().manual_seed(1), output_type="pt", **schedule)
    b = theirs(batch_size=2, latents=latents, generator=torch.Generator().manual_seed(1), output_type="pt", **schedule)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=tol)


def test_parity_class_conditional_explicit_labels():
    ours, theirs = make_pipelines(in_channels=3, num_class_embeds=10)
    latents = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = [1, 7, 3]
    a = ours(batch_size=3, class_labels=labels, latents=latents, output_type="np").images
    b = theirs(batch_size=3, class_labels=labels, latents=latents, output_type="np").images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # The labels matter: other labels give other images.
    c = ours(batch_size=3, class_labels=[0, 0, 0], latents=latents, output_type="np").images
    assert np.abs(a - c).max() > 1e-4


def test_random_class_labels_follow_the_generator():
    ours, _ = make_pipelines(num_class_embeds=10)
    run = lambda seed: ours(batch_size=4, generator=torch.Generator().manual_seed(seed), output_type="np").images  # noqa: E731
    np.testing.assert_array_equal(run(3), run(3))
    assert np.abs(run(3) - run(4)).max() > 0


def test_grayscale_rectangular_and_output_types():
    ours, _ = make_pipelines(in_channels=1, sample_size=(16, 24))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pil = ours(batch_size=2, generator=gen()).images
    assert len(pil) == 2 and pil[0].size == (24, 16) and pil[0].mode == "L"
    arr = ours(batch_size=2, generator=gen(), output_type="np").images
    assert arr.shape == (2, 16, 24, 1) and arr.min() >= 0 and arr.max() <= 1
    pt = ours(batch_size=2, generator=gen(), output_type="pt").images
    latent = ours(batch_size=2, generator=gen(), output_type="latent").images
    assert pt.shape == latent.shape == (2, 1, 16, 24)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    np.testing.assert_allclose(np.asarray(pil[0], dtype=np.float32) / 255, arr[0, ..., 0], atol=1 / 255 + 1e-6)


def test_seeded_runs_repeat_and_one_step_is_the_consistency_function():
    ours, _ = make_pipelines()
    latents = torch.randn(2, 1, 16, 16)
    out = ours(batch_size=2, latents=latents, output_type="latent").images
    direct = ours.consistency_function(latents * 80.0, 80.0)
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)
    a = ours(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt")
    b = ours(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_explicit_sigmas_and_callback():
    ours, _ = make_pipelines()
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, float(t), tuple(sorted(tensors))))
        if i == 0:
            return {"latents": torch.zeros_like(tensors["latents"])}  # the callback may replace the latents
        return {}

    ours(batch_size=1, sigmas=[80.0, 2.0, 0.5], callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=["latents", "denoised"])
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][2] == ("denoised", "latents")
    np.testing.assert_allclose([s[1] for s in seen], 250 * np.log([80.0, 2.0, 0.5]), rtol=1e-6)


def test_input_errors():
    ours, _ = make_pipelines()
    with pytest.raises(ValueError, match=r"needs \(2, 1, 16, 16\)"):
        ours(batch_size=2, latents=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="unconditional"):
        ours(batch_size=1, class_labels=3)
    with pytest.raises(ValueError, match="output_type"):
        ours(output_type="jpeg")
    with pytest.raises(ValueError, match="descending"):
        ours(timesteps=[0, 22])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ours(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"])
    conditional, _ = make_pipelines(num_class_embeds=4)
    with pytest.raises(ValueError, match="one per image"):
        conditional(batch_size=3, class_labels=[1, 2])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        conditional(batch_size=1, class_labels=[4])


def test_rejects_foreign_scheduler():
    with pytest.raises(ValueError, match="ConsistencyScheduler"):
        ConsistencyPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler())


def test_save_load_round_trip_and_plain_diffusers(tmp_path):
    ours, _ = make_pipelines()
    ours.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert not list(tmp_path.rglob("*.bin"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "CMStochasticIterativeScheduler"]

    latents = torch.randn(1, 1, 16, 16)
    expected = ours(latents=latents, output_type="pt").images
    loaded = ConsistencyPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, ConsistencyScheduler)
    torch.testing.assert_close(loaded(latents=latents, output_type="pt").images, expected, rtol=0, atol=1e-6)

    plain = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(plain, ConsistencyModelPipeline)
    plain.set_progress_bar_config(disable=True)
    # diffusers' own pipeline samples our folder (it hard-codes 3 channels for latents checks, so pass none).
    torch.testing.assert_close(plain.unet(latents, 1.0).sample, loaded.unet(latents, 1.0).sample)


def test_loads_folder_written_by_diffusers(tmp_path):
    ours, theirs = make_pipelines(in_channels=3)
    theirs.save_pretrained(tmp_path)
    loaded = ConsistencyPipeline.from_pretrained(tmp_path)
    latents = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(latents=latents, output_type="pt").images,
                               ours(latents=latents, output_type="pt").images)


def test_loads_by_repo_id_from_hub_cache(tmp_path, monkeypatch):
    ours, theirs = make_pipelines(in_channels=3)
    theirs.save_pretrained(tmp_path / "openai_layout")  # the layout of openai/diffusers-cd_imagenet64_l2
    ours.save_pretrained(tmp_path / "ours")
    cache = tmp_path / "hub"
    layout_hub_cache(tmp_path / "openai_layout", "openai/diffusers-cd_tiny_l2", cache)
    layout_hub_cache(tmp_path / "ours", "someone/cd-tiny", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    latents = torch.randn(1, 3, 16, 16)
    expected = ours(latents=latents, output_type="pt").images
    for repo_id in ("openai/diffusers-cd_tiny_l2", "someone/cd-tiny"):
        pipe = ConsistencyPipeline.from_pretrained(repo_id, cache_dir=str(cache))
        torch.testing.assert_close(pipe(latents=latents, output_type="pt").images, expected)
        assert isinstance(DiffusionPipeline.from_pretrained(repo_id, cache_dir=str(cache)), ConsistencyModelPipeline)


def test_non_consistency_model_gets_a_helpful_error(tmp_path):
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a consistency-model pipeline.*DDPMPipeline.*--mode cd"):
        ConsistencyPipeline.from_pretrained(tmp_path)


def test_missing_shipped_model_and_missing_folder():
    with pytest.raises((OSError, ValueError, FileNotFoundError)):
        ConsistencyPipeline.from_pretrained("/nonexistent/folder")


def test_pil_output_is_an_image():
    ours, _ = make_pipelines()
    image = ours(generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image)
