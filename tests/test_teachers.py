"""Teacher adapters against an analytic oracle: for Gaussian data x0 ~ N(m, s^2 I) the exact epsilon / v / x0
predictions, the posterior mean E[x0 | x0 + sigma z] = m + s^2 / (s^2 + sigma^2) (x - m) and the probability-flow
ODE solution x(sigma) = m + (x(sigma_T) - m) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2) are known in closed form."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler
from helpers import layout_hub_cache, make_tiny_unet

from cm_diffusers.parameterization import euler_step, heun_step, karras_sigmas
from cm_diffusers.teachers import DDPMDenoiser, EDMDenoiser, load_teacher

S = 0.5  # data standard deviation
MEANS = torch.tensor([0.3, -0.4], dtype=torch.float64)  # one mean per class: class labels must reach the UNet


def posterior_mean(x, sigma, class_labels):
    m = MEANS[class_labels].reshape(-1, 1, 1, 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return m + S**2 / (S**2 + sigma**2) * (x - m)


class OracleUNet(torch.nn.Module):
    """Stands in for a UNet2DModel: called as unet(model_input, timestep, class_labels=..., return_dict=False)."""

    dtype = torch.float64

    def __init__(self, predict):
        super().__init__()
        self.predict = predict  # (model_input, timestep (B,), class_labels) -> exact prediction

    def forward(self, model_input, timestep, class_labels=None, return_dict=False):
        return (self.predict(model_input.double(), timestep.double().reshape(-1), class_labels),)


def ddpm_oracle(alphas_cumprod, prediction_type, between="neighbours"):
    """Exact DDPM predictions at level t. Between integer levels, `neighbours` mixes the two neighbours' exact
    predictions linearly in t (all a network trained on integer t can be asked to do); `continuous` reads the level's
    sigma off ln sigma interpolated linearly in t (np.interp), which makes the adapter exact everywhere."""
    alphas_cumprod = alphas_cumprod.double()
    log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().numpy()

    def at_sigma(x_t, sigma, class_labels):
        sigma = sigma.reshape(-1, 1, 1, 1)
        sqrt_a, sqrt_1ma = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        x = x_t / sqrt_a
        x0 = posterior_mean(x, sigma, class_labels)
        eps = (x - x0) / sigma
        return {"epsilon": eps, "v_prediction": sqrt_a * eps - sqrt_1ma * x0, "sample": x0}[prediction_type]

    def predict(x_t, t, class_labels):
        if between == "continuous":
            sigma = torch.from_numpy(np.exp(np.interp(t.numpy(), np.arange(len(log_sigmas)), log_sigmas)))
            return at_sigma(x_t, sigma, class_labels)
        low, high = t.floor().long(), t.ceil().long()
        w = (t - low).reshape(-1, 1, 1, 1)
        sigma_low, sigma_high = (torch.from_numpy(np.exp(log_sigmas[i.numpy()])) for i in (low, high))
        return (1 - w) * at_sigma(x_t, sigma_low, class_labels) + w * at_sigma(x_t, sigma_high, class_labels)

    return OracleUNet(predict)


def edm_oracle(scheduler_config, c_noise_scale=1.0):
    """The exact EDM network output F for the scheduler's preconditioning: D = c_skip x + c_out F."""
    scheduler = EDMEulerScheduler.from_config(scheduler_config)

    def predict(model_input, c_noise, class_labels):
        sigma = torch.exp(4 * c_noise / c_noise_scale).reshape(-1, 1, 1, 1)
        x = model_input * (sigma**2 + scheduler.config.sigma_data**2).sqrt()  # undo c_in
        zero = torch.zeros_like(x)
        c_skip_x = scheduler.precondition_outputs(x, zero, sigma)
        c_out = scheduler.precondition_outputs(zero, torch.ones_like(x), sigma)
        return (posterior_mean(x, sigma, class_labels) - c_skip_x) / c_out

    return OracleUNet(predict)


