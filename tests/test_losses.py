"""The consistency loss path: distances, noise-level samplers, next-point estimators, weighting, curricula."""

import math

import numpy as np
import pytest
import torch
from helpers import make_tiny_unet
from scipy import stats

from cm_diffusers.losses import (
    LPIPS,
    ConsistencyLoss,
    Curriculum,
    DataPointStep,
    DenoiserLoss,
    ECTPairs,
    KarrasGridPairs,
    Levels,
    PseudoHuber,
    TeacherODEStep,
    build_loss,
    l1,
    l2,
    make_distance,
    unit_weight,
)
from cm_diffusers.networks import unet_forward
from cm_diffusers.parameterization import (
    boundary_scalings,
    consistency_function,
    ect_r,
    edm_loss_weight,
    euler_step,
    inverse_gap_weight,
    karras_sigmas,
    pseudo_huber_c,
    truncated_lognormal_sigmas,
)

# ----------------------------------------------------------------------------------------------------------------
# Distances


def test_pseudo_huber_is_per_sample_l2_norm_not_elementwise():
    a = torch.zeros(2, 1, 16, 16)
    b = torch.full_like(a, 0.1)
    b[1] = 0.0
    b[1, 0, 0, 0] = 1.6  # same squared norm as sample 0 (256 * 0.01 = 2.56), concentrated in one pixel
    c = pseudo_huber_c(256)
    assert c == pytest.approx(0.00054 * 16)
    distance = PseudoHuber()(a, b)
    expected = math.sqrt(2.56 + c**2) - c
    torch.testing.assert_close(distance, torch.tensor([expected, expected]), rtol=1e-6, atol=0)
    # an elementwise pseudo-Huber (the common bug) gives different values for the two samples
    elementwise = (torch.sqrt((a - b) ** 2 + c**2) - c).flatten(1).sum(1)
    assert abs(elementwise[0] - elementwise[1]) > 1.0


