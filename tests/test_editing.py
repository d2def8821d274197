"""Zero-shot editing (Algorithm 4): the properties that define each task, the transforms, slerp, errors, the CLI."""

import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from helpers import make_tiny_unet
from PIL import Image

from cm_diffusers import (
    ColorizationTransform,
    ConsistencyPipeline,
    ConsistencyScheduler,
    IdentityTransform,
    LinearTransform,
    SuperResolutionTransform,
    consistency_edit,
    slerp,
)
from cm_diffusers.cli import main as cli_main

LUMA = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
STEPS = dict(num_inference_steps=3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def luma(x):
    return (x * LUMA).sum(1)


def toy_consistency_fn(x, sigma):
    """A deterministic stand-in for f(x, sigma) that moves every pixel, well outside [-1, 1] too."""
    return 3 * torch.sin(x) + 0.1 * sigma.view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def pipe_gray():
    pipe = ConsistencyPipeline(make_tiny_unet(in_channels=1), ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe_rgb():
    pipe = ConsistencyPipeline(make_tiny_unet(in_channels=3), ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def test_colorization_basis_is_orthogonal_with_luma_first_column():
    Q = ColorizationTransform().Q.double()
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    luma_direction = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    torch.testing.assert_close(Q[:, 0], luma_direction / luma_direction.norm(), atol=1e-7, rtol=0)
    x = torch.rand(2, 3, 5, 7, generator=gen()) * 2 - 1
    transform = ColorizationTransform()
    torch.testing.assert_close(transform.inverse(transform.forward(x)), x, atol=1e-6, rtol=0)
    # Coefficient 0 is the luma, up to the norm of the weights.
    torch.testing.assert_close(transform.forward(x)[:, 0] * luma_direction.norm().item(), luma(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("patch_size, shape", [(1, (1, 1, 4, 4)), (2, (2, 1, 8, 6)), (3, (1, 2, 9, 6)),
                                                (4, (2, 3, 16, 16))])
def test_super_resolution_basis_is_orthogonal_and_keeps_patch_means(patch_size, shape):
    transform = SuperResolutionTransform(patch_size)
    Q = transform.Q.double()
    n = patch_size**2
    torch.testing.assert_close(Q.T @ Q, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q[:, 0], torch.full((n,), 1 / patch_size, dtype=torch.float64), atol=1e-7, rtol=0)
    x = torch.randn(shape, generator=gen(1))
    coeffs = transform.forward(x)
    torch.testing.assert_close(transform.inverse(coeffs), x, atol=1e-5, rtol=0)
    means = torch.nn.functional.avg_pool2d(x, patch_size)
    torch.testing.assert_close(coeffs[..., ::patch_size, ::patch_size], patch_size * means, atol=1e-5, rtol=0)
    mask = transform.mask_like(x)
    assert mask.sum().item() == x.shape[2] * x.shape[3] - means.shape[2] * means.shape[3]


def test_super_resolution_transform_errors():
    with pytest.raises(ValueError, match="patch_size"):
        SuperResolutionTransform(0)
    with pytest.raises(ValueError, match="must divide"):
        SuperResolutionTransform(3).forward(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        ColorizationTransform().forward(torch.zeros(1, 1, 4, 4))


def test_linear_transform_matrix_and_callables():
    x = torch.randn(2, 3, 4, 4, generator=gen(2))
    channel_mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0.1, 0.0, 1.0]])
    per_pixel = LinearTransform(channel_mix)
    torch.testing.assert_close(per_pixel.forward(x), torch.einsum("dc,bchw->bdhw", channel_mix, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_pixel.inverse(per_pixel.forward(x)), x, atol=1e-6, rtol=0)
    full = LinearTransform(torch.randn(48, 48, generator=gen(3)) + 8 * torch.eye(48))
    torch.testing.assert_close(full.inverse(full.forward(x)), x, atol=1e-5, rtol=0)
    flip = LinearTransform(forward=lambda t: t.flip(-1), inverse=lambda t: t.flip(-1))
    torch.testing.assert_close(flip.forward(x), x.flip(-1))

    with pytest.raises(ValueError, match="singular"):
        LinearTransform(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="square"):
        LinearTransform(torch.ones(2, 3))
    with pytest.raises(ValueError, match="either"):
        LinearTransform()
    with pytest.raises(ValueError, match="either"):
        LinearTransform(torch.eye(3), forward=lambda t: t)
    with pytest.raises(ValueError, match="both"):
        LinearTransform(forward=lambda t: t)
    with pytest.raises(ValueError, match="fits neither"):
        LinearTransform(torch.eye(5)).forward(x)


# ----------------------------------------------------------------------------------------------------------------
# slerp


def test_slerp_endpoints_and_norm():
    a = torch.randn(3, 2, 4, 4, generator=gen(4))
    b = torch.randn(3, 2, 4, 4, generator=gen(5))
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # equal norms per sample
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    for alpha in (0.25, 0.5, 0.9):
        mid = slerp(a, b, alpha)
        torch.testing.assert_close(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), atol=1e-4, rtol=1e-5)
    # The angle moves linearly: at alpha 0.5 the result bisects the angle between a and b.
    mid = slerp(a, b, 0.5).flatten(1)
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(cos(mid, a.flatten(1)), cos(mid, b.flatten(1)), atol=1e-5, rtol=0)
    # Parallel inputs fall back to linear interpolation instead of dividing by sin(0).
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)
    with pytest.raises(ValueError, match="same shape"):
        slerp(a, b[:2], 0.5)


# ----------------------------------------------------------------------------------------------------------------
# consistency_edit with a plain callable


def test_consistency_edit_known_region_first_input_and_clamp():
    y = torch.rand(2, 1, 8, 8, generator=gen(6)) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    sigmas = [80.0, 5.0, 0.5]
    inputs = []

    def recording_fn(x, sigma):
        inputs.append((x.clone(), sigma.clone()))
        return toy_consistency_fn(x, sigma)

    out = consistency_edit(recording_fn, y, IdentityTransform(), mask, sigmas, generator=gen(7))
    assert torch.equal(out * (1 - mask), y * (1 - mask))  # exactly the input where the mask is 0
    assert out.abs().max() <= 1  # f's output (up to 3.1) was clamped before projecting
    assert (out * mask).abs().max() > 0.1
    # y <- A^-1[(A y)(1 - Omega)], then x = y + sigma_1 z with z from the generator
    z = randn_tensor(y.shape, generator=gen(7))
    torch.testing.assert_close(inputs[0][0], y * (1 - mask) + 80.0 * z, atol=1e-5, rtol=0)
    assert [s[0].item() for _, s in inputs] == pytest.approx(sigmas)
    assert all(s.shape == (2,) for _, s in inputs)


def test_consistency_edit_can_start_from_the_whole_reference():
    """SDEdit: with Omega = 1 the first line of Algorithm 4 would zero y; start_from_reference keeps it."""
    y = torch.rand(1, 1, 4, 4, generator=gen(22)) * 2 - 1
    inputs = []
    consistency_edit(lambda x, s: inputs.append(x.clone()) or x, y, IdentityTransform(), None, [2.0],
                     generator=gen(0), start_from_reference=True)
    consistency_edit(lambda x, s: inputs.append(x.clone()) or x, y, IdentityTransform(), None, [2.0],
                     generator=gen(0))
    z = randn_tensor(y.shape, generator=gen(0))
    torch.testing.assert_close(inputs[0], y + 2.0 * z, atol=1e-6, rtol=0)
    torch.testing.assert_close(inputs[1], 2.0 * z, atol=1e-6, rtol=0)


def test_consistency_edit_with_all_free_mask_is_multistep_sampling():
    """Omega = 1 and y = 0: Algorithm 4 reduces to Algorithm 1 (x = s0 z, f, x += sqrt(s^2 - eps^2) z, f)."""
    sigmas, eps = [10.0, 1.0], 0.002
    z0 = torch.randn(2, 1, 4, 4, generator=gen(8))
    out = consistency_edit(toy_consistency_fn, torch.zeros_like(z0), IdentityTransform(), None, sigmas,
                           generator=gen(9), sigma_min=eps, clip_denoised=False, latents=z0)
    g = gen(9)
    x = toy_consistency_fn(sigmas[0] * z0, torch.full((2,), sigmas[0]))
    x = x + math.sqrt(sigmas[1] ** 2 - eps**2) * randn_tensor(z0.shape, generator=g)
    x = toy_consistency_fn(x, torch.full((2,), sigmas[1]))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_consistency_edit_seeded_calls_repeat():
    y = torch.rand(1, 3, 8, 8, generator=gen(10)) * 2 - 1
    transform = ColorizationTransform()
    run = lambda seed: consistency_edit(  # noqa: E731
        toy_consistency_fn, y, transform, transform.mask_like(y), [20.0, 2.0], generator=gen(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    torch.testing.assert_close(luma(run(0)), luma(y), atol=1e-5, rtol=0)


def test_consistency_edit_errors():
    y = torch.zeros(1, 1, 4, 4)
    f, identity = toy_consistency_fn, IdentityTransform()
    with pytest.raises(ValueError, match="strictly descending"):
        consistency_edit(f, y, identity, None, [1.0, 2.0])
    with pytest.raises(ValueError, match="sigma_min"):
        consistency_edit(f, y, identity, None, [1.0, 0.001])
    with pytest.raises(ValueError, match="non-empty"):
        consistency_edit(f, y, identity, None, [])
    with pytest.raises(ValueError, match="broadcast"):
        consistency_edit(f, y, identity, torch.ones(1, 1, 3, 3), [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        consistency_edit(f, y, identity, torch.full((1, 1, 4, 4), 1.5), [1.0])
    with pytest.raises(ValueError, match="latents"):
        consistency_edit(f, y, identity, None, [1.0], latents=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="forward"):
        consistency_edit(f, y, object(), None, [1.0])
    with pytest.raises(ValueError, match="batch, channels"):
        consistency_edit(f, torch.zeros(4, 4), identity, None, [1.0])
    not_inverse = LinearTransform(forward=lambda t: 2 * t, inverse=lambda t: t)
    with pytest.raises(ValueError, match="invertible"):
        consistency_edit(f, y, not_inverse, None, [1.0])
    singular = LinearTransform(forward=lambda t: t * 0, inverse=lambda t: t)
    with pytest.raises(ValueError, match="invertible"):
        consistency_edit(f, y, singular, None, [1.0])


# ----------------------------------------------------------------------------------------------------------------
# Pipeline methods on tiny UNets


def test_inpaint_keeps_the_known_region(pipe_gray):
    image = torch.rand(2, 1, 16, 16, generator=gen(11))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 2:10] = 255  # white = regenerate
    mask_image = Image.fromarray(mask)
    out = pipe_gray.inpaint(image, mask_image, generator=gen(0), output_type="latent", **STEPS).images
    keep = torch.from_numpy(mask == 0)
    assert torch.equal(out[..., keep], (image * 2 - 1)[..., keep])
    assert (out - (image * 2 - 1))[..., ~keep].abs().max() > 0.1  # the masked region was regenerated
    # Seeded calls repeat; another seed changes the regenerated region only.
    again = pipe_gray.inpaint(image, mask_image, generator=gen(0), output_type="latent", **STEPS).images
    other = pipe_gray.inpaint(image, mask_image, generator=gen(1), output_type="latent", **STEPS).images
    assert torch.equal(out, again)
    assert torch.equal(other[..., keep], out[..., keep]) and not torch.allclose(other, out)


def test_inpaint_input_formats_agree(pipe_gray):
    image = torch.rand(1, 1, 16, 16, generator=gen(12))
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    run = lambda img, **kw: pipe_gray.inpaint(  # noqa: E731
        img, mask, generator=gen(3), output_type="np", num_inference_steps=1, **kw).images
    reference = run(image)
    assert reference.shape == (1, 16, 16, 1)
    np.testing.assert_allclose(run(image * 2 - 1, input_range=(-1, 1)), reference, atol=1e-6)
    np.testing.assert_allclose(run(image[0, 0].numpy()), reference, atol=1e-6)  # HW numpy
    uint8 = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(uint8[..., 0])
    np.testing.assert_allclose(run(pil), run(uint8), atol=1e-6)
    np.testing.assert_allclose(run(pil), reference, atol=1 / 255)
    pil_out = pipe_gray.inpaint(pil, mask, generator=gen(3), num_inference_steps=1).images[0]
    assert pil_out.size == (16, 16) and pil_out.mode == "L"


def test_colorize_keeps_luma(pipe_rgb):
    gray = torch.rand(2, 1, 16, 16, generator=gen(13))
    out = pipe_rgb.colorize(gray, generator=gen(0), output_type="latent", **STEPS).images
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(luma(out), luma((gray * 2 - 1).expand(-1, 3, -1, -1)), atol=2e-6, rtol=0)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-2  # colors appeared: the channels differ
    color = torch.rand(1, 3, 16, 16, generator=gen(14))
    out = pipe_rgb.colorize(color, generator=gen(0), output_type="latent", **STEPS).images
    torch.testing.assert_close(luma(out), luma(color * 2 - 1), atol=2e-6, rtol=0)


def test_colorize_needs_an_rgb_model(pipe_gray):
    with pytest.raises(ValueError, match="RGB model"):
        pipe_gray.colorize(torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize("scale_factor", [2, 4])
def test_super_resolve_keeps_patch_means(pipe_gray, scale_factor):
    low = torch.rand(2, 1, 16 // scale_factor, 16 // scale_factor, generator=gen(15))
    out = pipe_gray.super_resolve(low, scale_factor, generator=gen(0), output_type="latent", **STEPS).images
    assert out.shape == (2, 1, 16, 16)
    means = torch.nn.functional.avg_pool2d(out, scale_factor)
    torch.testing.assert_close(means, low * 2 - 1, atol=2e-6, rtol=0)
    nearest = (low * 2 - 1).repeat_interleave(scale_factor, 2).repeat_interleave(scale_factor, 3)
    assert (out - nearest).abs().max() > 1e-2  # detail was generated inside the patches


def test_super_resolve_errors(pipe_gray):
    with pytest.raises(ValueError, match="does not divide"):
        pipe_gray.super_resolve(torch.rand(1, 1, 5, 5), 3)
    with pytest.raises(ValueError, match="must be 4x4"):
        pipe_gray.super_resolve(torch.rand(1, 1, 8, 8), 4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            pipe_gray.super_resolve(torch.rand(1, 1, 8, 8), bad)


def test_stroke_edit_default_levels_and_errors(pipe_gray):
    assert pipe_gray.default_stroke_sigmas() == pytest.approx([5.38, 2.24])
    small = ConsistencyPipeline(pipe_gray.unet, ConsistencyScheduler(sigma_max=40.0))
    assert small.default_stroke_sigmas() == pytest.approx([2.69, 1.12])
    strokes = torch.rand(1, 1, 16, 16, generator=gen(16))
    out = pipe_gray.stroke_edit(strokes, generator=gen(0), output_type="latent").images
    # SDEdit = Algorithm 4 with Omega = 1 at the two default levels
    expected = consistency_edit(pipe_gray.consistency_function, strokes * 2 - 1, IdentityTransform(), None,
                                [5.38, 2.24], generator=gen(0), start_from_reference=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="intermediate noise level"):
        pipe_gray.stroke_edit(strokes, num_inference_steps=2)
    with pytest.raises(ValueError, match="sigma_max"):
        pipe_gray.stroke_edit(strokes, sigmas=[100.0, 2.0])


def test_denoise_is_one_evaluation(pipe_gray):
    noisy = torch.rand(2, 1, 16, 16, generator=gen(17))
    out = pipe_gray.denoise(noisy, 0.5, output_type="latent").images
    torch.testing.assert_close(out, pipe_gray.consistency_function(noisy * 2 - 1, 0.5), atol=0, rtol=0)
    noised = pipe_gray.denoise(noisy, 0.5, add_noise=True, generator=gen(0), output_type="latent").images
    z = randn_tensor(noisy.shape, generator=gen(0))
    torch.testing.assert_close(noised, pipe_gray.consistency_function(noisy * 2 - 1 + 0.5 * z, 0.5), atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="sigma_min"):
        pipe_gray.denoise(noisy, 1000.0)
    with pytest.raises(ValueError, match="number"):
        pipe_gray.denoise(noisy, "0.5")


def test_interpolate_endpoints_match_one_step_sampling(pipe_gray):
    a = torch.randn(2, 1, 16, 16, generator=gen(18))
    b = torch.randn(2, 1, 16, 16, generator=gen(19))
    frames = pipe_gray.interpolate(a, b, num_frames=3, output_type="latent").images
    assert frames.shape == (6, 1, 16, 16)  # frame-major: frame 0 of both samples, then frame 1, ...
    sample_a = pipe_gray(batch_size=2, latents=a, num_inference_steps=1, output_type="latent").images
    sample_b = pipe_gray(batch_size=2, latents=b, num_inference_steps=1, output_type="latent").images
    torch.testing.assert_close(frames[:2], sample_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[4:], sample_b, atol=1e-5, rtol=0)
    assert not torch.allclose(frames[2:4], sample_a, atol=1e-3)
    # Without latents, both noises come from the generator: seeded calls repeat.
    run = lambda: pipe_gray.interpolate(alphas=[0.0, 0.3], generator=gen(5), output_type="latent").images  # noqa: E731
    assert torch.equal(run(), run())
    with pytest.raises(ValueError, match="exactly one"):
        pipe_gray.interpolate(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        pipe_gray.interpolate(a, b, num_frames=3, alphas=[0.5])
    with pytest.raises(ValueError, match=">= 2"):
        pipe_gray.interpolate(a, b, num_frames=1)
    with pytest.raises(ValueError, match="latents_b"):
        pipe_gray.interpolate(a, torch.randn(1, 3, 16, 16), num_frames=2)


def test_edit_with_a_custom_transform(pipe_rgb):
    image = torch.rand(1, 3, 16, 16, generator=gen(20))
    matrix = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])  # invertible, not orthogonal
    transform = LinearTransform(matrix)
    mask = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)  # keep R + G + B
    out = pipe_rgb.edit(image, transform, mask, generator=gen(0), output_type="latent", **STEPS).images
    torch.testing.assert_close(out.sum(1), (image * 2 - 1).sum(1), atol=1e-5, rtol=0)
    # The built-in transforms bring their own mask.
    sr = pipe_rgb.edit(image, SuperResolutionTransform(4), generator=gen(0), output_type="latent", **STEPS).images
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(sr, 4), torch.nn.functional.avg_pool2d(image * 2 - 1, 4),
                               atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="Pass `mask`"):
        pipe_rgb.edit(image, transform)
    with pytest.raises(ValueError, match="broadcast"):
        pipe_rgb.edit(image, transform, torch.ones(1, 2, 1, 1))


def test_class_conditional_edit_follows_labels():
    pipe = ConsistencyPipeline(make_tiny_unet(num_class_embeds=4), ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    image, mask = torch.rand(2, 1, 16, 16, generator=gen(21)), torch.ones(16, 16)
    run = lambda labels, seed=0: pipe.inpaint(image, mask, class_labels=labels, generator=gen(seed),  # noqa: E731
                                              output_type="latent", **STEPS).images
    assert torch.equal(run(None), run(None))  # random labels come from the generator too
    assert not torch.allclose(run([0, 0]), run([3, 3]))
    with pytest.raises(ValueError, match="class labels"):
        run([0, 1, 2])


def test_input_errors(pipe_gray, pipe_rgb):
    image, mask = torch.rand(1, 1, 16, 16), torch.ones(16, 16)
    with pytest.raises(ValueError, match="must be 16x16"):
        pipe_gray.inpaint(torch.rand(1, 1, 8, 8), torch.ones(8, 8))
    with pytest.raises(ValueError, match="3 channel"):
        pipe_gray.inpaint(Image.new("RGB", (16, 16)), mask)
    with pytest.raises(ValueError, match="1 channel"):
        pipe_rgb.inpaint(image, mask)
    with pytest.raises(ValueError, match="same height and width"):
        pipe_gray.inpaint(image, torch.ones(8, 8))
    with pytest.raises(ValueError, match="1 channel or 1"):
        pipe_gray.inpaint(image, torch.ones(2, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe_gray.inpaint(image, torch.full((16, 16), 2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe_gray.inpaint(image, -mask)
    with pytest.raises(ValueError, match="input_range"):
        pipe_gray.inpaint(image * 2 - 1 - 0.5, mask)  # [-1, 1] data read as [0, 1]
    with pytest.raises(ValueError, match="input_range"):
        pipe_gray.inpaint(image, mask, input_range=(1, 0))
    with pytest.raises(ValueError, match="PIL images, numpy arrays or torch tensors"):
        pipe_gray.inpaint("image.png", mask)
    with pytest.raises(ValueError, match="float or uint8"):
        pipe_gray.inpaint(np.zeros((16, 16), dtype=np.int64), mask)
    with pytest.raises(ValueError, match="output_type"):
        pipe_gray.inpaint(image, mask, output_type="jpg")
    with pytest.raises(ValueError, match="exactly one"):
        pipe_gray.inpaint(image, mask, num_inference_steps=2, sigmas=[1.0])


# ----------------------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, pipe_gray, pipe_rgb):
    root = tmp_path_factory.mktemp("models")
    pipe_gray.save_pretrained(root / "gray")
    pipe_rgb.save_pretrained(root / "rgb")
    return root


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_cli_writes_pngs_for_every_task(saved_models, tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = _png(tmp_path / "gray.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    low = _png(tmp_path / "low.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    mask = _png(tmp_path / "mask.png", mask)
    gray_model, rgb_model = str(saved_models / "gray"), str(saved_models / "rgb")
    common = ["--device", "cpu", "--seed", "1"]
    runs = {
        "inpaint": (gray_model, ["--image", gray, "--mask", mask, "--steps", "2"], (16, 16), "L"),
        "colorize": (rgb_model, ["--image", gray, "--timesteps", "30,10"], (16, 16), "RGB"),
        "super-resolve": (gray_model, ["--image", low, "--scale_factor", "4", "--steps", "2"], (16, 16), "L"),
        "stroke": (gray_model, ["--image", gray, "--sigmas", "6,2"], (16, 16), "L"),
        "denoise": (gray_model, ["--image", gray, "--sigma", "0.5", "--add_noise"], (16, 16), "L"),
        "interpolate": (gray_model, ["--num_frames", "4"], (4 * 18 + 2, 18 + 2), "L"),
    }
    for task, (model, extra, size, mode) in runs.items():
        output = tmp_path / f"{task}.png"
        assert cli_main(["edit", task, "--model", model, "--output", str(output), *common, *extra]) == 0, task
        with Image.open(output) as image:
            assert image.size == size and image.mode == mode, task
    # The known region of the inpainted PNG is the input PNG's, pixel for pixel.
    with Image.open(tmp_path / "inpaint.png") as out, Image.open(gray) as src, Image.open(mask) as m:
        keep = np.asarray(m) == 0
        np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(src)[keep])
    # Several samples form a grid.
    grid = tmp_path / "grid.png"
    assert cli_main(["edit", "stroke", "--model", gray_model, "--image", gray, "--num_samples", "2", "--output",
                     str(grid), *common]) == 0
    with Image.open(grid) as image:
        assert image.size == (2 * 18 + 2, 18 + 2)


def test_cli_reports_input_errors(saved_models, tmp_path, capsys):
    gray_model = str(saved_models / "gray")
    gray = _png(tmp_path / "gray.png", np.zeros((16, 16), dtype=np.uint8))
    assert cli_main(["edit", "super-resolve", "--model", gray_model, "--image", gray, "--scale_factor", "3"]) == 1
    assert "does not divide" in capsys.readouterr().err
    assert cli_main(["edit", "colorize", "--model", gray_model, "--image", gray]) == 1
    assert "RGB model" in capsys.readouterr().err
    missing = str(tmp_path / "missing.png")
    assert cli_main(["edit", "inpaint", "--model", gray_model, "--image", gray, "--mask", missing]) == 1
    assert "No such image" in capsys.readouterr().err
    assert cli_main(["edit", "inpaint", "--model", gray_model, "--image", gray, "--mask", gray, "--steps", "2",
                     "--sigmas", "1"]) == 1
    assert "at most one" in capsys.readouterr().err