def batch(seed=0, n=6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=generator, dtype=torch.float64) * 3
    return x, torch.arange(n) % 2


SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_ddpm_adapter_is_the_posterior_mean_on_the_levels(prediction_type, schedule):
    config = DDPMScheduler(prediction_type=prediction_type, **schedule).config
    unet = ddpm_oracle(DDPMScheduler.from_config(config).alphas_cumprod, prediction_type)
    teacher = DDPMDenoiser(unet, config)
    assert teacher.kind == "ddpm" and teacher.prediction_type == prediction_type
    assert (teacher.sigma_min, teacher.sigma_max) == (teacher.sigmas[0].item(), teacher.sigmas[-1].item())
    assert teacher.sigma_min < 0.03 and teacher.sigma_max > 14  # sqrt((1 - alphabar) / alphabar) at t = 0 and T-1
    x, labels = batch()
    for level in (0, 1, 37, 500, 998, 999):
        sigma = teacher.sigmas[level].item()
        torch.testing.assert_close(teacher(x, sigma, labels), posterior_mean(x, sigma, labels), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_adapter_between_levels(prediction_type):
    config = DDPMScheduler(prediction_type=prediction_type).config
    alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
    x, labels = batch(1)
    teacher = DDPMDenoiser(ddpm_oracle(alphas_cumprod, prediction_type), config)
    scale = (x - MEANS[labels].reshape(-1, 1, 1, 1)).abs() + MEANS.abs().max()
    for level in range(0, 999, 37):
        low, high = teacher.sigmas[level].item(), teacher.sigmas[level + 1].item()
        sigma = math.sqrt(low * high)  # half way in ln sigma: t = level + 1/2
        assert teacher.sigma_to_timestep(torch.tensor([sigma])).item() == pytest.approx(level + 0.5, abs=1e-5)
        error = (teacher(x, sigma, labels) - posterior_mean(x, sigma, labels)).abs().max().item()
        # Between levels the oracle answers like a network trained on integer t (it mixes its two neighbours), so
        # the adapter's error is that of linear interpolation over one step delta of ln sigma: delta^2 / 8 times the
        # second derivative in ln sigma, which for the posterior mean m + (x - m) / (1 + sigma^2 / s^2) is at most
        # 0.385 |x - m|; the |m| term covers the eps/v conversions at the actual sigma. 1.5x margin (measured 0.8x).
        delta = math.log(high / low)
        assert error <= 1.5 * delta**2 / 8 * 0.385 * scale.max().item(), (level, error, delta)
    # with a network whose level sigma moves continuously in t (ln sigma linear in t), the adapter is exact up to
    # the float32 timestep a UNet receives (relative 6e-8 of t ~ 500)
    teacher = DDPMDenoiser(ddpm_oracle(alphas_cumprod, prediction_type, between="continuous"), config)
    for sigma in (0.0123, 0.5, 3.7, 42.0, 150.0):
        torch.testing.assert_close(teacher(x, sigma, labels), posterior_mean(x, sigma, labels), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("c_noise_scale", [1.0, 1000.0])
def test_edm_adapter_is_the_posterior_mean(prediction_type, c_noise_scale):
    config = dict(EDMEulerScheduler(prediction_type=prediction_type, sigma_data=0.5).config)
    if c_noise_scale != 1.0:
        config["c_noise_scale"] = c_noise_scale  # OpenAI's t = 250 ln sigma
    teacher = EDMDenoiser(edm_oracle(config, c_noise_scale), config)
    assert (teacher.kind, teacher.sigma_min, teacher.sigma_max) == ("edm", 0.002, 80.0)
    x, labels = batch(2)
    for sigma in (0.002, 0.3, 1.0, 17.0, 80.0):
        torch.testing.assert_close(teacher(x, sigma, labels), posterior_mean(x, sigma, labels), rtol=1e-9, atol=1e-9)
    sigmas = torch.tensor([0.01, 0.1, 1.0, 10.0, 50.0, 80.0], dtype=torch.float64)  # one sigma per sample
    torch.testing.assert_close(teacher(x, sigmas, labels), posterior_mean(x, sigmas, labels), rtol=1e-9, atol=1e-9)


def ode_error(teacher, solver, num_steps, x_T, labels):
    sigmas = karras_sigmas(num_steps + 1, teacher.sigma_min, teacher.sigma_max).tolist()
    x = x_T
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if solver == "heun":
            x = heun_step(lambda y, s: teacher(y, s, labels), x, sigma, sigma_next)
        else:
            x = euler_step(x, sigma, sigma_next, teacher(x, sigma, labels))
    m = MEANS[labels].reshape(-1, 1, 1, 1)
    exact = m + (x_T - m) * math.sqrt(S**2 + sigmas[-1] ** 2) / math.sqrt(S**2 + sigmas[0] ** 2)
    return (x - exact).abs().max().item()


@pytest.mark.parametrize("kind", ["edm", "ddpm"])
def test_heun_and_euler_reach_the_analytic_ode_solution(kind):
    if kind == "edm":
        config = dict(EDMEulerScheduler().config)
        teacher = EDMDenoiser(edm_oracle(config), config)
    else:
        config = DDPMScheduler(beta_schedule="linear").config  # sigma in [0.01, 157]
        unet = ddpm_oracle(DDPMScheduler.from_config(config).alphas_cumprod, "epsilon", between="continuous")
        teacher = DDPMDenoiser(unet, config)
    x, labels = batch(3)
    x_T = MEANS[labels].reshape(-1, 1, 1, 1) + x / 3 * math.sqrt(S**2 + teacher.sigma_max**2)
    steps = (16, 32, 64, 128)
    heun = [ode_error(teacher, "heun", n, x_T, labels) for n in steps]
    euler = [ode_error(teacher, "euler", n, x_T, labels) for n in steps]
    assert all(h < e for h, e in zip(heun, euler)), (heun, euler)
    assert all(3.5 < a / b < 4.5 for a, b in zip(heun, heun[1:])), heun  # second order: error / 4 per doubling
    assert all(1.8 < a / b < 2.2 for a, b in zip(euler, euler[1:])), euler  # first order: error / 2
    assert heun[-1] < 2e-3, heun  # the end point is O(1): m + (x_T - m) s / sigma_max


# ----------------------------------------------------------------------------------------------------------------
# load_teacher on real folders


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared cores its OpenMP spin-waits cost up to 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory):
    """A DDPM and an EDM folder written by training/train_diffusion.py (2 steps each, tiny UNet, 16x16 PNGs)."""
    from accelerate.state import AcceleratorState
    from PIL import Image

    from training.train_diffusion import main, parse_args

    root = tmp_path_factory.mktemp("teachers")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    make_tiny_unet().save_config(root / "unet_config")
    folders = {}
    runs = (("ddpm", "ddpm", "edm"), ("edm", "edm", "edm"), ("edm_cm", "edm", "consistency"))
    for name, model_type, time_input in runs:
        AcceleratorState._reset_state(True)
        folders[name] = root / name
        main(parse_args([
            "--output_dir", str(folders[name]), "--model_type", model_type, "--edm_time_input", time_input,
            "--train_data_dir", str(root / "images"), "--unet_config", str(root / "unet_config" / "config.json"),
            "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none",
            "--num_validation_images", "1", "--validation_inference_steps", "2",
        ]))  # fmt: skip
    AcceleratorState._reset_state(True)
    return folders


def test_load_teacher_reads_train_diffusion_folders(trained_folders):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    ddpm = load_teacher(str(trained_folders["ddpm"]))
    assert isinstance(ddpm, DDPMDenoiser) and ddpm.prediction_type == "epsilon"
    assert ddpm.scheduler_config["_class_name"] == "DDPMScheduler"
    sigma_500 = ddpm.sigmas[500].item()  # on a level, D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t)
    with torch.no_grad():
        eps = ddpm.unet(x / math.sqrt(1 + sigma_500**2), torch.tensor([500.0, 500.0])).sample
    torch.testing.assert_close(ddpm(x, sigma_500), x - sigma_500 * eps, rtol=1e-5, atol=1e-5)

    edm = load_teacher(str(trained_folders["edm"]))
    assert isinstance(edm, EDMDenoiser) and (edm.sigma_min, edm.sigma_max) == (0.002, 80.0)
    scheduler = EDMEulerScheduler.from_pretrained(trained_folders["edm"], subfolder="scheduler")
    sigma = torch.tensor([2.5, 2.5])
    with torch.no_grad():  # diffusers' own preconditioning, as in its EDM sampling loop
        F = edm.unet(scheduler.precondition_inputs(x, 2.5), scheduler.precondition_noise(sigma)).sample
    torch.testing.assert_close(edm(x, sigma), scheduler.precondition_outputs(x, F, 2.5), rtol=1e-5, atol=1e-5)

    records = []  # the dtype is set at loading: no diffusers warning about casting with `to()`
    diffusers_logger, handler = logging.getLogger("diffusers"), logging.Handler()
    handler.emit, level = records.append, diffusers_logger.level
    diffusers_logger.addHandler(handler)
    diffusers_logger.setLevel(logging.WARNING)  # other tests' imports may have quietened it
    try:
        half = load_teacher(str(trained_folders["ddpm"]), torch_dtype=torch.bfloat16)
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers_logger.setLevel(level)
    assert half.unet.dtype == torch.bfloat16
    assert not [r for r in records if "kept in float32" in r.getMessage()]
    out = half(x, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ddpm(x, 1.0), rtol=0.05, atol=0.05)


def test_a_teacher_with_the_consistency_time_input_is_where_the_student_starts(trained_folders):
    """The fresh student f (the teacher's weights under the consistency scalings) equals the teacher's D up to the
    boundary-condition terms: f - D = (c_skip - c_skip_edm) x + (c_out - c_out_edm) F, small at sigma >> sigma_min,
    and f is the identity at sigma_min."""
    from cm_diffusers.networks import unet_forward
    from cm_diffusers.parameterization import boundary_scalings, consistency_function

    teacher = load_teacher(str(trained_folders["edm_cm"]))
    assert type(teacher.scheduler).__name__ == "ConsistencyTimeEDMEulerScheduler"
    assert teacher.scheduler_config["c_noise_scale"] == 1000.0
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    student = unet_forward(teacher.unet)
    for value in (0.5, 2.5, 20.0, 80.0):
        sigma = torch.full((3,), value)
        with torch.no_grad():
            f, D = consistency_function(student, x, sigma), teacher(x, sigma)
            F = teacher.unet(x / math.sqrt(value**2 + 0.25), 250 * torch.log(sigma)).sample
        c_skip, c_out, _ = boundary_scalings(torch.tensor(value))
        c_skip_edm, c_out_edm = 0.25 / (value**2 + 0.25), value * 0.5 / math.sqrt(value**2 + 0.25)
        torch.testing.assert_close(f - D, (c_skip - c_skip_edm) * x + (c_out - c_out_edm) * F, rtol=1e-4, atol=1e-5)
        assert ((f - D).norm() / D.norm()).item() < 0.01
    with torch.no_grad():
        identity = consistency_function(student, x, torch.full((3,), 0.002))
    torch.testing.assert_close(identity, x, rtol=0, atol=1e-6)


def test_a_consistency_time_teacher_samples_correctly_in_plain_diffusers(trained_folders):
    """Plain DiffusionPipeline refuses the folder without trust_remote_code (its scheduler is not diffusers' own) and
    samples it, with it, exactly as the Euler ODE solver on load_teacher's D."""
    from diffusers import DiffusionPipeline

    folder = str(trained_folders["edm_cm"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__name__ == "EDMTeacherPipeline"
    assert type(pipe.scheduler).__name__ == "ConsistencyTimeEDMEulerScheduler"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt").images

    teacher = load_teacher(folder)
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas.tolist()
    x = torch.randn(2, 1, 16, 16, generator=torch.manual_seed(0)) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = euler_step(x, sigma, sigma_next, teacher(x, sigma))
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_load_teacher_from_a_repo_id_in_the_cache(trained_folders, tmp_path):
    layout_hub_cache(trained_folders["edm"], "someone/edm-teacher", tmp_path / "hub")
    teacher = load_teacher("someone/edm-teacher", cache_dir=str(tmp_path / "hub"))
    assert teacher.kind == "edm"
    with pytest.raises(OSError, match="someone/missing"):
        load_teacher("someone/missing", cache_dir=str(tmp_path / "hub"))


def write_folder(folder, unet_config=None, scheduler_config=None, index=None):
    folder.mkdir(parents=True, exist_ok=True)
    for sub, config, name in (("unet", unet_config, "config.json"), ("scheduler", scheduler_config, None)):
        if config is not None:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / (name or "scheduler_config.json")).write_text(json.dumps(config))
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def test_unsupported_checkpoints_name_what_is_supported(tmp_path):
    unet = {"_class_name": "UNet2DModel"}
    ddpm = {"_class_name": "DDPMScheduler"}
    cases = {
        "latent": ({"index": {"vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DModel"]}}, "VAE"),
        "text": ({"unet_config": {"_class_name": "UNet2DConditionModel"}, "scheduler_config": ddpm}, "UNet2DCond"),
        "no_scheduler": ({"unet_config": unet}, "no scheduler/scheduler_config.json"),
        "no_unet": ({"scheduler_config": ddpm}, "no unet/config.json"),
        "cm": ({"unet_config": unet, "scheduler_config": {"_class_name": "CMStochasticIterativeScheduler"}}, "consis"),
        "flow": (
            {"unet_config": unet, "scheduler_config": {"_class_name": "FlowMatchEulerDiscreteScheduler"}},
            "Flow",
        ),
    }
    for name, (kwargs, message) in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            load_teacher(write_folder(tmp_path / name, **kwargs))
        assert "upported: pixel-space UNet2DModel checkpoints" in str(error.value)

    folder = tmp_path / "unknown_prediction"
    make_tiny_unet().save_pretrained(folder / "unet")
    write_folder(folder, scheduler_config={"_class_name": "DDIMScheduler", "prediction_type": "flow"})
    with pytest.raises(ValueError, match="Unsupported prediction_type 'flow'.*epsilon, v_prediction or sample"):
        load_teacher(str(folder))


def test_one_adapter_per_prediction_type():
    """DDPMDenoiser(unet, config) builds the adapter of the config's prediction type; each overrides one hook."""
    from cm_diffusers.teachers import DDPMEpsDenoiser, DDPMSampleDenoiser, DDPMVDenoiser

    unet = make_tiny_unet()
    for prediction_type, adapter in [("epsilon", DDPMEpsDenoiser), ("v_prediction", DDPMVDenoiser),
                                     ("sample", DDPMSampleDenoiser)]:  # fmt: skip
        teacher = DDPMDenoiser(unet, {"num_train_timesteps": 1000, "prediction_type": prediction_type})
        assert type(teacher) is adapter and teacher.prediction_type == prediction_type
        assert set(vars(adapter)) & {"denoise", "output_to_denoised"} == {"output_to_denoised"}
    with pytest.raises(ValueError, match="Unsupported prediction_type 'flow'"):
        DDPMDenoiser(unet, {"prediction_type": "flow"})
