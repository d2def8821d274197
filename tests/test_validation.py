"""One home for shared input checks: the list parser every command and the server use, the sigma and timestep
validators (errors carry the field they name), the data readers training and evaluation share, and the
deprecated old names that still work with a warning."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from cm_diffusers.argtypes import number_list
from cm_diffusers.data import image_mode, resize_center_crop
from cm_diffusers.validation import InputError, parse_list, validate_sigmas, validate_timesteps


@pytest.mark.parametrize("text, kind, expected", [
    ("22,0", int, [22, 0]), (" 22, 0 ,", int, [22, 0]), ("80,0.821", float, [80.0, 0.821]), ("1e-3", float, [0.001]),
])
def test_parse_list_reads_comma_separated_numbers(text, kind, expected):
    assert parse_list(text, kind, "timesteps") == expected


@pytest.mark.parametrize("text, kind, low", [
    ("2 2", int, None), ("1.5", int, None), ("", int, None), (",", float, None), ("nan", float, None),
    ("inf,1", float, None), ("1e999", float, None), ("-1,0", int, 0), ("abc", float, None),
])
def test_parse_list_errors_name_the_field(text, kind, low):
    with pytest.raises(InputError, match="^my_field must") as info:
        parse_list(text, kind, "my_field", low)
    assert info.value.field == "my_field" and isinstance(info.value, ValueError)


def test_number_list_is_an_argparse_type_naming_the_flag():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--timesteps", type=number_list(int, "--timesteps", low=0))
    assert parser.parse_args(["--timesteps", "22,0"]).timesteps == [22, 0]
    with pytest.raises(argparse.ArgumentError, match="--timesteps must list integers >= 0"):
        parser.parse_args(["--timesteps", "3,-1"])


@pytest.mark.parametrize("sigmas, message", [
    ([], "non-empty"), ([1.0, float("nan")], "finite"), ([1.0, 2.0], "strictly descending"), ([[1.0]], "1-D"),
    ([100.0, 1.0], "sigma_max=80.0"), ([1.0, 0.001], "sigma_min=0.002"), (["a"], "finite"), ([10**400], "finite"),
])
def test_validate_sigmas_errors_carry_the_field(sigmas, message):
    with pytest.raises(InputError, match=message) as info:
        validate_sigmas(sigmas, 0.002, 80.0, field="sigmas")
    assert info.value.field == "sigmas"


def test_validate_sigmas_accepts_float32_end_points_and_tensors():
    ends = torch.tensor([80.0, 0.002], dtype=torch.float32)  # both round away from the float64 limits
    assert validate_sigmas(ends, 0.002, 80.0).tolist() == pytest.approx([80.0, 0.002])
    assert validate_sigmas(np.array([3.0, 0.0]), 0.0, min_length=2).tolist() == [3.0, 0.0]
    with pytest.raises(InputError, match="at least 2"):
        validate_sigmas([3.0], 0.0, min_length=2)


@pytest.mark.parametrize("timesteps", [[], [1.5], [True], [0, 3], [40], [-1], [10**20], [float("inf")], "22"])
def test_validate_timesteps_refuses_with_the_field(timesteps):
    with pytest.raises(InputError) as info:
        validate_timesteps(timesteps, 40)
    assert info.value.field == "timesteps"


def test_validate_timesteps_accepts_integral_values():
    assert validate_timesteps([22, 0.0, ], 40).tolist() == [22, 0]
    assert validate_timesteps(torch.tensor([39, 5]), 40).dtype == np.int64


def test_training_and_fid_reference_see_the_same_pixels():
    """training/data.py's preprocessing and the FID reference both resize and crop through cm_diffusers.data."""
    from cm_diffusers.evaluation.reference import _pil_to_uint8
    from training.data import preprocess_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8))
    trained = preprocess_image(image, 16, image_mode(image))
    reference = _pil_to_uint8(image, 16)
    assert torch.equal(((trained + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(reference.copy()))
    assert resize_center_crop(image, 16).size == (16, 16) and image_mode(Image.new("I;16", (2, 2))) == "L"


def test_old_names_still_work_with_a_deprecation_warning():
    import cm_diffusers.safety as safety
    import cm_diffusers.sampling as sampling
    from cm_diffusers.files import atomic_output
    from cm_diffusers.teacher_sampling import sample_teacher

    with pytest.warns(FutureWarning, match="cm_diffusers.files.atomic_output"):
        assert safety.atomic_output is atomic_output
    with pytest.warns(FutureWarning, match="validation.parse_list"):
        assert safety.int_list("22,0", "--timesteps") == [22, 0]
    with pytest.warns(FutureWarning, match="cm_diffusers.teacher_sampling.sample_teacher"):
        assert sampling.sample_teacher is sample_teacher
    from helpers import make_tiny_unet

    from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler

    pipe = ConsistencyPipeline(unet=make_tiny_unet(), scheduler=ConsistencyScheduler())
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 5
    with pytest.warns(FutureWarning, match="clip_denoised=False"):
        raw = pipe.denoise_raw(x, 1.0)
    assert torch.equal(raw, pipe.consistency_function(x, 1.0, clip_denoised=False))
    assert torch.equal(pipe.consistency_function(x, 1.0), raw.clamp(-1, 1))


def test_consistency_edit_takes_clip_denoised_and_the_old_clamp_keyword():
    from cm_diffusers import IdentityTransform, consistency_edit

    def f(x, sigma):
        return x * 3  # out of [-1, 1]: the clamp decides the result

    y = torch.full((1, 1, 4, 4), 0.5)
    z = torch.zeros_like(y)
    clipped = consistency_edit(f, y, IdentityTransform(), None, [1.0], latents=z, start_from_reference=True)
    raw = consistency_edit(f, y, IdentityTransform(), None, [1.0], latents=z, clip_denoised=False,
                           start_from_reference=True)
    assert clipped.max() == 1.0 and raw.max() == 1.5  # x = y + 1.0 z = y, f(y) = 1.5
    with pytest.warns(FutureWarning, match="clip_denoised"):
        assert torch.equal(consistency_edit(f, y, IdentityTransform(), None, [1.0], latents=z, clamp=False,
                                                start_from_reference=True), raw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'clmap'"):
        consistency_edit(f, y, IdentityTransform(), None, [1.0], clmap=False)