def test_l2_l1_are_per_sample_means_and_pseudo_huber_takes_explicit_c():
    a, b = torch.zeros(3, 2, 4, 4), torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 2, 4, 4)
    torch.testing.assert_close(l2(a, b), torch.tensor([0.0, 1.0, 4.0]))
    torch.testing.assert_close(l1(a, b), torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(PseudoHuber(c=1.0)(a, b), torch.sqrt(torch.tensor([0.0, 32.0, 128.0]) + 1) - 1)
    with pytest.raises(ValueError, match="l2, l1, pseudo_huber or lpips"):
        make_distance("huber")


def test_lpips_without_package_or_weights_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub: the backbone weights are surely missing
    with pytest.raises((ImportError, FileNotFoundError)) as info:
        LPIPS()
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "--loss_type pseudo_huber" in message


# ----------------------------------------------------------------------------------------------------------------
# Noise-level pairs


def test_grid_pairs_are_adjacent_karras_points():
    grid = karras_sigmas(18)
    sigma, sigma_next = KarrasGridPairs()(4096, Levels(18, 0.0), generator=torch.Generator().manual_seed(0))
    index = np.abs(grid[None, :] - sigma.double().numpy()[:, None]).argmin(1)
    np.testing.assert_allclose(sigma.numpy(), grid[index], rtol=1e-6)
    np.testing.assert_allclose(sigma_next.numpy(), grid[index + 1], rtol=1e-6)
    assert set(index.tolist()) == set(range(17))  # uniform over n = 0 .. N-2: every pair appears in 4096 draws


@pytest.mark.parametrize("num_scales", [11, 41])
def test_lognormal_index_sampler_matches_closed_form(num_scales):
    """Chi-square goodness of fit at a fixed seed; p > 0.001 is the criterion (a true sampler fails it for 0.1% of
    seeds), and the expected count of every bin is >= 5 so the chi-square approximation holds."""
    num_draws = 200_000
    grid = karras_sigmas(num_scales)  # descending
    sigma, _ = KarrasGridPairs(lognormal=True)(
        num_draws, Levels(num_scales, 0.0), generator=torch.Generator().manual_seed(0)
    )
    index = np.abs(grid[None, :] - sigma.double().numpy()[:, None]).argmin(1)
    counts = np.bincount(index, minlength=num_scales - 1)[: num_scales - 1]
    # iCT eq. 9 written directly on the pair (sigma_n > sigma_{n+1}): erf(ln sigma_n) - erf(ln sigma_{n+1})
    erf = np.vectorize(math.erf)((np.log(grid) + 1.1) / (math.sqrt(2) * 2.0))
    probs = erf[:-1] - erf[1:]
    probs /= probs.sum()
    expected = probs * num_draws
    assert expected.min() >= 5
    _, p_value = stats.chisquare(counts, expected)
    assert p_value > 1e-3
    assert np.abs(counts / num_draws - probs).max() < 0.005  # and no bin is off by more than half a percent


def test_ect_pairs_follow_truncated_lognormal_and_shrinking_gap():
    sampler = ECTPairs(sigma_min=0.002, sigma_max=80.0)
    sigma, r = sampler(50_000, Levels(0, 0.0, stage=2), generator=torch.Generator().manual_seed(0))
    assert (sigma >= 0.002).all() and (sigma <= 80.0).all() and (r < sigma).all() and (r >= 0.002).all()
    torch.testing.assert_close(r, ect_r(sigma.double(), 2).float())
    lo, hi = (math.log(0.002) + 1.1) / 2.0, (math.log(80.0) + 1.1) / 2.0
    _, p_value = stats.kstest(sigma.double().log().numpy(), stats.truncnorm(lo, hi, loc=-1.1, scale=2.0).cdf)
    assert p_value > 1e-3  # Kolmogorov-Smirnov at a fixed seed, same criterion as above
    gap_stage0 = (sigma - sampler(50_000, Levels(0, 0.0, 0), generator=torch.Generator().manual_seed(0))[1]).mean()
    assert (sigma - r).mean() < gap_stage0 / 3  # the gap shrinks by q = 2 per stage (two stages: about 4x)


def test_truncated_lognormal_end_points_and_median():
    sigmas = truncated_lognormal_sigmas(torch.tensor([0.0, 1.0]), -1.1, 2.0, 0.002, 80.0)
    torch.testing.assert_close(sigmas, torch.tensor([0.002, 80.0], dtype=torch.float64))
    untruncated_median = truncated_lognormal_sigmas(torch.tensor([0.5]), -1.1, 2.0, 1e-30, 1e30)
    torch.testing.assert_close(untruncated_median, torch.tensor([math.exp(-1.1)], dtype=torch.float64))


def test_inverse_gap_weight():
    grid = torch.from_numpy(karras_sigmas(10))
    weights = inverse_gap_weight(grid[:-1], grid[1:])
    torch.testing.assert_close(weights * (grid[:-1] - grid[1:]), torch.ones(9, dtype=torch.float64))
    assert (weights[1:] > weights[:-1]).all()  # small noise levels, small gaps, large weights


# ----------------------------------------------------------------------------------------------------------------
# Next-point estimators


def test_ct_target_is_the_analytic_euler_step():
    torch.manual_seed(0)
    x, z = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sigma, sigma_next = (
        torch.tensor([80.0, 5.0, 1.0, 0.01], dtype=torch.float64),
        torch.tensor([40.0, 4.0, 0.5, 0.002], dtype=torch.float64),
    )
    x_n = x + sigma.view(-1, 1, 1, 1) * z
    target = DataPointStep()(x_n, sigma, sigma_next, x, z)
    torch.testing.assert_close(target, x + sigma_next.view(-1, 1, 1, 1) * z, rtol=0, atol=0)
    # the Euler step from sigma_n with the data point as the denoiser D(x_n, sigma_n) = x lands there
    euler = euler_step(x_n, sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1), x)
    torch.testing.assert_close(euler, target, rtol=0, atol=1e-12)


