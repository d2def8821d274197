"""The GPU paths: generation, editing, a training step and a serving call on CUDA with plain `.to("cuda")` (no
offloading), half-precision sampling against float32 (the max difference reported and bounded), and no CPU-GPU
synchronisation inside the sampling loop.

Marked `cuda` and skipped without a CUDA device; `benchmarks/gpu_check.py` runs them (`pytest -m cuda`) and reports
the numbers they record. CM_DIFFUSERS_CUDA_TESTS_DEVICE=cpu runs them on the CPU to check the tests' own code
without a GPU (the synchronisation checks then prove nothing: only CUDA synchronises).
"""

import asyncio
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device(os.environ.get("CM_DIFFUSERS_CUDA_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
SHIPPED = "fashion-mnist-cd"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device (none available)"),
]

# Bounds on |half - float32| of images in [0, 1], same weights and noise, shipped model, 1 and 2 steps. fp16 keeps 10
# mantissa bits, bf16 7: a pixel may move by a few of their steps through ~20 layers, the mean by far less.
# Measured on CPU (2 steps): fp16 max 0.010, mean 0.0002; bf16 max 0.047, mean 0.0012.
HALF_BOUNDS = {"float16": dict(max=0.05, mean=0.003), "bfloat16": dict(max=0.15, mean=0.015)}


def cuda_generator(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


@pytest.fixture(scope="module")
def shipped_pipe():
    return ConsistencyPipeline.from_pretrained(SHIPPED).to(DEVICE)


def test_generation_runs_on_the_device_without_offloading(shipped_pipe, tiny_unet, record_property):
    pipe = shipped_pipe
    assert pipe.device.type == DEVICE.type and pipe.unet.device.type == DEVICE.type
    assert not getattr(pipe, "_all_hooks", None)  # plain .to(): no offload hooks
    for steps in (1, 2):
        images = pipe(batch_size=4, num_inference_steps=steps, generator=cuda_generator(0), output_type="pt").images
        assert images.device.type == DEVICE.type and images.shape == (4, 1, 28, 28)
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
        again = pipe(batch_size=4, num_inference_steps=steps, generator=cuda_generator(0), output_type="pt").images
        assert torch.equal(images, again)  # seeded calls repeat on the device

    # the same latents on the CPU give the same images (TF32 convolutions on the GPU: a loose bound)
    latents = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    on_device = pipe(batch_size=4, latents=latents.to(DEVICE), output_type="pt").images.cpu()
    on_cpu = ConsistencyPipeline.from_pretrained(SHIPPED)(batch_size=4, latents=latents, output_type="pt").images
    difference = (on_device - on_cpu).abs().max().item()
    record_property("device_vs_cpu_max_abs_diff", difference)
    assert difference < 0.02

    # class-conditional: random labels from a device generator repeat, and pil output leaves the device
    conditional = ConsistencyPipeline(unet=_tiny(tiny_unet, num_class_embeds=3), scheduler=ConsistencyScheduler())
    conditional = conditional.to(DEVICE)
    first = conditional(batch_size=3, generator=cuda_generator(2), output_type="np").images
    assert np.array_equal(first, conditional(batch_size=3, generator=cuda_generator(2), output_type="np").images)
    assert len(conditional(batch_size=2, class_labels=[0, 2], output_type="pil").images) == 2


def _tiny(unet, **overrides):
    from diffusers import UNet2DModel

    return UNet2DModel.from_config({**unet.config, **overrides}).eval()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sampling_stays_close_to_float32(shipped_pipe, dtype, record_property):
    half = ConsistencyPipeline.from_pretrained(SHIPPED, dtype=getattr(torch, dtype)).to(DEVICE)
    assert half.unet.dtype == getattr(torch, dtype)
    latents = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), device="cpu").to(DEVICE)
    worst = {}
    for steps in (1, 2):
        reference = shipped_pipe(batch_size=64, latents=latents, num_inference_steps=steps,
                                 generator=cuda_generator(5), output_type="pt").images
        images = half(batch_size=64, latents=latents.to(half.unet.dtype), num_inference_steps=steps,
                      generator=cuda_generator(5), output_type="pt").images
        assert torch.isfinite(images).all()
        difference = (images.float() - reference).abs()
        worst[steps] = (difference.max().item(), difference.mean().item())
        record_property(f"{dtype}_{steps}step_max_abs_diff", worst[steps][0])
        record_property(f"{dtype}_{steps}step_mean_abs_diff", worst[steps][1])
    print(f"{dtype} vs float32 (max, mean |diff|) by steps: {worst}")
    for max_diff, mean_diff in worst.values():
        assert max_diff < HALF_BOUNDS[dtype]["max"] and mean_diff < HALF_BOUNDS[dtype]["mean"], worst


