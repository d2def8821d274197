"""Sampling TrigFlow (sCT / sCD) models: ConsistencyPipeline's one loop against diffusers' SCMScheduler, the saved
folder under plain diffusers, and refusals."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, SCMScheduler
from helpers import make_tiny_unet

from cm_diffusers import ConsistencyPipeline
from cm_diffusers.parameterization import trigflow_function, trigflow_t
from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler

SIGMA_D = 0.5


def scm_reference(unet, scheduler_config, noise, times, step_noises, time_input="t"):
    """A hand-written loop over diffusers' SCMScheduler (SANA-Sprint's): x = sigma_d z; model_output = sigma_d F."""
    scheduler = SCMScheduler(sigma_data=SIGMA_D)
    scheduler.set_timesteps(len(times), timesteps=list(times) + [0.0], max_timesteps=None, intermediate_timesteps=None)
    helper = TrigFlowSCMScheduler(**scheduler_config)  # only for c_noise(t)
    sample, denoised = noise * SIGMA_D, None
    noises = iter(step_noises)
    for t in scheduler.timesteps[:-1]:
        c_noise = helper.time_input(t).expand(noise.shape[0])
        model_output = SIGMA_D * unet(sample / SIGMA_D, c_noise).sample
        generator = torch.Generator().manual_seed(0)  # SCMScheduler draws its own noise: replace it with ours below
        sample, denoised = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)
        t_next = scheduler.timesteps[scheduler.step_index]
        sample = torch.cos(t_next) * denoised + torch.sin(t_next) * SIGMA_D * next(noises, torch.zeros_like(noise))
    return sample


@pytest.mark.parametrize("time_input", ["t", "log_sigma"])
def test_one_and_two_steps_equal_a_loop_over_diffusers_scm_scheduler(time_input):
    unet = make_tiny_unet(seed=5)
    config = dict(sigma_max=80.0, time_input=time_input, intermediate_timesteps=1.1)
    pipe = ConsistencyPipeline(unet=unet, scheduler=TrigFlowSCMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    step_noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    t_max = math.atan(80.0 / SIGMA_D)
    assert t_max == pytest.approx(1.56454, abs=1e-5)

    one = pipe(batch_size=3, latents=noise, output_type="latent").images
    torch.testing.assert_close(one, scm_reference(unet, config, noise, [t_max], []), rtol=0, atol=1e-5)

    def randn(shape):
        return step_noise

    for schedule in ({"num_inference_steps": 2}, {"timesteps": [t_max, 1.1]},
                     {"sigmas": [80.0, SIGMA_D * math.tan(1.1)]}):  # fmt: skip
        sigmas = pipe.sampling_sigmas(**schedule)
        two = pipe.sample(pipe.prepare_latents(3, latents=noise), sigmas, randn=randn)
        torch.testing.assert_close(two, scm_reference(unet, config, noise, [t_max, 1.1], [step_noise]), rtol=0,
                                   atol=1e-5)  # fmt: skip
    # f is the TrigFlow consistency function at x_t = cos(t) x_sigma
    sigma = torch.tensor([0.3, 5.0, 80.0])
    x_sigma = torch.randn(3, 1, 16, 16)
    t = trigflow_t(sigma, SIGMA_D)
    expected = trigflow_function(lambda x, c: unet(x, c).sample, torch.cos(t).reshape(-1, 1, 1, 1) * x_sigma, t,
                                 SIGMA_D, time_input)  # fmt: skip
    torch.testing.assert_close(pipe.consistency_function(x_sigma, sigma, clip_denoised=False), expected)


def test_saved_folder_samples_alike_in_cm_diffusers_and_plain_diffusers(tmp_path):
    unet = make_tiny_unet(seed=6)
    scheduler = TrigFlowSCMScheduler(sigma_max=80.0, time_input="t", intermediate_timesteps=1.0)
    ConsistencyPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_trigflow", "TrigFlowPipeline"]
    assert index["scheduler"] == ["pipeline_trigflow", "TrigFlowSCMScheduler"]
    assert all((folder / "pipeline_trigflow.py").is_file() for folder in (tmp_path, tmp_path / "scheduler"))

    ours = ConsistencyPipeline.from_pretrained(tmp_path)
    assert ours.is_trigflow and ours.scheduler.config.time_input == "t"
    plain = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(plain).__name__ == "TrigFlowPipeline" and type(plain.scheduler).__name__ == "TrigFlowSCMScheduler"
    for pipe in (ours, plain):
        pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        a = ours(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="np")
        b = plain(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(7),
                  output_type="np")  # fmt: skip
        np.testing.assert_allclose(a.images, b.images, rtol=0, atol=1e-5)
    a = ours(batch_size=2, timesteps=[1.5, 0.9], generator=torch.Generator().manual_seed(3), output_type="np").images
    b = plain(batch_size=2, timesteps=[1.5, 0.9], generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    # never silently wrong: without trust_remote_code plain diffusers refuses the folder's code
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_trigflow_schedules_are_validated():
    pipe = ConsistencyPipeline(unet=make_tiny_unet(), scheduler=TrigFlowSCMScheduler(sigma_max=80.0))
    with pytest.raises(ValueError, match="strictly descending"):
        pipe(batch_size=1, timesteps=[1.0, 1.2])
    with pytest.raises(ValueError, match="must lie in"):
        pipe(batch_size=1, timesteps=[1.57])  # above t_max = 1.56454
    with pytest.raises(ValueError, match="sigma_max=80"):
        pipe(batch_size=1, sigmas=[100.0])
    with pytest.raises(ValueError, match="time_input"):
        TrigFlowSCMScheduler(time_input="sigma")


def test_editing_runs_on_a_trigflow_model():
    """Algorithm 4 goes through the same loop: inpainting keeps the known pixels of a TrigFlow model's output."""
    pipe = ConsistencyPipeline(unet=make_tiny_unet(seed=8), scheduler=TrigFlowSCMScheduler(sigma_max=80.0))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 1, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1  # regenerate the centre
    for schedule in ({}, {"num_inference_steps": 2}, {"sigmas": [40.0, 1.0]}):
        out = pipe.inpaint(image, mask, input_range=(-1, 1), generator=torch.Generator().manual_seed(0),
                           output_type="latent",
                           **schedule).images  # fmt: skip
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[mask == 0], image[mask == 0], rtol=0, atol=1e-5)
