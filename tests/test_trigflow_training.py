"""sCT / sCD (Lu & Song 2024): the loss's JVP and tangent, forward-mode AD through a UNet2DModel, the student started
from an EDM teacher, and end-to-end runs of `--mode sct|scd` (saved folder, exact resume, two synchronised ranks)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
from helpers import TINY_UNET_CONFIG, make_tiny_unet
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_diffusers import ConsistencyPipeline  # noqa: E402
from cm_diffusers.forward_ad import (  # noqa: E402
    FP32TimestepEmbedding,
    JVPAttnProcessor,
    check_forward_ad,
    forward_ad_attention,
    make_jvp_safe,
)
from cm_diffusers.losses import (  # noqa: E402
    DataTangent,
    Levels,
    TeacherTangent,
    TrigFlowConsistencyLoss,
    TrigFlowTimes,
    build_loss,
)
from cm_diffusers.modes import MODES  # noqa: E402
from cm_diffusers.networks import unet_forward  # noqa: E402
from cm_diffusers.parameterization import trigflow_output, trigflow_t, trigflow_time_input  # noqa: E402
from cm_diffusers.training.loop import weights_digest  # noqa: E402
from training import train_consistency  # noqa: E402

SIGMA_D = 0.5
WEIGHTS = "diffusion_pytorch_model.safetensors"


class SmoothNetwork(torch.nn.Module):
    """A smooth toy F(x_in, c_noise) with parameters, whose derivatives finite differences resolve in float64."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))

    def forward(self, x_in, c_noise, class_labels=None):
        c = c_noise.reshape(-1, *([1] * (x_in.ndim - 1))) / 1000.0
        return torch.tanh(self.a * x_in + torch.sin(c)) * (1 + self.b * c**2)


def test_loss_tangent_is_cos_t_times_df_dt_along_the_flow():
    """g (before normalisation, r = 1) equals cos(t) d/dt f(x_t, t) along the trajectory x_t = cos(t) x0 + sin(t) z,
    computed by central differences; and F_theta - F^- = 0, so the gradient is that of -<F_theta, g>."""
    network = SmoothNetwork()
    loss_fn = TrigFlowConsistencyLoss(DataTangent(), TrigFlowTimes(sigma_data=SIGMA_D), SIGMA_D, "t",
                                      adaptive_weighting=False, tangent_norm_c=0.0)  # fmt: skip
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    torch.manual_seed(0)
    t = TrigFlowTimes(sigma_data=SIGMA_D)(4, Levels(0, 0.0)).double()
    torch.manual_seed(0)
    _ = TrigFlowTimes(sigma_data=SIGMA_D)(4, Levels(0, 0.0))
    z = torch.randn_like(x0) * SIGMA_D  # the loss draws t, then z, in this order

    def f(time):
        tb = time.reshape(-1, 1, 1, 1)
        x_t = torch.cos(tb) * x0 + torch.sin(tb) * z
        return trigflow_output(network(x_t / SIGMA_D, trigflow_time_input(time, "t")), x_t, tb, SIGMA_D)

    h = 1e-6
    with torch.no_grad():
        expected_g = torch.cos(t).reshape(-1, 1, 1, 1) * (f(t + h) - f(t - h)) / (2 * h)

    captured = {}

    def student(x_in, c_noise, class_labels=None):
        captured["F_theta"] = network(x_in, c_noise)
        return captured["F_theta"]

    torch.manual_seed(0)
    sample = x0
    loss, logs = loss_fn(student, network, sample, Levels(0, 0.0))
    # loss = mean ||F_theta - F^- - g||^2 with F_theta == F^- numerically: mean ||g||^2
    torch.testing.assert_close(loss, expected_g.reshape(4, -1).square().mean(1).mean(), rtol=1e-5, atol=1e-12)
    loss.backward()
    # d loss / d theta = -2/D <dF/dtheta, g>: compare with autograd of the surrogate -2/D <F_theta, g> (g fixed)
    grads = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    torch.manual_seed(0)
    _ = TrigFlowTimes(sigma_data=SIGMA_D)(4, Levels(0, 0.0))
    x_t = torch.cos(t).reshape(-1, 1, 1, 1) * x0 + torch.sin(t).reshape(-1, 1, 1, 1) * z
    surrogate = -(2.0 / 9) * (network(x_t / SIGMA_D, 1000 * t) * expected_g).reshape(4, -1).sum(1).mean()
    surrogate.backward()
    for grad, p in zip(grads, network.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-10)
    assert logs["tangent_warmup"] == 1.0


