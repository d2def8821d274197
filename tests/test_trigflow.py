"""TrigFlow math (Lu & Song 2024): time <-> sigma, the boundary f(x, 0) = x, the EDM equivalence, tangents."""

import math

import pytest
import torch
from diffusers import EDMEulerScheduler
from helpers import make_tiny_unet

from cm_diffusers.networks import unet_forward
from cm_diffusers.parameterization import (
    edm_scalings,
    trigflow_data_tangent,
    trigflow_function,
    trigflow_sigma,
    trigflow_t,
    trigflow_tangent_from_denoised,
    trigflow_time_input,
)
from cm_diffusers.teachers import EDMDenoiser

SIGMA_D = 0.5


def test_time_and_sigma_convert_both_ways():
    assert trigflow_t(80.0) == pytest.approx(1.56454, abs=1e-5)  # the paper's t_max for sigma_max = 80
    t = torch.linspace(0.01, 1.56, 50, dtype=torch.float64)
    torch.testing.assert_close(trigflow_t(trigflow_sigma(t, SIGMA_D), SIGMA_D), t, rtol=0, atol=1e-12)
    assert float(trigflow_sigma(math.pi / 4, 0.25)) == pytest.approx(0.25)  # t = pi/4: sigma = sigma_d
    # c_noise choices: the paper's t (scaled by 1000) and the log-sigma conventions of CM and diffusers' EDM
    sigma = trigflow_sigma(t, SIGMA_D)
    torch.testing.assert_close(trigflow_time_input(t, "t"), 1000 * t)
    torch.testing.assert_close(trigflow_time_input(t, "log_sigma"), 250 * torch.log(sigma))
    torch.testing.assert_close(trigflow_time_input(t, "edm_log_sigma"), 0.25 * torch.log(sigma))
    with pytest.raises(ValueError, match="choose one of t, log_sigma"):
        trigflow_time_input(t, "sigma")


def test_consistency_function_is_the_identity_at_t_zero():
    network = unet_forward(make_tiny_unet(seed=2))
    x = torch.randn(3, 1, 16, 16)
    zero = torch.zeros(3)
    assert torch.equal(trigflow_function(network, x, zero, SIGMA_D, time_input="t"), x)  # exactly, any weights
    # and close to it just above 0 with every time input (log sigma is undefined at t = 0 itself)
    for time_input in ("t", "log_sigma", "edm_log_sigma"):
        f = trigflow_function(network, x, torch.full((3,), 1e-6), SIGMA_D, time_input=time_input)
        torch.testing.assert_close(f, x, rtol=0, atol=1e-4)


def test_edm_scalings_are_trigonometric():
    """c_skip = cos^2 t, c_out = sigma_d sin t, c_in = cos t / sigma_d at sigma = sigma_d tan t."""
    t = torch.linspace(0.01, 1.56, 40, dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(trigflow_sigma(t, SIGMA_D), SIGMA_D)
    torch.testing.assert_close(c_skip, torch.cos(t) ** 2)
    torch.testing.assert_close(c_out, SIGMA_D * torch.sin(t))
    torch.testing.assert_close(c_in, torch.cos(t) / SIGMA_D)


@pytest.mark.parametrize(
    "c_noise_scale, time_input", [(None, "edm_log_sigma"), (1000.0, "log_sigma")], ids=["diffusers", "consistency"]
)
def test_an_edm_network_is_a_trigflow_network_with_the_sign_flipped(c_noise_scale, time_input):
    """D_edm(x_sigma, sigma) of our EDM teacher adapter == f(x_t, t) of F_trig = -F_edm at x_t = cos(t) x_sigma."""
    unet = make_tiny_unet(seed=4).double()
    config = dict(EDMEulerScheduler(sigma_data=SIGMA_D).config)
    if c_noise_scale is not None:
        config["c_noise_scale"] = c_noise_scale
    teacher = EDMDenoiser(unet, config)
    edm_network = unet_forward(unet)

    def trigflow_network(x_in, c_noise, class_labels=None):
        return -edm_network(x_in, c_noise, class_labels)

    torch.manual_seed(0)
    sigma = torch.tensor([0.01, 0.3, 2.0, 70.0], dtype=torch.float64)
    x_sigma = torch.randn(4, 1, 16, 16, dtype=torch.float64) * (1 + sigma.reshape(-1, 1, 1, 1))
    t = trigflow_t(sigma, SIGMA_D)
    x_t = torch.cos(t).reshape(-1, 1, 1, 1) * x_sigma
    torch.testing.assert_close(
        trigflow_function(trigflow_network, x_t, t, SIGMA_D, time_input=time_input),
        teacher(x_sigma, sigma),
        rtol=1e-10,
        atol=1e-10,
    )


def gaussian_flow(k, t, s):
    """The PF-ODE of data N(0, s^2 I) in TrigFlow, in closed form: x_t = k sqrt(s^2 cos^2 t + sigma_d^2 sin^2 t)."""
    return k * torch.sqrt(s**2 * torch.cos(t) ** 2 + SIGMA_D**2 * torch.sin(t) ** 2)


def test_teacher_tangent_is_dx_dt_of_a_closed_form_flow():
    """dx_t/dt from the exact denoiser D(x, sigma) = s^2 / (s^2 + sigma^2) x of Gaussian data equals the derivative
    of the closed-form trajectory (analytic, and by central differences)."""
    s = 0.8
    k = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.7, 1.2, 1.55], dtype=torch.float64).reshape(-1, 1, 1, 1, 1)
    x_t = gaussian_flow(k, t, s)
    sigma = trigflow_sigma(t, SIGMA_D)
    denoised = s**2 / (s**2 + sigma**2) * (x_t / torch.cos(t))  # D at x_sigma = x_t / cos t
    tangent = trigflow_tangent_from_denoised(x_t, t, denoised)
    closed_form = k * (SIGMA_D**2 - s**2) * torch.sin(t) * torch.cos(t) / torch.sqrt(
        s**2 * torch.cos(t) ** 2 + SIGMA_D**2 * torch.sin(t) ** 2
    )
    torch.testing.assert_close(tangent, closed_form, rtol=1e-12, atol=1e-12)
    h = 1e-6
    torch.testing.assert_close(tangent, (gaussian_flow(k, t + h, s) - gaussian_flow(k, t - h, s)) / (2 * h),
                               rtol=1e-6, atol=1e-8)  # fmt: skip


def test_data_tangent_is_the_teacher_tangent_with_the_data_point_as_denoiser():
    """sCT's cos(t) z - sin(t) x0 is the sCD tangent with D = x0 (as CT's target is CD's with D = x), and it is the
    time derivative of x_t = cos(t) x0 + sin(t) z."""
    x0, z = torch.randn(3, 1, 8, 8, dtype=torch.float64), 0.5 * torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.1, 0.8, 1.5], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_t = torch.cos(t) * x0 + torch.sin(t) * z
    tangent = trigflow_data_tangent(x0, z, t)
    torch.testing.assert_close(tangent, trigflow_tangent_from_denoised(x_t, t, x0), rtol=1e-12, atol=1e-12)
    h = 1e-6
    x_plus, x_minus = (torch.cos(t + d) * x0 + torch.sin(t + d) * z for d in (h, -h))
    torch.testing.assert_close(tangent, (x_plus - x_minus) / (2 * h), rtol=1e-6, atol=1e-8)
