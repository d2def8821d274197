"""One sampling path: the pure schedule, the shared loop of Algorithms 1 and 4, per-request noise for batched serving,
diffusers' legacy `callback`/`callback_steps` and `num_timesteps`, and the pipeline's input checks."""

import threading
import warnings

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline
from helpers import make_tiny_unet

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler
from cm_diffusers.parameterization import renoise
from cm_diffusers.sampling import consistency_sample, consistency_schedule, grouped_randn


def make_pipe(**unet_kwargs):
    pipe = ConsistencyPipeline(unet=make_tiny_unet(**unet_kwargs), scheduler=ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the schedule is a value ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [dict(num_inference_steps=3), dict(timesteps=[22, 0]), dict(sigmas=[80, 2.0])])
def test_schedule_equals_the_schedulers(request_):
    scheduler = ConsistencyScheduler()
    scheduler.set_timesteps(**request_)
    schedule = consistency_schedule(scheduler.config, **request_)
    np.testing.assert_allclose(schedule.astype(np.float32), scheduler.sigmas[:-1].numpy(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "request_, message",
    [(dict(), "exactly one"), (dict(num_inference_steps=0), "between 1"), (dict(timesteps=[0, 22]), "descending"),
     (dict(timesteps=[40]), r"\[0, 39\]"), (dict(sigmas=[1.0, float("nan")]), "finite"),
     (dict(sigmas=[100.0, 1.0]), "within"), (dict(num_inference_steps=2, sigmas=[80.0]), "exactly one")],
)
def test_schedule_errors(request_, message):
    with pytest.raises(ValueError, match=message):
        consistency_schedule(ConsistencyScheduler().config, **request_)


def test_no_call_mutates_the_shared_scheduler():
    pipe = make_pipe()
    pipe.scheduler.set_timesteps(timesteps=[30, 10, 0])
    before = (pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone(), pipe.scheduler.num_inference_steps)
    pipe(num_inference_steps=2, output_type="latent")
    pipe.sampling_sigmas(sigmas=[80.0, 1.0])
    pipe.inpaint(torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16), num_inference_steps=2, output_type="latent")
    pipe.interpolate(num_frames=2, output_type="latent")
    torch.testing.assert_close(pipe.scheduler.timesteps, before[0], rtol=0, atol=0)
    torch.testing.assert_close(pipe.scheduler.sigmas, before[1], rtol=0, atol=0)
    assert pipe.scheduler.num_inference_steps == before[2]


def test_concurrent_calls_with_different_schedules_equal_sequential_ones():
    pipe = make_pipe()
    schedules = [dict(num_inference_steps=1), dict(timesteps=[22, 0]), dict(sigmas=[80.0, 5.0, 0.5])] * 2

    def run(schedule, seed):
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="latent",
                    **schedule).images

    expected = [run(schedule, seed) for seed, schedule in enumerate(schedules)]
    results = [None] * len(schedules)

    def worker(k):
        results[k] = run(schedules[k], k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(schedules))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- one loop ---------------------------------------------------------------------------------------------------------