def test_tangent_warmup_and_normalisation():
    network = SmoothNetwork()
    x0 = torch.randn(8, 1, 4, 4, dtype=torch.float64)

    def run(levels, c):
        loss_fn = TrigFlowConsistencyLoss(DataTangent(), TrigFlowTimes(sigma_data=SIGMA_D), SIGMA_D, "t",
                                          adaptive_weighting=False, tangent_norm_c=c)  # fmt: skip
        torch.manual_seed(3)
        return loss_fn(network, network, x0, levels)

    _, warm = run(Levels(0, 0.0, tangent_warmup=0.25), 0.0)
    _, full = run(Levels(0, 0.0), 0.0)
    assert warm["tangent_warmup"] == 0.25 and warm["tangent_norm"] != full["tangent_norm"]
    loss, logs = run(Levels(0, 0.0), 0.1)  # g / (||g|| + 0.1): ||g|| / (||g|| + 0.1) < 1 per sample
    assert float(loss.detach()) * 16 < 1.0
    assert float(logs["tangent_norm"]) == pytest.approx(float(full["tangent_norm"]))


def test_adaptive_weighting_learns_and_the_student_shares_the_jvp_dropout_masks():
    unet = make_tiny_unet(dropout=0.5).train()
    make_jvp_safe(unet)
    loss_fn = build_loss("sct", None, time_input="t", sigma_data=SIGMA_D, p_mean=-1.0, p_std=1.4)
    assert loss_fn.log_variance is not None and sum(p.numel() for p in loss_fn.parameters()) == 65
    outputs = {}

    def student(x_in, c_noise, class_labels=None):
        outputs["student"] = unet(x_in, c_noise).sample
        return outputs["student"]

    def target(x_in, c_noise, class_labels=None):
        outputs["target"] = unet(x_in, c_noise).sample
        return outputs["target"]

    torch.manual_seed(0)
    loss, _ = loss_fn(student, target, torch.randn(4, 1, 16, 16), Levels(0, 0.0))
    torch.testing.assert_close(outputs["student"], outputs["target"].detach(), rtol=0, atol=0)  # same masks
    loss.backward()
    assert all(p.grad is not None for p in loss_fn.log_variance.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


def test_teacher_tangent_of_an_oracle_denoiser_is_the_data_tangent():
    """With D(x, sigma) = x0 (a one-point data set), the sCD tangent equals the sCT one."""
    x0 = torch.randn(3, 1, 4, 4)
    z = torch.randn(3, 1, 4, 4) * SIGMA_D
    t = torch.tensor([0.2, 0.9, 1.5]).reshape(-1, 1, 1, 1)
    x_t = torch.cos(t) * x0 + torch.sin(t) * z
    oracle = TeacherTangent(lambda x, sigma, class_labels=None: x0, sigma_data=SIGMA_D)
    torch.testing.assert_close(oracle(x_t, t, x0, z), DataTangent()(x_t, t, x0, z), rtol=1e-4, atol=1e-5)


def test_times_are_lognormal_sigmas_through_arctan():
    times = TrigFlowTimes(0.002, 80.0, SIGMA_D, p_mean=-1.0, p_std=1.4)
    torch.manual_seed(0)
    t = times(20000, Levels(0, 0.0)).double()
    log_sigma = torch.log(SIGMA_D * torch.tan(t))
    assert float(log_sigma.mean()) == pytest.approx(-1.0, abs=0.05) and float(log_sigma.std()) == pytest.approx(
        1.4, abs=0.05)
    assert float(t.max()) <= trigflow_t(80.0, SIGMA_D) + 1e-6 and float(t.min()) >= trigflow_t(0.002, SIGMA_D) - 1e-6


def test_unet_is_made_safe_for_forward_mode_ad():
    unet = make_tiny_unet()
    with pytest.raises(RuntimeError, match="forward-mode AD"):  # torch's fused SDPA kernel has no forward-AD rule
        check_forward_ad(unet, (1, 1, 16, 16))
    replaced = make_jvp_safe(unet)
    assert replaced == {"AttnProcessor2_0": 4} and isinstance(unet.time_embedding, FP32TimestepEmbedding)
    processors = [m.processor for m in unet.modules() if hasattr(m, "processor")]
    assert all(isinstance(p, JVPAttnProcessor) and p.fused is not None for p in processors)  # no dropout: fused
    with_dropout = make_tiny_unet(dropout=0.1)
    make_jvp_safe(with_dropout)  # the fused kernel draws random numbers: classic attention outside the JVP too
    assert all(m.processor.fused is None for m in with_dropout.modules() if hasattr(m, "processor"))
    check_forward_ad(unet, (1, 1, 16, 16))
    # the outputs do not change, nor does the state dict
    reference = make_tiny_unet()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 500.0])
    torch.testing.assert_close(unet(x, t).sample, reference(x, t).sample, rtol=1e-5, atol=1e-5)
    with forward_ad_attention():  # the classic attention the JVP runs through computes the same function
        torch.testing.assert_close(unet(x, t).sample, reference(x, t).sample, rtol=1e-5, atol=1e-5)
    assert unet.state_dict().keys() == reference.state_dict().keys()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the time embedding stays in float32 under autocast
        assert unet.time_embedding(torch.randn(2, 16)).dtype == torch.float32
        assert reference.time_embedding(torch.randn(2, 16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# The training script


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory):
    """A tiny (untrained) EDM teacher folder with diffusers' EDMEulerScheduler (c_noise = 0.25 ln sigma)."""
    path = tmp_path_factory.mktemp("edm_teacher")
    make_tiny_unet(seed=1).save_pretrained(path / "unet")
    EDMEulerScheduler(sigma_data=SIGMA_D).save_pretrained(path / "scheduler")
    return path


def train(*flags):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_consistency.main(train_consistency.parse_args([str(flag) for flag in flags]))


def common_flags(data_dir, output_dir, steps):
    return ["--train_data_dir", data_dir, "--output_dir", output_dir, "--max_train_steps", steps,
            "--train_batch_size", 8, "--num_validation_images", 4, "--seed", 0]  # fmt: skip


def read_log(output_dir, name="train_log.jsonl"):
    with open(Path(output_dir) / "logs" / name) as f:
        return [json.loads(line) for line in f if '"step"' in line and '"event"' not in line]


def test_scd_student_starts_as_the_edm_teacher_exactly(edm_teacher, tmp_path):
    """--time_input auto picks the teacher's 0.25 ln sigma; the student is F = -F_edm: f(x_t, t) == D(x_sigma)."""
    from accelerate import Accelerator

    from cm_diffusers.training.consistency import build_student, load_teacher_for

    args = train_consistency.parse_args(["--mode", "scd", "--output_dir", str(tmp_path),
                                         "--teacher_model_name_or_path", str(edm_teacher)])  # fmt: skip
    teacher, _, _ = load_teacher_for(args, Accelerator(cpu=True), torch.float32)
    assert args.time_input == "edm_log_sigma"
    student = build_student(args, teacher, None, 16, 1).eval()
    sigma = torch.tensor([0.05, 1.0, 20.0])
    x_sigma = torch.randn(3, 1, 16, 16) * (1 + sigma.reshape(-1, 1, 1, 1))
    pipe = ConsistencyPipeline(unet=student, scheduler=_trigflow_scheduler(args))
    with torch.no_grad():
        torch.testing.assert_close(pipe.consistency_function(x_sigma, sigma, clip_denoised=False),
                                   teacher(x_sigma, sigma), rtol=1e-5, atol=1e-5)  # fmt: skip


def _trigflow_scheduler(args):
    from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler

    return TrigFlowSCMScheduler(sigma_data=args.sigma_data, time_input=args.time_input)


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_continuous_time_training_saves_a_trigflow_pipeline(mode, data_dir, unet_config, edm_teacher, tmp_path):
    out, steps = tmp_path / mode, 6
    source = ["--unet_config", unet_config] if mode == "sct" else ["--teacher_model_name_or_path", edm_teacher]
    assert train(*common_flags(data_dir, out, steps), "--mode", mode, *source, "--tangent_warmup_steps", 4,
                 "--learning_rate", 1e-3, "--ema_decay", 0, "--checkpointing_steps", 3) == steps  # fmt: skip
    log = read_log(out)
    assert [entry["step"] for entry in log] == list(range(1, steps + 1))
    assert [entry["tangent_warmup"] for entry in log] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # r = min(1, k / H)
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["tangent_norm"]) for entry in log)
    assert log[-1]["loss"] < log[0]["loss"]  # the adaptive weighting learns from the first steps
    # the learned weighting lives in the checkpoints, not in the pipeline
    assert (out / "checkpoint-3" / "custom_checkpoint_1.pkl").is_file()
    assert not list(out.glob("unet/*log_variance*"))
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "TrigFlowSCMScheduler" and config["prediction_type"] == "trigflow"
    assert config["time_input"] == ("t" if mode == "sct" else "edm_log_sigma")
    assert config["intermediate_timesteps"] == pytest.approx(math.atan(0.821 / SIGMA_D))
    assert (out / "samples_1step.png").is_file() and (out / "pipeline_trigflow.py").is_file()
    card = (out / "README.md").read_text()
    assert MODES[mode].description in card and "trust_remote_code=True" in card and "tangent_warmup_steps" in card

    pipe = ConsistencyPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    plain = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    plain.set_progress_bar_config(disable=True)
    for steps_ in (1, 2):
        ours = pipe(batch_size=2, num_inference_steps=steps_, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # fmt: skip
        theirs = plain(batch_size=2, num_inference_steps=steps_, generator=torch.Generator().manual_seed(0),
                       output_type="np").images  # fmt: skip
        assert np.isfinite(ours).all() and np.abs(ours - theirs).max() < 1e-5
    trained = load_file(out / "unet" / WEIGHTS)
    assert any(not torch.equal(value, make_tiny_unet(seed=1).state_dict()[name]) for name, value in trained.items())


def test_trigflow_flags_are_checked(tmp_path, edm_teacher):
    flags = ["--mode", "scd", "--output_dir", str(tmp_path), "--teacher_model_name_or_path", str(edm_teacher)]
    for extra in (["--denoiser_warmup_steps", "1"], ["--loss_type", "pseudo_huber"], ["--sampling_sigma_max", "40"]):
        with pytest.raises(SystemExit):
            train_consistency.parse_args(flags + extra)
    with pytest.raises(SystemExit):  # scd distills: it needs a teacher
        train_consistency.parse_args(["--mode", "scd", "--output_dir", str(tmp_path)])
    # a TrigFlow model is no student for a discrete mode: its weights mean another parameterization
    from cm_diffusers.training.consistency import build_student
    from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler

    trigflow = tmp_path / "trigflow"
    ConsistencyPipeline(unet=make_tiny_unet(), scheduler=TrigFlowSCMScheduler()).save_pretrained(trigflow)
    cd_args = train_consistency.parse_args(["--mode", "cd", "--output_dir", str(tmp_path / "x"),
                                            "--teacher_model_name_or_path", str(edm_teacher),
                                            "--student_model_name_or_path", str(trigflow)])  # fmt: skip
    with pytest.raises(ValueError, match="continuous-time"):
        build_student(cd_args, None, None, 16, 1)
    args = train_consistency.parse_args(flags + ["--no-adaptive_weighting", "--prior_weighting"])
    assert args.adaptive_weighting is False and args.prior_weighting and (args.p_mean, args.p_std) == (-1.0, 1.4)


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_resume_equals_uninterrupted_run(mode, data_dir, unet_config, edm_teacher, tmp_path):
    """6 steps straight == 3 + resume + 3: student, learned weighting, optimizer, warm-up, noise, dropout."""
    # sCD starts from its teacher, sCT from a fresh UNet of the config (its tangent needs no teacher)
    student = ["--teacher_model_name_or_path", edm_teacher] if mode == "scd" else ["--unet_config", unet_config]

    def flags(out):
        return common_flags(data_dir, out, 6) + student + [
            "--mode", mode, "--dropout", 0.2, "--ema_decay", 0.9, "--train_batch_size", 4,
            "--checkpointing_steps", 3, "--learning_rate", 1e-3, "--lr_warmup_steps", 2, "--tangent_warmup_steps", 5,
        ]  # fmt: skip

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*flags(straight))
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert train(*flags(resumed), "--resume_from_checkpoint", "latest") == 6
    a_log, b_log = read_log(straight), read_log(resumed)
    assert [entry["step"] for entry in b_log] == [4, 5, 6]
    for a, b in zip(a_log[3:], b_log):
        assert (a["tangent_warmup"], a["lr"]) == (b["tangent_warmup"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    a, b = load_file(straight / "unet" / WEIGHTS), load_file(resumed / "unet" / WEIGHTS)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # the learned log-variance head (custom checkpoint 2, after the schedule and the EMA) resumed exactly too
    heads = [torch.load(out / "checkpoint-6" / "custom_checkpoint_2.pkl", weights_only=True)
             for out in (straight, resumed)]  # fmt: skip
    assert heads[0].keys() == {"linear.weight", "linear.bias"} and heads[0]["linear.weight"].abs().sum() > 0
    for name in heads[0]:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=0, atol=1e-6)


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_keep_student_and_weighting_in_sync(data_dir, edm_teacher, tmp_path):
    """Two gloo ranks: the JVP runs on the unwrapped UNet, the gradient through DDP; the log-variance head's
    gradients are averaged too. Both ranks hold identical weights (UNet and head) after every step."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(REPO / "training" / "train_consistency.py")]  # fmt: skip
    flags = common_flags(data_dir, out, 4) + ["--mode", "scd", "--teacher_model_name_or_path", edm_teacher,
                                              "--train_batch_size", 4, "--ema_decay", 0, "--learning_rate", 1e-3,
                                              "--tangent_warmup_steps", 2, "--log_every_rank"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command + [str(flag) for flag in flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = read_log(out, "train_log_rank0.jsonl"), read_log(out, "train_log_rank1.jsonl")
    assert [e["weights_sha256"] for e in rank0] == [e["weights_sha256"] for e in rank1]
    assert len({e["weights_sha256"] for e in rank0}) == 4  # the weights change every step
    assert any(a["local_loss"] != b["local_loss"] for a, b in zip(rank0, rank1))  # different data shards
    pipe = ConsistencyPipeline.from_pretrained(out)
    # the logged digest covers the UNet and the head; the pipeline holds the UNet alone
    assert weights_digest(pipe.unet) != rank0[-1]["weights_sha256"] and pipe.is_trigflow


def test_default_unet_config_runs_forward_ad():
    """The architecture the script builds for the data (and the tiny test one) passes the forward-AD probe."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(TINY_UNET_CONFIG)
    make_jvp_safe(unet)
    check_forward_ad(unet, (1, 1, 16, 16))
    network = unet_forward(unet)
    assert network(torch.randn(1, 1, 16, 16), torch.tensor([3.0])).shape == (1, 1, 16, 16)


def test_scd_student_starts_as_the_shipped_edm_teacher(tmp_path):
    """The shipped fashion-mnist-edm (time input 250 ln sigma): --time_input auto gives log_sigma and a student whose
    f equals the teacher's D up to float rounding at every noise level; with the paper's t the start is far off."""
    from accelerate import Accelerator

    from cm_diffusers.training.consistency import build_student, load_teacher_for
    from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler

    gaps = {}
    for time_input in ("auto", "t"):
        args = train_consistency.parse_args(["--mode", "scd", "--output_dir", str(tmp_path), "--time_input",
                                             time_input, "--teacher_model_name_or_path", "fashion-mnist-edm"])
        teacher, _, _ = load_teacher_for(args, Accelerator(cpu=True), torch.float32)
        student = build_student(args, teacher, None, 28, 1).eval()
        scheduler = TrigFlowSCMScheduler(sigma_data=args.sigma_data, time_input=args.time_input)
        pipe = ConsistencyPipeline(unet=student, scheduler=scheduler)
        torch.manual_seed(0)
        x0 = torch.rand(8, 1, 28, 28) * 2 - 1
        for sigma in (0.05, 0.5, 2.0, 20.0, 80.0):
            x = x0 + sigma * torch.randn_like(x0)
            levels = torch.full((8,), sigma)
            with torch.no_grad():
                f, d = pipe.consistency_function(x, levels, clip_denoised=False), teacher(x, levels)
            gaps[args.time_input, sigma] = float((f - d).norm() / d.norm())
    assert max(gap for (time_input, _), gap in gaps.items() if time_input == "log_sigma") < 1e-4
    assert min(gap for (time_input, _), gap in gaps.items() if time_input == "t") > 1e-2
