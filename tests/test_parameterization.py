import math

import numpy as np
import pytest
import torch

from cm_diffusers import parameterization as P


def test_karras_grid_end_points_and_order():
    sigmas = P.karras_sigmas(40)
    assert sigmas[0] == pytest.approx(80.0, rel=1e-12)
    assert sigmas[-1] == pytest.approx(0.002, rel=1e-12)
    assert np.all(np.diff(sigmas) < 0)
    # The ramp form and the indexed form are the same grid.
    idx = torch.arange(40, dtype=torch.float64)
    np.testing.assert_allclose(P.karras_sigma_at(idx, 40).numpy(), sigmas, rtol=1e-12)


def test_karras_grid_rejects_single_point():
    with pytest.raises(ValueError, match="at least 2"):
        P.karras_sigmas(1)


def test_boundary_condition_is_exact():
    # f(x, sigma_min) = x for ANY network output: c_skip(eps) = 1 and c_out(eps) = 0 exactly.
    c_skip, c_out, c_in = P.boundary_scalings(torch.tensor(0.002, dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    assert c_in.item() == pytest.approx(1 / math.sqrt(0.002**2 + 0.25))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def wild_network(x_in, t):
        return 1e6 * torch.randn_like(x_in)

    out = P.consistency_function(wild_network, x, torch.full((3,), 0.002, dtype=torch.float64))
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_scalings_approach_denoiser_at_large_sigma():
    # For sigma >> sigma_data, c_skip -> 0 and c_out -> sigma_data: the output is (almost) the network's.
    c_skip, c_out, _ = P.boundary_scalings(80.0)
    assert c_skip < 1e-4 and c_out == pytest.approx(0.5, rel=1e-3)


def test_sigma_time_round_trip_and_openai_convention():
    sigmas = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(P.t_to_sigma(P.sigma_to_t(sigmas)), sigmas)
    assert float(P.sigma_to_t(1.0)) == pytest.approx(0.0, abs=1e-9)
    assert float(P.sigma_to_t(80.0)) == pytest.approx(250 * math.log(80.0))


def test_openai_ts_and_diffusers_timesteps_convert_both_ways():
    assert P.openai_ts_to_timesteps([0, 22, 39], 40) == [22, 0]
    assert P.timesteps_to_openai_ts([22, 0], 40) == [0, 22, 39]
    assert P.openai_ts_to_timesteps([0, 62, 150], 151) == [62, 0]
    # Without the end point OpenAI's list means the same schedule.
    assert P.openai_ts_to_timesteps([0, 22], 40) == [22, 0]
    with pytest.raises(ValueError, match="ascending"):
        P.openai_ts_to_timesteps([22, 0, 39], 40)
    with pytest.raises(ValueError, match="ascending"):
        P.openai_ts_to_timesteps([0, 45], 40)
    with pytest.raises(ValueError, match="descending"):
        P.timesteps_to_openai_ts([0, 22], 40)
    with pytest.raises(ValueError, match="descending"):
        P.timesteps_to_openai_ts([39, 0], 40)  # 39 is the end point sigma_min, never a network evaluation


def test_timesteps_to_sigmas_sampling_order():
    sigmas = P.timesteps_to_sigmas([22, 0], 40)
    grid = P.karras_sigmas(40)
    np.testing.assert_allclose(sigmas, [grid[0], grid[22]], rtol=1e-12)


def gaussian_denoiser(mean, std):
    """Exact D(x, sigma) = E[x0 | x_sigma] for data x0 ~ N(mean, std^2)."""

    def denoise(x, sigma):
        return mean + std**2 / (std**2 + sigma**2) * (x - mean)

    return denoise


def test_ode_steps_follow_analytic_gaussian_solution():
    # For Gaussian data the PF-ODE solution is x(s) = m + (x(S) - m) sqrt(std^2 + s^2) / sqrt(std^2 + S^2).
    mean, std = 0.3, 0.7
    denoise = gaussian_denoiser(mean, std)
    x_start = torch.randn(64, dtype=torch.float64) * math.sqrt(std**2 + 80.0**2) + mean

    def exact(s):
        return mean + (x_start - mean) * math.sqrt(std**2 + s**2) / math.sqrt(std**2 + 80.0**2)

    errors = {}
    for solver in ("euler", "heun"):
        for n in (20, 40, 80):
            sigmas = P.karras_sigmas(n)
            x = x_start.clone()
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                if solver == "euler":
                    x = P.euler_step(x, s, s_next, denoise(x, s))
                else:
                    x = P.heun_step(denoise, x, s, s_next)
            errors[solver, n] = (x - exact(sigmas[-1])).abs().max().item()
    # Convergence orders: halving the step size divides Euler's error by ~2 and Heun's by ~4.
    assert 1.7 < errors["euler", 40] / errors["euler", 80] < 2.3
    assert 3.5 < errors["heun", 40] / errors["heun", 80] < 4.5
    assert errors["heun", 80] < errors["euler", 80] / 10


def test_heun_step_to_zero_is_euler():
    denoise = gaussian_denoiser(0.0, 0.5)
    x = torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(P.heun_step(denoise, x, 0.5, 0.0), P.euler_step(x, 0.5, 0.0, denoise(x, 0.5)))


def test_ct_curriculum_end_points_and_monotone():
    assert P.ct_num_scales(0, 1000, s0=2, s1=150) == 2
    assert P.ct_num_scales(1000, 1000, s0=2, s1=150) == 151
    values = [P.ct_num_scales(k, 1000) for k in range(0, 1001, 50)]
    assert values == sorted(values)
    # mu(k) = exp(s0 ln mu0 / N): mu0 at N = s0.
    assert P.ct_target_ema(2, s0=2, mu0=0.9) == pytest.approx(0.9)
    assert P.ct_target_ema(151, s0=2, mu0=0.9) > 0.99


def test_ict_curriculum_doubles():
    total = 800_000
    k_prime = math.floor(total / (math.log2(1280 / 10) + 1))  # = 100_000
    assert P.ict_num_scales(0, total) == 11
    assert P.ict_num_scales(k_prime - 1, total) == 11
    assert P.ict_num_scales(k_prime, total) == 21
    assert P.ict_num_scales(3 * k_prime, total) == 81
    assert P.ict_num_scales(total, total) == 1281


def test_lognormal_index_probs_sum_to_one_and_peak_near_p_mean():
    grid = P.karras_sigmas(641)[::-1].copy()  # ascending, as in iCT's notation
    probs = P.lognormal_index_probs(grid)
    assert probs.shape == (640,)
    assert probs.sum().item() == pytest.approx(1.0)
    assert (probs >= 0).all()
    peak_sigma = grid[int(probs.argmax())]
    assert 0.05 < peak_sigma < 1.5  # the lognormal's density in log-sigma peaks at exp(-1.1) = 0.33


def test_pseudo_huber_constant():
    assert P.pseudo_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))


def test_ect_r_shrinks_gap_with_stage_and_respects_sigma_min():
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    gaps = [sigma - P.ect_r(sigma, stage) for stage in range(4)]
    for earlier, later in zip(gaps, gaps[1:]):
        assert (later <= earlier + 1e-12).all()
    assert (P.ect_r(sigma, 0) >= 0.002).all()
    assert P.ect_stage(0, 100, 4) == 0 and P.ect_stage(99, 100, 4) == 3 and P.ect_stage(100, 100, 4) == 3


def test_edm_loss_weight_makes_the_effective_weight_of_f_unit():
    # lambda(sigma) c_out(sigma)^2 = 1 for EDM's c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    torch.testing.assert_close(P.edm_loss_weight(sigma, 0.5) * c_out**2, torch.ones_like(sigma))
