"""Exact math of latent consistency distillation: the guided DDIM target, LCM's scalings and grids, the w-embedding."""

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler  # noqa: E402
from helpers_sd import make_tiny_sd_components  # noqa: E402

from cm_diffusers.latent import GuidedDDIMStep, LatentUNet, LCMParameterization, SkippingStepPairs  # noqa: E402
from cm_diffusers.latent.lcm import (  # noqa: E402
    guidance_scale_embedding,
    lcm_boundary_scalings,
    lcm_inference_timesteps,
    skipping_step_timesteps,
)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def teacher(request, tmp_path_factory):
    components = make_tiny_sd_components(tmp_path_factory.mktemp("tokenizer"), prediction_type=request.param)
    return components["unet"], components["scheduler"], request.param


def test_guided_target_equals_hand_written_guided_ddim_step(teacher):
    unet, scheduler, prediction_type = teacher
    alphas_cumprod = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    cond, uncond = torch.randn(2, 4, 16, 16, generator=generator).unbind(0)
    start = torch.tensor([19, 39, 519, 999])  # the first grid point (its step lands on t = 0), two inner, the last
    end = torch.tensor([0, 19, 499, 979])
    w = torch.tensor([0.0, 3.0, 7.5, 14.0])

    target = GuidedDDIMStep(LatentUNet(unet), alphas_cumprod, prediction_type)(
        x, start, end, None, None, encoder_hidden_states=cond, uncond_hidden_states=uncond, guidance=w
    )

    # By hand, one sample at a time: two teacher calls, guided prediction, x0 and eps, the DDIM step
    scheduler.set_timesteps(50)  # DDIM's previous timestep is t - 1000 // 50 = t - 20
    with torch.no_grad():
        for i in range(4):
            t, t_prev = int(start[i]), int(end[i])
            out_c = unet(x[i : i + 1], t, encoder_hidden_states=cond[i : i + 1]).sample
            out_u = unet(x[i : i + 1], t, encoder_hidden_states=uncond[i : i + 1]).sample
            out = out_u + (1 + w[i]) * (out_c - out_u)  # diffusers' guidance scale is LCM's w + 1
            a, a_prev = float(alphas_cumprod[t]), float(alphas_cumprod[t_prev])
            if prediction_type == "epsilon":
                eps = out
                x0 = (x[i] - (1 - a) ** 0.5 * eps) / a**0.5
            else:
                x0 = a**0.5 * x[i] - (1 - a) ** 0.5 * out
                eps = a**0.5 * out + (1 - a) ** 0.5 * x[i]
            by_hand = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            torch.testing.assert_close(target[i : i + 1], by_hand, rtol=1e-5, atol=1e-5)
            # and diffusers' own DDIM step (eta = 0) on the guided prediction; from t = 19 it lands on
            # alphas_cumprod[0] (set_alpha_to_one=False), the level LCD's first pair ends at
            ddim = scheduler.step(out, t, x[i : i + 1], eta=0.0).prev_sample
            torch.testing.assert_close(target[i : i + 1], ddim, rtol=1e-5, atol=1e-5)


def test_guidance_zero_is_the_unguided_teacher_step(teacher):
    unet, scheduler, prediction_type = teacher
    step = GuidedDDIMStep(LatentUNet(unet), scheduler.alphas_cumprod, prediction_type)
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)
    t, t_prev, w = torch.tensor([519, 999]), torch.tensor([499, 979]), torch.zeros(2)
    same_prompt = step(x, t, t_prev, None, None, encoder_hidden_states=cond, uncond_hidden_states=cond, guidance=w)
    other = step(x, t, t_prev, None, None, encoder_hidden_states=cond, uncond_hidden_states=-cond, guidance=w)
    torch.testing.assert_close(same_prompt, other, rtol=1e-5, atol=1e-6)


def test_lcm_scalings_match_lcm_scheduler_and_make_f_the_identity_at_zero():
    scheduler = LCMScheduler()
    for t in (0, 1, 19, 259, 999):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert lcm_boundary_scalings(float(t)) == pytest.approx(expected)
    assert lcm_boundary_scalings(0.0) == (1.0, 0.0)
    assert lcm_boundary_scalings(19.0, timestep_scaling=10.0)[0] < 1e-4  # timestep scaling 10: f ~ x0_pred at once

    parameterization = LCMParameterization(scheduler.alphas_cumprod)
    x = torch.randn(3, 4, 8, 8)
    f = parameterization(lambda sample, t, **cond: torch.randn_like(sample) * 100, x, torch.zeros(3, dtype=torch.long))
    assert torch.equal(f, x)  # the boundary condition holds exactly, whatever the network says


def test_skipping_step_grid_and_inference_timesteps_match_lcm_scheduler():
    grid = skipping_step_timesteps(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and torch.all(grid.diff() == 20)
    for original_steps in (50, 25, 8):
        for steps in range(1, min(original_steps, 8) + 1):
            scheduler = LCMScheduler(original_inference_steps=original_steps)
            scheduler.set_timesteps(steps)
            assert lcm_inference_timesteps(steps, 1000, original_steps) == scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match="num_inference_steps"):
        lcm_inference_timesteps(51, 1000, 50)
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        skipping_step_timesteps(1000, 0)


def test_skipping_step_pairs_are_k_apart_and_cover_the_grid():
    pairs = SkippingStepPairs(1000, 50)
    start, end = pairs(4096, generator=torch.Generator().manual_seed(0))
    assert set(start.tolist()) == set(range(19, 1000, 20))
    assert torch.all(torch.where(start == 19, end == 0, end == start - 20))


def test_guidance_embedding_matches_the_lcm_pipeline():
    w = torch.tensor([0.0, 1.5, 7.0, 14.0])
    for dim in (256, 255):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_scale_embedding(w, dim), expected, rtol=0, atol=0)


def test_lcm_parameterization_noises_as_the_ddpm_forward_process():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x, z, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    noisy = LCMParameterization(scheduler.alphas_cumprod.double()).add_noise(x, z, t)
    torch.testing.assert_close(noisy, scheduler.add_noise(x, z, t), rtol=1e-6, atol=1e-6)
