"""ConsistencyScheduler: parity with diffusers' CMStochasticIterativeScheduler, schedules, errors."""

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler

from cm_diffusers import ConsistencyScheduler
from cm_diffusers.parameterization import karras_sigmas

# diffusers adds noise * sqrt(float32(sigma_min)^2 - sigma_min^2) ~ 6e-7 * z at its final step (a float32 rounding
# artefact of re-noising to sigma_min); we draw no noise there. Multistep final outputs differ by that much.
FINAL_STEP_TOL = 5e-6


def fake_model(x, t):
    """A deterministic stand-in for F(c_in x, t) that depends on both inputs."""
    return torch.tanh(x) + 1e-3 * t


def run_loop(scheduler, sample, seed=0, **schedule):
    scheduler.set_timesteps(**schedule)
    generator = torch.Generator().manual_seed(seed)
    trajectory = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        trajectory.append(model_input)
        sample = scheduler.step(fake_model(model_input, t), t, sample, generator=generator).prev_sample
    return sample, trajectory


@pytest.fixture
def pair():
    config = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    return ConsistencyScheduler(**config), CMStochasticIterativeScheduler(**config)


def test_config_keys_and_defaults_match_diffusers():
    ours, theirs = ConsistencyScheduler(), CMStochasticIterativeScheduler()
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.config) == public(theirs.config)
    assert "CMStochasticIterativeScheduler" in ConsistencyScheduler._compatibles


def test_from_config_both_ways(pair):
    ours, theirs = pair
    assert isinstance(ConsistencyScheduler.from_config(theirs.config), ConsistencyScheduler)
    back = CMStochasticIterativeScheduler.from_config(ours.config)
    assert dict(back.config) == dict(theirs.config)


@pytest.mark.parametrize(
    "schedule",
    [dict(num_inference_steps=1), dict(num_inference_steps=2), dict(timesteps=[22, 0]), dict(num_inference_steps=10)],
    ids=["1step", "2steps", "timesteps_22_0", "10steps"],
)
def test_sampling_loop_parity(pair, schedule):
    ours, theirs = pair
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 80.0
    ours_out, ours_traj = run_loop(ours, sample, **schedule)
    theirs_out, theirs_traj = run_loop(theirs, sample, **schedule)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)
    for a, b in zip(ours_traj, theirs_traj):  # every scaled model input along the way
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if len(ours.timesteps) == 1 else FINAL_STEP_TOL
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=tol)


def test_add_noise_then_ten_steps_parity(pair):
    ours, theirs = pair
    clean = torch.rand(2, 1, 8, 8) * 2 - 1
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for s in (ours, theirs):
        s.set_timesteps(num_inference_steps=10)
    t0 = theirs.timesteps[3:4].repeat(2)
    noisy_theirs = theirs.add_noise(clean, noise, t0)
    noisy_ours = ours.add_noise(clean, noise, ours.timesteps[3:4].repeat(2))
    torch.testing.assert_close(noisy_ours, noisy_theirs, rtol=1e-6, atol=1e-5)
    out_ours, _ = run_loop(ours, noisy_ours, num_inference_steps=10)
    out_theirs, _ = run_loop(theirs, noisy_theirs, num_inference_steps=10)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=FINAL_STEP_TOL)


def test_add_noise_accepts_levels_outside_the_schedule():
    scheduler = ConsistencyScheduler()
    scheduler.set_timesteps(num_inference_steps=1)
    clean, noise = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    sigmas = torch.tensor([0.1, 1.0, 7.5])
    out = scheduler.add_noise(clean, noise, sigmas=sigmas)
    torch.testing.assert_close(out[:, 0, 0, 0], sigmas)
    t = scheduler.sigma_to_t(sigmas)  # float times never seen by this schedule
    torch.testing.assert_close(scheduler.add_noise(clean, noise, t)[:, 0, 0, 0], sigmas, rtol=1e-5, atol=0)
    grid = karras_sigmas(40)
    out = scheduler.add_noise(clean, noise, grid_indices=torch.tensor([0, 22, 39]))
    np.testing.assert_allclose(out[:, 0, 0, 0].numpy(), grid[[0, 22, 39]], rtol=1e-6)
    with pytest.warns(FutureWarning, match="grid_indices"):  # the old spelling still works, with a warning
        legacy = scheduler.add_noise(clean, noise, torch.tensor([0, 22, 39]))
    torch.testing.assert_close(legacy, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.add_noise(clean, noise, sigmas=sigmas, grid_indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 39\]"):
        scheduler.add_noise(clean, noise, grid_indices=torch.tensor([0, 1, 40]))


def test_explicit_sigmas_schedule():
    scheduler = ConsistencyScheduler()
    scheduler.set_timesteps(sigmas=[80.0, 5.0, 0.5])
    assert len(scheduler.timesteps) == 3 and scheduler.num_inference_steps == 3
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([80.0, 5.0, 0.5, 0.002]))
    assert scheduler.timesteps.dtype == torch.float32


def test_denoised_output_and_no_noise_after_final_step():
    scheduler = ConsistencyScheduler()
    scheduler.set_timesteps(timesteps=[22, 0])
    sample = torch.randn(1, 1, 4, 4) * 80
    generator = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(fake_model(sample, t), t, sample, generator=generator)
        sample = out.prev_sample
    state = generator.get_state()
    # Two steps drew exactly one noise tensor: replaying one draw reproduces the generator state.
    replay = torch.Generator().manual_seed(0)
    torch.randn(1, 1, 4, 4, generator=replay)
    assert torch.equal(state, replay.get_state())
    assert torch.equal(out.prev_sample, out.denoised)


def test_step_uses_no_host_sync_and_float32_times():
    scheduler = ConsistencyScheduler()
    scheduler.set_timesteps(num_inference_steps=3)
    assert scheduler.timesteps.dtype == torch.float32
    scheduler.set_begin_index(0)
    sample = torch.randn(1, 1, 4, 4)
    # With begin_index set, the step index is bookkeeping on the host: no timestep lookup (`.nonzero()`) happens,
    # so a timestep that is not in the schedule at all is accepted without search.
    out = scheduler.step(torch.zeros_like(sample), torch.tensor(123.456), sample)
    assert scheduler.step_index == 1 and out.prev_sample.shape == sample.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one"),
        (dict(num_inference_steps=2, timesteps=[1, 0]), "exactly one"),
        (dict(timesteps=[0, 22]), "descending"),
        (dict(timesteps=[40, 0]), r"\[0, 39\]"),
        (dict(timesteps=[3.5, 0]), "integer"),
        (dict(num_inference_steps=41), "between 1 and"),
        (dict(sigmas=[100.0, 1.0]), "within"),
        (dict(sigmas=[1.0, 0.001]), "within"),
        (dict(sigmas=[1.0, 2.0]), "descending"),
    ],
)
def test_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyScheduler().set_timesteps(**kwargs)


def test_integer_timestep_in_step_is_rejected():
    scheduler = ConsistencyScheduler()
    scheduler.set_timesteps(num_inference_steps=1)
    sample = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="not an integer index"):
        scheduler.step(sample, 0, sample)
    with pytest.raises(ValueError, match="not an integer index"):
        scheduler.step(sample, torch.tensor(0), sample)


def test_len_and_save_load(tmp_path):
    scheduler = ConsistencyScheduler(num_train_timesteps=18)
    assert len(scheduler) == 18
    scheduler.save_pretrained(tmp_path)
    assert ConsistencyScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 18