def test_teacher_ode_step_solves_gaussian_pf_ode():
    """For data ~ N(0, s^2), D(x, sigma) = x s^2 / (s^2 + sigma^2) and the PF-ODE scales x by sqrt(s^2+sigma^2)."""
    s = 0.5
    x = torch.randn(3, 1, 4, 4)
    sigma, sigma_next = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.5, 0.8, 0.4])

    def teacher(x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)  # the teacher interface: one sigma per sample
        return (x * s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2)).half()  # a half-precision teacher

    exact = x * torch.sqrt((s**2 + sigma_next**2) / (s**2 + sigma**2)).view(-1, 1, 1, 1)
    heun = TeacherODEStep(teacher, "heun")(x, sigma, sigma_next, None, None)
    euler = TeacherODEStep(teacher, "euler")(x, sigma, sigma_next, None, None)
    assert heun.dtype == torch.float32
    heun_error, euler_error = (heun - exact).abs().max(), (euler - exact).abs().max()
    assert heun_error < 5e-3 and heun_error < euler_error / 5


# ----------------------------------------------------------------------------------------------------------------
# The loss


def test_loss_is_weighted_mean_of_per_sample_distances():
    sample = torch.randn(2, 1, 8, 8)
    sigma, sigma_next = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.75])

    def pairs(batch_size, levels, device=None, generator=None):
        return sigma, sigma_next

    def zero_network(x_in, t, class_labels=None):  # F = 0: f(x, sigma) = c_skip(sigma) x
        return torch.zeros_like(x_in)

    torch.manual_seed(1)
    loss, logs = ConsistencyLoss(DataPointStep(), pairs, l2, inverse_gap_weight)(
        zero_network, zero_network, sample, Levels(18, 0.0)
    )
    torch.manual_seed(1)
    z = torch.randn_like(sample)
    c_skip, _, _ = boundary_scalings(sigma.view(-1, 1, 1, 1))
    c_skip_next, _, _ = boundary_scalings(sigma_next.view(-1, 1, 1, 1))
    per_sample = l2(
        c_skip * (sample + sigma.view(-1, 1, 1, 1) * z), c_skip_next * (sample + sigma_next.view(-1, 1, 1, 1) * z)
    )
    torch.testing.assert_close(loss, (torch.tensor([1.0, 4.0]) * per_sample).mean())
    torch.testing.assert_close(logs["sigma_mean"], torch.tensor(1.5))


def test_student_and_target_share_dropout_masks():
    unet = make_tiny_unet(dropout=0.5).train()
    sample = torch.randn(2, 1, 16, 16)
    sigma = torch.tensor([1.0, 0.3])
    network = unet_forward(unet)
    with torch.no_grad():  # dropout is active: two plain calls differ
        assert not torch.equal(network(sample, sigma), network(sample, sigma))

    def same_level(batch_size, levels, device=None, generator=None):
        return sigma, sigma

    def stay(x_n, sigma, sigma_next, sample, noise, class_labels=None):
        return x_n

    # student(x_n, sigma) and target(x_n, sigma) with the same weights: identical only with identical masks
    loss, _ = ConsistencyLoss(stay, same_level, l2, unit_weight)(network, network, sample, Levels(18, 0.0))
    assert loss.item() == 0.0
    loss.backward()  # the student's graph is intact