def count_synchronisations(fn) -> int:
    """CPU-GPU synchronisations during fn(), counted through torch's sync debug mode (one warning per sync)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode() if ON_CUDA else 0
        if ON_CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if ON_CUDA:
                torch.cuda.set_sync_debug_mode(previous)
                torch.cuda.synchronize()  # after the counting: an explicit synchronize would count too
    return sum("synchronizing" in str(w.message) for w in caught)


def test_sampling_loop_never_synchronises_and_a_call_at_most_once(shipped_pipe, record_property):
    from cm_diffusers.sampling import consistency_sample

    pipe = shipped_pipe
    pipe(batch_size=8, generator=cuda_generator(0), output_type="pt")  # warm-up: one-off allocations, kernel choice
    latents = torch.randn(8, 1, 28, 28, device=DEVICE, generator=cuda_generator(1))
    sigmas = pipe.sampling_sigmas(4).tolist()
    noise = cuda_generator(2)

    def loop():
        consistency_sample(pipe.consistency_function, latents, sigmas,
                           randn=lambda shape: torch.randn(shape, device=DEVICE, generator=noise))

    if ON_CUDA:  # the loop itself: any synchronising call raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            loop()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert count_synchronisations(loop) == 0

    generators = {steps: cuda_generator(3) for steps in (1, 4)}
    per_call = {steps: count_synchronisations(lambda: pipe(batch_size=8, num_inference_steps=steps,
                                                           generator=generators[steps], output_type="pt"))
                for steps in (1, 4)}
    record_property("syncs_per_call_1step", per_call[1])
    record_property("syncs_per_call_4steps", per_call[4])
    print(f"CPU-GPU synchronisations per pipeline call: {per_call}")
    assert per_call[1] == per_call[4] <= 1, per_call


def test_inpainting_on_the_device_keeps_the_known_pixels(shipped_pipe):
    image = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(28, 28)
    mask[6:20, 4:24] = 1  # 1 = regenerate
    out = shipped_pipe.inpaint(image.to(DEVICE), mask.to(DEVICE), generator=cuda_generator(0), output_type="latent",
                               num_inference_steps=2).images
    assert out.device.type == DEVICE.type
    keep = mask == 0
    assert torch.allclose(out.cpu()[..., keep], (image * 2 - 1)[..., keep], atol=1e-5)
    assert (out.cpu() - (image * 2 - 1))[..., ~keep].abs().max() > 0.1
    colorless = shipped_pipe.denoise(image.to(DEVICE), sigma=0.5, generator=cuda_generator(1), output_type="pt")
    assert colorless.images.device.type == DEVICE.type and torch.isfinite(colorless.images).all()


def test_training_step_under_accelerate_mixed_precision(tmp_path, tiny_unet, data_dir):
    from diffusers import DDPMPipeline, DDPMScheduler

    teacher = tmp_path / "teacher"
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler()).save_pretrained(teacher)
    precision = "fp16" if ON_CUDA else "bf16"  # fp16 autocast (and its gradient scaler) needs a GPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", precision, "--dynamo_backend", "no", *([] if ON_CUDA else ["--cpu"]),
               os.path.join(REPO, "training", "train_consistency.py"), "--mode", "cd",
               "--teacher_model_name_or_path", str(teacher), "--train_data_dir", str(data_dir),
               "--output_dir", str(tmp_path / "run"), "--train_batch_size", "8", "--max_train_steps", "3",
               "--num_scales", "4", "--mixed_precision", precision, "--num_validation_images", "4"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "logs" / "train_log.jsonl") as f:
        steps = [entry for entry in map(json.loads, f) if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in steps)
    if ON_CUDA:
        assert steps[-1]["cuda_max_memory_mib"] > 0  # the script ran on the GPU
    trained = ConsistencyPipeline.from_pretrained(tmp_path / "run").to(DEVICE)
    images = trained(batch_size=2, generator=cuda_generator(0), output_type="pt").images
    assert images.device.type == DEVICE.type and torch.isfinite(images).all()


def test_serving_replica_in_float16_matches_the_offline_float32_pipeline():
    from types import SimpleNamespace

    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")

    from cm_diffusers.serving.model import ConsistencyModel
    from cm_diffusers.serving.schemas import GenerateRequest, ServerSettings

    dtype = "float16" if ON_CUDA else "bfloat16"
    # Outside a Ray replica, @serve.batch only lacks the replica context it reads to warn about max_ongoing_requests.
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=100))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve, "get_replica_context", lambda: context)
        settings = ServerSettings(model=SHIPPED, device=str(DEVICE), dtype=dtype, max_batch_size=8, batch_wait_ms=20)
        replica = ConsistencyModel(settings.model_dump())
        assert replica.pipe.unet.device.type == DEVICE.type and replica.pipe.unet.dtype == getattr(torch, dtype)
        requests = [GenerateRequest(num_images=n, seed=s).model_dump() for n, s in ((1, 0), (3, 1), (8, 2))]

        async def burst():
            return await asyncio.gather(*(replica.generate(request) for request in requests))

        results = asyncio.run(burst())
    offline = ConsistencyPipeline.from_pretrained(SHIPPED)
    for request, result in zip(requests, results):
        assert "error" not in result, result
        got = np.stack([np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in result["images"]])
        expected = offline(batch_size=request["num_images"], generator=torch.Generator().manual_seed(request["seed"]),
                           output_type="np").images[..., 0]
        difference = np.abs(got - np.round(expected * 255)).astype(np.float64)
        assert got.shape == (request["num_images"], 28, 28)
        assert difference.mean() < 2.0 and difference.max() <= 64, (difference.mean(), difference.max())
