"""The round trips diffusers users do with a pipeline folder, checked against diffusers' own
`ConsistencyModelPipeline` on the same folder: pickled (`.bin`) weights, variants, dtypes; and a pickle that would run
code is never executed."""

import pickle

import pytest
import torch
from diffusers import ConsistencyModelPipeline
from helpers import make_tiny_unet

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler


@pytest.fixture
def pipe():
    pipe = ConsistencyPipeline(unet=make_tiny_unet(), scheduler=ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _weights_equal(a, b) -> bool:
    state_a, state_b = a.unet.state_dict(), b.unet.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k].float(), state_b[k].float())
                                                    for k in state_a)


def _load_both(folder, **kwargs):
    """Ours and diffusers' pipeline from the same folder with the same keywords (or the exception each raised)."""
    loaded = []
    for cls in (ConsistencyPipeline, ConsistencyModelPipeline):
        try:
            loaded.append(cls.from_pretrained(folder, **kwargs))
        except Exception as error:  # noqa: BLE001 - compared below
            loaded.append(error)
    return loaded


def test_pickled_weights_load_as_diffusers_loads_them(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert "diffusion_pytorch_model.bin" in files and not any(name.endswith(".safetensors") for name in files)
    ours, theirs = _load_both(tmp_path)
    assert isinstance(ours, ConsistencyPipeline) and isinstance(theirs, ConsistencyModelPipeline)
    assert _weights_equal(ours, pipe) and _weights_equal(theirs, pipe)
    generator = torch.Generator().manual_seed(0)
    image = ours(num_inference_steps=1, generator=generator, output_type="pt").images
    expected = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(image, expected)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_a_variant_saves_and_loads_back(pipe, tmp_path, safe_serialization):
    pipe.to(torch.float16).save_pretrained(tmp_path, variant="fp16", safe_serialization=safe_serialization)
    suffix = "safetensors" if safe_serialization else "bin"
    assert (tmp_path / "unet" / f"diffusion_pytorch_model.fp16.{suffix}").is_file()
    ours, theirs = _load_both(tmp_path, variant="fp16")
    assert isinstance(ours, ConsistencyPipeline) and isinstance(theirs, ConsistencyModelPipeline)
    assert ours.unet.dtype == theirs.unet.dtype  # diffusers loads a variant in the dtype asked for (float32 here)
    assert _weights_equal(ours, theirs) and _weights_equal(ours, pipe)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_a_wrong_variant_gives_diffusers_own_error(pipe, tmp_path, safe_serialization):
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=safe_serialization)
    ours, theirs = _load_both(tmp_path, variant="bf16")
    assert isinstance(theirs, Exception), "diffusers is expected to refuse a variant the folder does not have"
    assert type(ours) is type(theirs) and str(ours) == str(theirs)


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("keyword", [
    {"torch_dtype": torch.float16},                                   # the deprecated alias of `dtype`
    {"dtype": torch.float16},
    {"torch_dtype": {"unet": torch.float16, "default": torch.float32}},  # per component
    {"dtype": {"default": torch.bfloat16}},
], ids=["torch_dtype", "dtype", "torch_dtype_dict", "dtype_dict_default"])
def test_dtypes_load_as_in_diffusers(pipe, tmp_path, safe_serialization, keyword):
    pipe.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours, theirs = _load_both(tmp_path, **keyword)
    assert isinstance(ours, ConsistencyPipeline) and isinstance(theirs, ConsistencyModelPipeline)
    assert ours.unet.dtype == theirs.unet.dtype != torch.float32
    assert _weights_equal(ours, theirs)


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    weights.write_bytes(pickle.dumps({"conv_in.weight": Payload()}))
    with pytest.raises(ValueError, match="model.bin is a pickle that holds more than tensors") as info:
        ConsistencyPipeline.from_pretrained(tmp_path)
    assert str(weights) in str(info.value) and "nothing in it was run" in str(info.value)
    assert not marker.exists()
    with pytest.raises(Exception):  # diffusers refuses it too (weights_only=True), without saying why
        ConsistencyModelPipeline.from_pretrained(tmp_path)
    assert not marker.exists()
