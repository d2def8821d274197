"""The serving model class on a continuous-time (TrigFlow, sCT / sCD) model: generation and editing go through the
same pipeline calls as for the discrete models, so the served images equal the pipeline's for the same seed; the
schedule fields mean what they mean for the pipeline (TrigFlow times as `timesteps`, EDM noise levels as `sigmas`)."""

import asyncio
import io

import numpy as np
import pytest
import torch
from helpers import make_tiny_unet
from PIL import Image

pytest.importorskip("pydantic")

from cm_diffusers import ConsistencyPipeline  # noqa: E402
from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler  # noqa: E402


@pytest.fixture(scope="module")
def trigflow_model(tmp_path_factory):
    from cm_diffusers.serving.model import ConsistencyModel
    from cm_diffusers.serving.schemas import ServerSettings

    folder = tmp_path_factory.mktemp("trigflow")
    scheduler = TrigFlowSCMScheduler(sigma_max=80.0, time_input="log_sigma")
    ConsistencyPipeline(make_tiny_unet(sample_size=8, seed=4), scheduler).save_pretrained(folder)
    settings = ServerSettings(model=str(folder), max_batch_size=4, batch_wait_ms=20)
    pipe = ConsistencyPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return ConsistencyModel(settings.model_dump()), pipe


def _request(**kwargs):
    from cm_diffusers.serving.schemas import GenerateRequest

    return GenerateRequest(**kwargs).model_dump()


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in result["images"]])


@pytest.mark.parametrize("schedule", [{}, {"num_inference_steps": 2}, {"sigmas": [80.0, 0.8]}])
def test_served_trigflow_images_equal_the_pipeline(trigflow_model, schedule):
    model, pipe = trigflow_model
    assert pipe.is_trigflow
    result = asyncio.run(model.generate(_request(num_images=3, seed=5, **schedule)))
    assert "error" not in result, result
    expected = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), output_type="np", **schedule).images
    got = _pixels(result)
    assert got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got, (expected[..., 0] * 255).round().astype(np.uint8))
    assert result["nfe"] == max(1, schedule.get("num_inference_steps", len(schedule.get("sigmas", [0]))))


def test_served_trigflow_inpainting_equals_the_pipeline_and_keeps_known_pixels(trigflow_model):
    model, pipe = trigflow_model
    image = Image.fromarray(np.linspace(0, 255, 64).reshape(8, 8).astype(np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255  # the right half is generated
    options = {"seed": 3, "num_inference_steps": 2, "output_format": "png"}
    result = asyncio.run(model.edit("inpaint", image, Image.fromarray(mask), options))
    assert "error" not in result, result
    got = np.asarray(Image.open(io.BytesIO(result["images"][0])))
    expected = pipe.inpaint(image, Image.fromarray(mask), num_inference_steps=2,
                            generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(expected))
    np.testing.assert_array_equal(got[:, :4], np.asarray(image)[:, :4])
