"""Teacher samplers: exact NFE counts, convergence to the closed-form PF-ODE solution, DDIM parity with diffusers."""

import numpy as np
import pytest
import torch

from cm_diffusers.parameterization import append_dims, karras_sigmas
from cm_diffusers.teacher_sampling import (
    nfe_for_steps,
    ode_sigmas,
    sample_ddim,
    sample_ode,
    sample_teacher,
    steps_for_nfe,
)

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DATA_MEAN, DATA_STD = 0.3, 0.5


class GaussianDenoiser:
    """Exact D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m) for data ~ N(m, s^2 I); counts its calls."""

    def __init__(self):
        self.calls = 0
        self.sigmas_seen = []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.sigmas_seen.append(sigma)
        sigma = append_dims(sigma, x.ndim)
        return DATA_MEAN + DATA_STD**2 / (DATA_STD**2 + sigma**2) * (x - DATA_MEAN)


def exact_solution(noise, sigma_max=SIGMA_MAX):
    """The PF-ODE solution at sigma = 0 from x = sigma_max z: (x - m) scales with sqrt(s^2 + sigma^2)."""
    return DATA_MEAN + (noise * sigma_max - DATA_MEAN) * DATA_STD / (DATA_STD**2 + sigma_max**2) ** 0.5


@pytest.fixture
def noise():
    return torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_nfe_budgets():
    assert [nfe_for_steps("heun", n) for n in (1, 2, 18)] == [1, 3, 35]
    assert [nfe_for_steps(s, 7) for s in ("euler", "ddim")] == [7, 7]
    assert [steps_for_nfe("heun", nfe) for nfe in (1, 2, 3, 4, 35, 100)] == [1, 1, 2, 2, 18, 50]
    assert steps_for_nfe("euler", 10) == 10 and steps_for_nfe("ddim", 4) == 4
    for bad in [("heun", 0), ("lms", 5)]:
        with pytest.raises(ValueError):
            steps_for_nfe(*bad)


def test_ode_sigmas_are_the_karras_grid_plus_zero():
    sigmas = ode_sigmas(18, SIGMA_MIN, SIGMA_MAX)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 19 and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:-1].numpy(), karras_sigmas(18, SIGMA_MIN, SIGMA_MAX))
    assert ode_sigmas(1, SIGMA_MIN, SIGMA_MAX).tolist() == [SIGMA_MAX, 0.0]


@pytest.mark.parametrize("solver,order", [("heun", 2), ("euler", 1)])
def test_ode_solvers_converge_to_the_exact_solution_with_exact_nfe(noise, solver, order):
    exact = exact_solution(noise)
    errors = []
    for num_steps in (16, 32, 64):
        denoiser = GaussianDenoiser()
        out = sample_ode(denoiser, noise, ode_sigmas(num_steps, SIGMA_MIN, SIGMA_MAX), solver=solver)
        assert out.nfe == denoiser.calls == nfe_for_steps(solver, num_steps)
        errors.append((out.sample - exact).abs().max().item())
    # Halving the step size divides the global error by ~2^order (measured: Heun 4.6x, 4.3x; Euler 2.0x, 2.0x).
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.8 < coarse / fine < 2**order * 1.4
    assert errors[-1] < (0.01 if solver == "heun" else 0.1)


def test_sample_ode_calls_the_denoiser_per_sample_with_its_conditioning(noise):
    seen = {}

    def denoiser(x, sigma, class_labels=None):
        seen.setdefault("shapes", set()).add(tuple(sigma.shape))
        seen["labels"] = class_labels
        return torch.zeros_like(x)

    labels = torch.tensor([0, 1, 2])
    out = sample_ode(denoiser, noise, [10.0, 1.0, 0.0], solver="heun", class_labels=labels)
    assert seen["shapes"] == {(3,)} and seen["labels"] is labels
    # D = 0 makes x proportional to sigma along the ODE: x(1) = z * 1, then Euler to 0 gives 0.
    assert out.nfe == 3 and torch.equal(out.sample, torch.zeros_like(noise))


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [1.0, -0.5]])
def test_sample_ode_rejects_bad_grids(noise, sigmas):
    with pytest.raises(ValueError, match="descending"):
        sample_ode(GaussianDenoiser(), noise, sigmas)


def test_sample_teacher_uses_the_teachers_sigma_range(noise):
    denoiser = GaussianDenoiser()  # stands in for a load_teacher() adapter: a denoiser with its sigma range
    denoiser.kind, denoiser.sigma_min, denoiser.sigma_max = "edm", 0.01, 20.0
    out = sample_teacher(denoiser, noise, "heun", nfe=10)  # 5 Heun steps = 9 NFE
    assert out.nfe == denoiser.calls == 9
    assert denoiser.sigmas_seen[0][0].item() == pytest.approx(20.0) and min(s[0] for s in denoiser.sigmas_seen) > 0
    expected = sample_ode(GaussianDenoiser(), noise, ode_sigmas(5, 0.01, 20.0), solver="heun").sample
    assert torch.equal(out.sample, expected)
    with pytest.raises(ValueError, match="DDIM samples DDPM teachers"):
        sample_teacher(denoiser, noise, "ddim", nfe=4)


def test_ddim_matches_diffusers_ddim_pipeline():
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler
    from helpers import make_tiny_unet

    unet = make_tiny_unet(sample_size=16)
    config = DDPMScheduler(num_train_timesteps=100).config
    pipe = DDIMPipeline(unet, DDIMScheduler.from_config(config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=3,
                    output_type="np").images

    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(unet, config, noise, num_inference_steps=3)
    assert out.nfe == 3
    images = (out.sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_euler_with_clipped_denoiser_is_ddim_with_clipped_model_output():
    """The DDPM adapter + Euler over DDIM's own levels reproduce diffusers' DDIM step by step, x0 clamp included."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from helpers import make_tiny_unet

    from cm_diffusers.teachers import DDPMDenoiser

    unet = make_tiny_unet(sample_size=16)
    config = DDPMScheduler(num_train_timesteps=100).config  # clip_sample=True, as DDPMScheduler's default
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    scheduler.set_timesteps(4)  # [99, 74, 49, 24], each step to t - 25, the last to alphabar = 1 (sigma 0)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, use_clipped_model_output=True).prev_sample

    alphas_cumprod = scheduler.alphas_cumprod.double()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()[scheduler.timesteps].tolist() + [0.0]
    vp_to_ve = (1 + sigmas[0] ** 2) ** 0.5 / sigmas[0]  # DDIM starts at x_T = z, i.e. x = z sqrt(1 + sigma_T^2)
    teacher = DDPMDenoiser(unet, config)
    out = sample_ode(teacher, noise * vp_to_ve, sigmas, solver="euler", clip_denoised=True)
    torch.testing.assert_close(out.sample, x, atol=1e-4, rtol=1e-4)
    unclipped = sample_ode(teacher, noise * vp_to_ve, sigmas, solver="euler").sample
    assert (unclipped - x).abs().max() > 0.1  # the untrained network's x0 leaves [-1, 1]: the clamp matters