def test_loop_is_algorithm_1_with_an_oracle():
    """With a linear oracle f(x, sigma) = 0.5 x / sigma every step can be written out by hand."""
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = [80.0, 3.0, 0.5]
    draws = torch.randn(2, 2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    counter = iter(draws)

    def f(x, sigma):
        return 0.5 * x / sigma[:, None, None, None]

    got = consistency_sample(f, latents, sigmas, sigma_min=0.002, s_noise=1.0, clip_denoised=False,
                             randn=lambda shape: next(counter))
    x = 80.0 * latents
    for i, sigma in enumerate(sigmas):
        x0 = 0.5 * x / sigma
        x = x0 if i == len(sigmas) - 1 else x0 + (sigmas[i + 1] ** 2 - 0.002**2) ** 0.5 * draws[i]
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_renoise_reaches_the_next_level_and_nothing_at_sigma_min():
    noise = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zero = torch.zeros_like(noise)
    assert renoise(zero, 0.002, noise, sigma_min=0.002).abs().max() == 0
    std = renoise(zero, 3.0, noise, sigma_min=0.002).std().item()
    assert abs(std - (9 - 0.002**2) ** 0.5) < 0.1


def test_interpolate_end_frames_equal_generation():
    pipe = make_pipe()
    a = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    b = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    frames = pipe.interpolate(a, b, alphas=[0.0, 1.0], output_type="latent").images
    torch.testing.assert_close(frames[0:1], pipe(latents=a, output_type="latent").images, rtol=0, atol=1e-5)
    torch.testing.assert_close(frames[1:2], pipe(latents=b, output_type="latent").images, rtol=0, atol=1e-5)


# -- batched requests with their own seeds (what the server does) ----------------------------------------------------


def test_batched_requests_equal_their_unbatched_calls():
    pipe = make_pipe(num_class_embeds=5)
    seeds, sizes = [11, 12, 13], [2, 1, 3]
    sigmas = pipe.sampling_sigmas(timesteps=[30, 12, 0])
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = [pipe.prepare_latents(n, g) for n, g in zip(sizes, generators)]
    labels = [pipe.prepare_class_labels(n, None, g) for n, g in zip(sizes, generators)]
    batched = pipe.sample(torch.cat(latents), sigmas, torch.cat(labels), randn=grouped_randn(generators, sizes))
    for k, (seed, n) in enumerate(zip(seeds, sizes)):
        alone = pipe(batch_size=n, timesteps=[30, 12, 0], generator=torch.Generator().manual_seed(seed),
                     output_type="latent").images
        start = sum(sizes[:k])
        torch.testing.assert_close(batched[start:start + n], alone, rtol=0, atol=1e-4)


def test_grouped_randn_checks_sizes():
    with pytest.raises(ValueError, match="one generator per request"):
        grouped_randn([torch.Generator()], [1, 2])
    randn = grouped_randn([torch.Generator(), torch.Generator()], [1, 2])
    with pytest.raises(ValueError, match="does not match"):
        randn((4, 1, 2, 2))


# -- diffusers compatibility: legacy callback, num_timesteps ---------------------------------------------------------


def test_legacy_callback_like_diffusers():
    ours = make_pipe(in_channels=3)
    theirs = ConsistencyModelPipeline(unet=ours.unet, scheduler=CMStochasticIterativeScheduler())
    theirs.set_progress_bar_config(disable=True)
    calls = {"ours": [], "theirs": []}
    for name, pipe in (("ours", ours), ("theirs", theirs)):
        def record(i, t, latents, name=name):
            calls[name].append((i, float(t), tuple(latents.shape)))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe(num_inference_steps=None, timesteps=[30, 20, 10, 0], callback=record, callback_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="latent" if name == "ours" else "np")
        if name == "ours":
            assert any(issubclass(w.category, FutureWarning) and "callback_on_step_end" in str(w.message)
                       for w in caught)
    assert [c[0] for c in calls["ours"]] == [0, 2]
    assert [(i, shape) for i, _, shape in calls["ours"]] == [(i, shape) for i, _, shape in calls["theirs"]]
    np.testing.assert_allclose([t for _, t, _ in calls["ours"]], [t for _, t, _ in calls["theirs"]], rtol=1e-6)


@pytest.mark.parametrize("callback_steps", [0, -1, 1.5, None])
def test_callback_steps_must_be_a_positive_integer(callback_steps):
    with pytest.raises(ValueError, match="callback_steps"):
        make_pipe()(callback_steps=callback_steps)


def test_num_timesteps_in_callback_on_step_end():
    pipe = make_pipe()
    seen = []

    def on_step_end(p, i, t, kwargs):
        seen.append((i, p.num_timesteps))
        return kwargs

    pipe(num_inference_steps=3, callback_on_step_end=on_step_end, output_type="latent")
    assert seen == [(0, 3), (1, 3), (2, 3)] and pipe.num_timesteps == 3


# -- input checks -----------------------------------------------------------------------------------------------------


def test_generator_list_of_the_wrong_length_is_refused_like_diffusers():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="list of generators of length 3"):
        pipe(batch_size=2, generator=[torch.Generator() for _ in range(3)])
    assert len(pipe(batch_size=2, generator=[torch.Generator().manual_seed(k) for k in range(2)]).images) == 2
    assert len(pipe(batch_size=2, generator=[torch.Generator()]).images) == 2


def test_numpy_integer_batch_size_is_accepted():
    assert len(make_pipe()(batch_size=np.int64(2)).images) == 2


def test_nan_latents_are_refused():
    latents = torch.full((1, 1, 16, 16), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        make_pipe()(latents=latents)


def test_nan_image_is_refused_in_editing():
    image = np.full((16, 16), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        make_pipe().denoise(image, sigma=0.5)


def test_chw_numpy_image_gets_a_layout_hint():
    pipe = make_pipe(in_channels=3)
    with pytest.raises(ValueError, match="channels-last"):
        pipe.denoise(np.zeros((3, 16, 16), dtype=np.float32), sigma=0.5)


def test_editing_options_are_checked_like_keyword_arguments():
    pipe = make_pipe()
    image = np.zeros((16, 16), dtype=np.float32)
    with pytest.raises(TypeError, match="inpaint\\(\\) got an unexpected keyword argument 'num_steps'"):
        pipe.inpaint(image, np.ones((16, 16), dtype=np.float32), num_steps=2)
    with pytest.raises(TypeError, match="denoise\\(\\) got an unexpected keyword argument 'timesteps'"):
        pipe.denoise(image, sigma=0.5, timesteps=[3, 0])
    out = pipe.inpaint(image, np.ones((16, 16), dtype=np.float32), timesteps=[30, 0], output_type="np",
                       generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 16, 16, 1)


def test_the_named_schedule_is_decided_once_for_the_pipeline_and_the_server():
    from cm_diffusers.sampling import named_schedule
    from cm_diffusers.serving.model import _schedule_field, _schedule_of

    assert named_schedule(1, None, None) == {"num_inference_steps": 1}
    assert named_schedule(1, [22, 0], None) == {"timesteps": [22, 0]}  # the default step count gives way
    assert named_schedule(3, None, [80.0, 0.5]) == {"sigmas": [80.0, 0.5]}
    assert named_schedule(1, [22, 0], [80.0]) == {"timesteps": [22, 0], "sigmas": [80.0]}  # refused downstream
    request = {"num_inference_steps": 1, "timesteps": None, "sigmas": [80.0, 0.5]}
    assert _schedule_of(request) == named_schedule(1, None, [80.0, 0.5]) and _schedule_field(request) == "sigmas"
    pipe = make_pipe()
    with pytest.raises(ValueError, match="exactly one") as info:
        pipe(timesteps=[22, 0], sigmas=[80.0, 0.5], output_type="latent")
    assert info.value.field == "sigmas"
