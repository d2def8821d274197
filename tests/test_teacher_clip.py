"""CD's teacher step with `clip_denoised`: D is clamped to [-1, 1] before the ODE step (DDPM's clip_sample)."""

import torch

from cm_diffusers.losses import TeacherODEStep
from cm_diffusers.parameterization import euler_step, heun_step


def wild_teacher(x, sigma, class_labels=None):
    return 50.0 * torch.tanh(x)  # an x0 estimate far outside the data range


def test_clip_denoised_clamps_the_teacher_inside_both_solvers():
    x = torch.randn(3, 1, 4, 4) * 10
    sigma, sigma_next = torch.full((3,), 10.0), torch.full((3,), 7.0)
    s, s_next = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)

    def clamped(x_, _):
        return wild_teacher(x_, None).clamp(-1, 1)

    out = TeacherODEStep(wild_teacher, "euler", clip_denoised=True)(x, sigma, sigma_next, None, None)
    torch.testing.assert_close(out, euler_step(x, s, s_next, clamped(x, s)))
    out = TeacherODEStep(wild_teacher, "heun", clip_denoised=True)(x, sigma, sigma_next, None, None)
    torch.testing.assert_close(out, heun_step(clamped, x, s, s_next))
    unclipped = TeacherODEStep(wild_teacher, "heun")(x, sigma, sigma_next, None, None)
    assert (unclipped - out).abs().max() > 1.0