def test_denoiser_warmup_is_edm_weighted_mse_to_data_or_teacher():
    sample = torch.rand(4, 1, 8, 8) * 2 - 1
    network = unet_forward(make_tiny_unet(seed=3).eval())
    sigma_min, sigma_max = 0.01, 80.0

    # data target: the EDM-weighted mean squared error of f(x + sigma z, sigma) to x, sigma truncated lognormal
    torch.manual_seed(5)
    with torch.no_grad():
        loss, logs = DenoiserLoss(sigma_min=sigma_min, sigma_max=sigma_max, p_mean=-1.2, p_std=1.2)(
            network, None, sample, Levels(0, 0.0)
        )
    torch.manual_seed(5)
    sigma = truncated_lognormal_sigmas(torch.rand(4, dtype=torch.float64), -1.2, 1.2, sigma_min, sigma_max).float()
    noisy = sample + sigma.view(-1, 1, 1, 1) * torch.randn_like(sample)
    with torch.no_grad():
        denoised = consistency_function(network, noisy, sigma, sigma_min)
    expected = (edm_loss_weight(sigma) * (denoised - sample).square().mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["sigma_mean"], sigma.mean())
    assert ((sigma >= sigma_min) & (sigma <= sigma_max)).all()

    # teacher target: a teacher that is the student's own denoiser leaves nothing to learn
    def same_denoiser(x, sigma_b, class_labels=None):
        return consistency_function(network, x, sigma_b, sigma_min)

    with torch.no_grad():
        loss, _ = DenoiserLoss(same_denoiser, sigma_min=sigma_min)(network, None, sample, Levels(0, 0.0))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)

    # clip_denoised clamps the teacher's output: a teacher answering 5 is the same as one answering 1
    def loss_with(teacher, clip):
        torch.manual_seed(7)
        with torch.no_grad():
            loss_fn = DenoiserLoss(teacher, clip_denoised=clip, sigma_min=sigma_min)
            return loss_fn(network, None, sample, Levels(0, 0.0))[0]

    def fives(x, sigma_b, class_labels=None):
        return torch.full_like(x, 5.0)

    def ones(x, sigma_b, class_labels=None):
        return torch.ones_like(x)

    torch.testing.assert_close(loss_with(fives, True), loss_with(ones, False))
    assert loss_with(fives, False) > loss_with(ones, False)


def test_build_loss_wires_each_mode():
    cd = build_loss("cd", l2, teacher=lambda x, s, class_labels=None: x, ode_solver="euler")
    assert isinstance(cd.next_point, TeacherODEStep) and cd.weighting is unit_weight
    ict = build_loss("ict", PseudoHuber())
    assert (
        isinstance(ict.next_point, DataPointStep)
        and ict.sample_sigmas.lognormal
        and ict.weighting is inverse_gap_weight
    )
    assert isinstance(build_loss("ect", l2).sample_sigmas, ECTPairs)
    assert not build_loss("ct", l2).sample_sigmas.lognormal
    with pytest.raises(ValueError, match="teacher"):
        build_loss("cd", l2)


# ----------------------------------------------------------------------------------------------------------------
# Curricula from the global step


def test_curricula_at_known_steps():
    cd = Curriculum("cd", 1000, num_scales=40, target_ema=0.95)
    assert cd(0) == cd(999) == Levels(40, 0.95) and cd.uses_target_ema

    ct = Curriculum("ct", 1000, s0=2, s1=150, mu0=0.9)
    assert ct(0) == Levels(2, pytest.approx(0.9))  # N(0) = s0, mu(0) = mu0
    assert ct(1000).num_scales == 151  # N(K) = s1 + 1
    assert ct(250).num_scales == math.ceil(math.sqrt(0.25 * (151**2 - 4) + 4) - 1) + 1 == 76
    assert ct(250).target_ema == pytest.approx(math.exp(2 * math.log(0.9) / 76))

    ict = Curriculum("ict", 1000, s0=10, s1=1280)  # K' = floor(1000 / (log2(128) + 1)) = 125
    assert [ict(k).num_scales for k in (0, 124, 125, 250, 874, 875, 999)] == [11, 11, 21, 41, 641, 1281, 1281]
    assert ict(500).target_ema == 0.0 and not ict.uses_target_ema

    ect = Curriculum("ect", 800, num_stages=8)
    assert [ect(k).stage for k in (0, 99, 100, 799, 800)] == [0, 0, 1, 7, 7]
